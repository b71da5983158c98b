"""Instance/class image loading and validation (minimal version; see issue 4 for the full one)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from dreambooth_jax.errors import DreamboothError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class DataError(DreamboothError):
    pass


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
    if not paths:
        raise DataError(f"no images in {folder} (accepted: {', '.join(EXTENSIONS)})")
    return paths


def load_image(path, size: int, *, crop: str = "center", rng=None, min_size: int | None = None) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    if im.mode in ("RGBA", "LA", "P") and (im.mode != "P" or "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    if im.mode in ("I;16", "I;16B", "I"):
        a = np.asarray(im, np.float64)
        im = Image.fromarray((a / max(a.max(), 1) * 255).astype(np.uint8))
    im = im.convert("RGB")
    w, h = im.size
    if min(w, h) < (min_size if min_size is not None else max(8, size // 4)):
        raise DataError(f"image {path} is too small ({w}x{h}) for training at {size}px")
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
    w, h = im.size
    if crop == "random":
        rng = rng or np.random.default_rng(0)
        left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, np.float32) / 127.5 - 1.0


class InstanceDataset:
    """The validated subject photos at one resolution (and their horizontal flips)."""

    def __init__(self, folder, size: int, *, flip: bool = False, crop: str = "center", seed: int = 0):
        self.paths = list_images(folder)
        if len(self.paths) < 3:
            warnings.warn(f"only {len(self.paths)} instance image(s) in {folder}; DreamBooth works best with 3-5")
        rng = np.random.default_rng(seed)
        imgs = [load_image(p, size, crop=crop, rng=rng) for p in self.paths]
        if flip:
            imgs += [im[:, ::-1] for im in imgs]
        self.images = np.stack(imgs)

    def __len__(self) -> int:
        return len(self.images)


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the examples of ``step``: an epoch-wise seeded permutation, a pure function of
    (num_items, batch_size, step, seed), so a resumed run sees exactly the same data."""
    if num_items < 1:
        raise DataError("no examples to draw a batch from")
    start = step * batch_size
    out = []
    epoch = start // num_items
    while len(out) < batch_size:
        perm = np.random.default_rng([seed, epoch]).permutation(num_items)
        off = start - epoch * num_items if not out else 0
        out.extend(perm[off:off + batch_size - len(out)].tolist())
        epoch += 1
    return np.asarray(out)
