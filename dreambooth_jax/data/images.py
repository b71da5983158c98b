"""Loading and validating DreamBooth images: the instance photos (the user's 3-5 pictures of the
subject) and class (prior-preservation) images.

Every image goes through one path (:func:`load_image_uint8`): EXIF orientation, colour-mode
conversion to sRGB RGB, short-side resize with a high-quality filter, square crop. Errors the user
can fix (missing folder, corrupt, tiny or too large file) raise :class:`DataError` naming the file.
Folder entries that are not used (GIF/HEIC/... files, dangling symlinks, sub-folders) are named in
one :class:`SkippedFilesWarning` per folder, so no photo is dropped without a word.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from dreambooth_jax.errors import ConfigError, DreamboothError

if TYPE_CHECKING:  # PIL is imported where it is used: importing this module stays cheap
    from PIL import Image as PILImage

#: File name suffixes that :func:`list_images` picks up (compared case-insensitively).
EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

#: By default an image whose short side is below ``size * MIN_SIDE_FRACTION`` is refused: it
#: would be upscaled more than 4x, which gives the model blur to learn rather than the subject.
MIN_SIDE_FRACTION: float = 0.25

#: DreamBooth needs a few views of the subject; fewer than this triggers :class:`FewImagesWarning`.
MIN_INSTANCE_IMAGES: int = 3

CropMode = Literal["center", "random"]


class DataError(DreamboothError, ValueError):
    """An image folder or image file cannot be used; the message names it and says why."""


class FewImagesWarning(UserWarning):
    """Fewer instance images than DreamBooth usually needs (3-5 views of the subject)."""


class SkippedFilesWarning(UserWarning):
    """Entries of an image folder that are not used (unsupported type, dangling symlink, ...)."""


#: Why a file with this suffix is skipped: formats people put in photo folders that we do not read.
_UNSUPPORTED: dict[str, str] = {
    ".gif": "GIF (often animated) is not supported: convert it to PNG or JPEG",
    ".heic": "HEIC is not supported: convert it to JPEG or PNG",
    ".heif": "HEIF is not supported: convert it to JPEG or PNG",
    ".hif": "HEIF is not supported: convert it to JPEG or PNG",
    ".avif": "AVIF is not supported: convert it to JPEG or PNG",
    ".jxl": "JPEG XL is not supported: convert it to JPEG or PNG",
    ".tif": "TIFF is not supported: convert it to PNG or JPEG",
    ".tiff": "TIFF is not supported: convert it to PNG or JPEG",
    ".bmp": "BMP is not supported: convert it to PNG",
    ".jfif": "rename .jfif to .jpg",
    ".jpe": "rename .jpe to .jpg",
    ".svg": "vector images are not supported: export a PNG",
    ".psd": "Photoshop files are not supported: export a PNG or JPEG",
    **{raw: "camera RAW is not supported: export a JPEG or PNG"
       for raw in (".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".raw")},
    **{video: "videos are not supported: extract frames as JPEG or PNG"
       for video in (".mov", ".mp4", ".m4v", ".avi", ".webm")},
}
#: Names skipped without a word: operating-system metadata, never the user's images.
_OS_METADATA = frozenset({"thumbs.db", "desktop.ini"})
#: At most this many names per reason in the skipped-files message; the rest are counted.
_MAX_NAMES = 5


def scan_images(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The image files directly in ``folder`` (as :func:`list_images`) and the skipped entries.

    Returns ``(images, skipped)``: ``skipped`` holds ``(path, reason)`` for every other entry
    except hidden ones (name starting with "."; macOS "._photo.jpg" resource forks, .DS_Store),
    Thumbs.db / desktop.ini, and caption files next to an image ("dog01.txt" for "dog01.jpg",
    read by :func:`dreambooth_jax.data.tfds_source.build_image_dataset`): files of other types,
    dangling symlinks, sub-folders (not searched) and special files.

    Raises:
        DataError: ``folder`` does not exist, is not a folder, or holds no image (the message
            names what was skipped).
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder (expected a folder of images)")
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise DataError(f"cannot list image folder {folder}: {e}") from None
    images: list[Path] = []
    others: list[Path] = []
    for p in entries:
        if p.name.startswith(".") or p.name.lower() in _OS_METADATA:
            continue
        if p.suffix.lower() in EXTENSIONS and p.is_file():
            images.append(p)
        else:
            others.append(p)
    stems = {p.stem for p in images}
    skipped = [(p, _skip_reason(p)) for p in others
               if not (p.suffix.lower() == ".txt" and p.stem in stems and p.is_file())]
    if not images:
        msg = (f"no images in {folder} (accepted file types: {', '.join(EXTENSIONS)}, any letter case; "
               "sub-folders are not searched)")
        if skipped:
            msg += f"; {skipped_files_message(folder, skipped)}"
        raise DataError(msg)
    return images, skipped


def _skip_reason(p: Path) -> str:
    if p.is_symlink() and not p.exists():
        return "dangling symlink"
    if p.is_dir():
        return "sub-folder, not searched"
    if not p.is_file():
        return "not a regular file"
    suffix = p.suffix.lower()
    if suffix in _UNSUPPORTED:
        return _UNSUPPORTED[suffix]
    accepted = ", ".join(EXTENSIONS)
    return f"not an image type we read; accepted: {accepted}" if suffix else f"no file extension; accepted: {accepted}"


def _shown(p: Path) -> str:
    """``p``'s name as printable text (undecodable bytes in a name become U+FFFD)."""
    name = p.name + ("/" if p.is_dir() else "")
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def skipped_files_message(folder: str | Path, skipped: list[tuple[Path, str]]) -> str:
    """One line naming the skipped entries grouped by reason, e.g. ``skipped 2 file(s) in photos:
    a.gif (GIF ...); b.heic (HEIC ...)``; at most a few names per reason, the rest counted."""
    by_reason: dict[str, list[Path]] = {}
    for p, reason in skipped:
        by_reason.setdefault(reason, []).append(p)
    parts = []
    for reason, paths in by_reason.items():
        names = ", ".join(_shown(p) for p in paths[:_MAX_NAMES])
        more = f" and {len(paths) - _MAX_NAMES} more" if len(paths) > _MAX_NAMES else ""
        parts.append(f"{names}{more} ({reason})")
    return f"skipped {len(skipped)} file(s) in {folder}: {'; '.join(parts)}"


def list_images(folder: str | Path, *, warn: bool = True) -> list[Path]:
    """The image files directly in ``folder`` (not in sub-folders), sorted by file name.

    Picks files whose suffix is one of :data:`EXTENSIONS`, case-insensitively. Hidden files
    (name starting with ".") are ignored: macOS leaves "._photo.jpg" resource-fork files next to
    copied photos, which are not images. Other entries that are not used (GIF/HEIC/... files,
    dangling symlinks, sub-folders; see :func:`scan_images`) are named in one
    :class:`SkippedFilesWarning` unless ``warn`` is False.

    Raises:
        DataError: ``folder`` does not exist, is not a folder, or holds no such image.
    """
    paths, skipped = scan_images(folder)
    if warn and skipped:
        warnings.warn(skipped_files_message(folder, skipped), SkippedFilesWarning, stacklevel=2)
    return paths


def _too_many_pixels(path: Path, error: Exception, size: int) -> str:
    """The message for Pillow's DecompressionBombError: the image is larger than its pixel limit."""
    import re

    from PIL import Image

    found = re.search(r"\((\d+) pixels\)", str(error))
    pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than allowed"
    limit = f"{2 * Image.MAX_IMAGE_PIXELS:,}" if Image.MAX_IMAGE_PIXELS else "its limit"
    return (f"image {path} is too large to open: {pixels}, over Pillow's limit of {limit} pixels (twice "
            "PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); resize it (e.g. to 4096 px on the "
            f"long side; training uses {size} px) and try again")


def default_min_side(size: int) -> int:
    """The smallest short side accepted for training at ``size`` px (``ceil(size / 4)``)."""
    return max(1, math.ceil(size * MIN_SIDE_FRACTION))


def load_image_uint8(
    path: str | Path,
    size: int,
    *,
    crop: CropMode = "center",
    rng: np.random.Generator | int | None = None,
    min_size: int | None = None,
) -> np.ndarray:
    """Load ``path`` as a ``(size, size, 3)`` uint8 RGB array, ready for training.

    Steps: apply the EXIF orientation; convert to RGB (alpha is composited on white; grey,
    palette, CMYK and 16/32-bit images are converted by value range; an embedded ICC profile is
    converted to sRGB); resize so the short side is ``size`` (LANCZOS, which low-passes when
    shrinking); crop ``size`` x ``size`` at the centre or at a position drawn from ``rng``.

    Args:
        crop: "center" or "random".
        rng: the generator (or seed) for ``crop="random"``; ``None`` draws fresh entropy, so pass
            one for reproducible crops. Unused for "center".
        min_size: the smallest short side (px) accepted before resizing; default
            :func:`default_min_side` of ``size``.

    Raises:
        DataError: the file cannot be read or decoded (corrupt, truncated, not an image, too many
            pixels), its colour mode is unsupported, or it is smaller than ``min_size``.
        ConfigError: ``size`` < 1 or ``crop`` is not one of the two modes.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if size < 1:
        raise ConfigError(f"image size must be >= 1 px, got {size}")
    if crop not in ("center", "random"):
        raise ConfigError(f"crop must be 'center' or 'random', got {crop!r}")
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, inside the try
            im = ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: not an image file, or a format Pillow cannot "
                        "decode") from None
    except Image.DecompressionBombError as e:
        raise DataError(_too_many_pixels(path, e, size)) from None
    except (OSError, ValueError, SyntaxError) as e:
        # OSError: truncated/corrupt data; SyntaxError: Pillow's plugins use it for broken headers.
        raise DataError(f"cannot read image {path}: {e} (is the file corrupt or truncated?)") from None
    w, h = im.size
    min_side = default_min_side(size) if min_size is None else min_size
    if min(w, h) < min_side:
        raise DataError(f"image {path} is too small: {w}x{h} px, but training at {size} px needs a "
                        f"short side of at least {min_side} px")
    im = to_rgb(im, path)
    im = _resize_short_side(im, size)
    w, h = im.size
    if crop == "random":
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        left, top = int(gen.integers(0, w - size + 1)), int(gen.integers(0, h - size + 1))
    else:
        left, top = (w - size) // 2, (h - size) // 2
    out = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    assert out.shape == (size, size, 3), out.shape  # internal invariant, not a user error
    return out


def load_image(
    path: str | Path,
    size: int,
    *,
    crop: CropMode = "center",
    rng: np.random.Generator | int | None = None,
    min_size: int | None = None,
) -> np.ndarray:
    """:func:`load_image_uint8` scaled to float32 in [-1, 1] (HWC), the model's input range.

    ``to_uint8(load_image(...))`` gives back exactly ``load_image_uint8(...)``.
    """
    return from_uint8(load_image_uint8(path, size, crop=crop, rng=rng, min_size=min_size))


def to_rgb(im: PILImage.Image, path: str | Path = "<image>") -> PILImage.Image:
    """``im`` converted to an 8-bit RGB image with the right colours.

    - 16-bit and 32-bit integer grey ("I;16*", "I") are scaled from 0..65535 to 0..255 (Pillow's
      own conversion clips instead, turning most 16-bit photos white); float "F" is read as
      0..1 if its maximum is <= 1, else as 0..255.
    - Transparency (RGBA, LA, PA, a palette with a transparent index, premultiplied modes) is
      composited on white, so cut-out subjects do not end up on black.
    - An embedded ICC profile (CMYK print profiles, Display P3 phone photos) is converted to
      sRGB; if the profile cannot be used, the plain conversion is used instead.

    Raises:
        DataError: the colour mode cannot be converted (the message names ``path``).
    """
    from PIL import Image

    icc = im.info.get("icc_profile")
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            scale = 1.0 if a.size and np.nanmax(a) <= 1.0 else 1.0 / 255.0
        else:  # 16-bit data, including the "I" mode older Pillow gives 16-bit PNGs
            scale = 1.0 / 65535.0
        im = Image.fromarray(np.round(np.clip(np.nan_to_num(a * scale), 0.0, 1.0) * 255.0).astype(np.uint8))
        icc = None  # a profile for the 16-bit data does not describe this 8-bit copy
    if im.mode == "1":
        im = im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")  # also un-premultiplies "La"/"RGBa"
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    if icc and im.mode in ("RGB", "CMYK", "L"):
        converted = _icc_to_srgb(im, icc)
        if converted is not None:
            return converted
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as e:
            raise DataError(f"image {path} has colour mode {im.mode!r}, which cannot be converted to "
                            f"RGB ({e}); save it as an 8-bit RGB JPEG or PNG") from None
    return im


def _icc_to_srgb(im: PILImage.Image, icc: bytes) -> PILImage.Image | None:
    """``im`` converted from its embedded profile to sRGB, or None if the profile is unusable."""
    try:
        from PIL import ImageCms
    except ImportError:  # Pillow built without littlecms
        return None
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        return ImageCms.profileToProfile(im, src, dst, renderingIntent=ImageCms.Intent.PERCEPTUAL,
                                         outputMode="RGB")
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
        # A broken or mismatched profile (e.g. a grey profile on RGB data) should not make a photo
        # unusable: the plain conversion is close, profile-less readers all show that.
        return None


def _resize_short_side(im: PILImage.Image, size: int) -> PILImage.Image:
    """``im`` resized (LANCZOS) so that its short side is exactly ``size``, aspect kept."""
    from PIL import Image

    w, h = im.size
    scale = size / min(w, h)
    new = (size, max(size, round(h * scale))) if w <= h else (max(size, round(w * scale)), size)
    return im if new == (w, h) else im.resize(new, Image.Resampling.LANCZOS)


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 images (any shape) as float32 in [-1, 1]: 0 -> -1.0, 255 -> 1.0."""
    return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] (any shape; NumPy or JAX) as uint8: rounded, out-of-range values clipped.

    Inverse of :func:`from_uint8` (exact on its outputs).
    """
    x = np.asarray(images, dtype=np.float32)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_image_grid(images: np.ndarray, path: str | Path, cols: int | None = None) -> Path:
    """Save uint8 images ``(N, H, W, 3)`` as one grid image (row-major; empty cells black).

    ``cols`` defaults to ``ceil(sqrt(N))``. The format follows the suffix of ``path`` (PNG is
    lossless); missing parent folders are created. Returns ``path``.

    Raises:
        ValueError: ``images`` is not a non-empty uint8 ``(N, H, W, 3)`` array, or ``cols`` < 1.
    """
    from PIL import Image

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3) with N >= 1, got {images.dtype} "
                         f"{images.shape}; convert [-1, 1] floats with to_uint8")
    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n)) if cols is None else cols
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


class InstanceDataset:
    """The validated images of one folder, preloaded at one resolution.

    Row order is deterministic: the images in :func:`list_images` order, then (``flip=True``)
    their horizontal mirrors in the same order. Both orientations are materialised because the
    VAE latents are computed once per row before training, so random flipping per step is not
    available later. With ``crop="random"`` each photo gets one crop drawn from ``seed``, and its
    mirror is the mirror of that crop.

    Attributes:
        paths: the source files, sorted.
        images: float32 ``(N, size, size, 3)`` in [-1, 1]; ``N = len(paths) * (2 if flip else 1)``.
        source_index: int ``(N,)``, the index into ``paths`` of each row.
        flipped: bool ``(N,)``, whether each row is mirrored.
    """

    def __init__(
        self,
        folder: str | Path,
        size: int,
        *,
        flip: bool = False,
        crop: CropMode = "center",
        seed: int = 0,
        min_size: int | None = None,
        min_images: int = MIN_INSTANCE_IMAGES,
    ) -> None:
        """Load every image of ``folder`` (see :func:`load_image`).

        Warns (:class:`FewImagesWarning`) when the folder holds fewer than ``min_images``, and
        (:class:`SkippedFilesWarning`, one warning) names the entries that are not used.

        Raises:
            DataError: as :func:`list_images` and :func:`load_image`; all files are checked.
        """
        self.folder = Path(folder)
        self.size = size
        self.paths, skipped = scan_images(self.folder)
        if skipped:
            warnings.warn(skipped_files_message(self.folder, skipped), SkippedFilesWarning, stacklevel=2)
        if len(self.paths) < min_images:
            warnings.warn(f"only {len(self.paths)} instance image(s) in {self.folder}; DreamBooth works "
                          f"best with {min_images}-5 photos of the subject from different views",
                          FewImagesWarning, stacklevel=2)
        rng = np.random.default_rng(seed)
        loaded = [load_image_uint8(p, size, crop=crop, rng=rng, min_size=min_size) for p in self.paths]
        n = len(loaded)
        if flip:
            loaded += [im[:, ::-1] for im in loaded]
        self.images: np.ndarray = from_uint8(np.stack(loaded))
        self.source_index: np.ndarray = np.tile(np.arange(n), 2 if flip else 1)
        self.flipped: np.ndarray = np.arange(len(loaded)) >= n

    def __len__(self) -> int:
        """Number of rows (images, plus mirrors with ``flip=True``)."""
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        """Row ``i`` of :attr:`images`."""
        return self.images[i]

    def __repr__(self) -> str:
        return (f"InstanceDataset({str(self.folder)!r}, size={self.size}, images={len(self.paths)}, "
                f"rows={len(self)})")


def batch_indices(num_items: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The item indices of training step ``step``: int64 ``(batch_size,)``.

    The stream of items is a sequence of epochs, each a permutation of ``range(num_items)``
    seeded by ``(seed, epoch)``; step ``s`` takes positions ``s*batch_size .. (s+1)*batch_size-1``
    of that stream (a batch may span two epochs; with ``batch_size > num_items`` items repeat).
    A pure function of its arguments, so a run resumed at step ``s`` sees exactly the batches
    an uninterrupted run would have seen.

    Raises:
        ValueError: ``num_items`` or ``batch_size`` < 1, ``step`` or ``seed`` < 0.
    """
    if num_items < 1:
        raise DataError(f"no examples to draw a batch from (num_items={num_items})")
    if batch_size < 1 or step < 0 or seed < 0:
        raise ValueError(f"need batch_size >= 1, step >= 0, seed >= 0; got {batch_size}, {step}, {seed}")
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, num_items)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        # SeedSequence([seed, epoch]) gives independent, platform-stable streams per epoch.
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_items)
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out


__all__ = (
    "EXTENSIONS", "MIN_INSTANCE_IMAGES", "MIN_SIDE_FRACTION", "CropMode", "DataError", "FewImagesWarning",
    "InstanceDataset", "SkippedFilesWarning", "batch_indices", "default_min_side", "from_uint8", "list_images",
    "load_image", "load_image_uint8", "save_image_grid", "scan_images", "skipped_files_message", "to_rgb",
    "to_uint8",
)
