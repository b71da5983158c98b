"""The encoders the paper's metrics need, loaded from the user's checkpoints and jitted in batches.

* DINO: a ViT (transformers' ``ViTModel`` layout, e.g. ``facebook/dino-vits16``): the CLS token of
  the last hidden state, after the processor of the checkpoint folder;
* CLIP (``CLIPModel`` layout, e.g. ``openai/clip-vit-base-patch32``): projected image and text
  embeddings; the text through the folder's own tokenizer (the package's CLIP BPE when absent);
* LPIPS: :mod:`dreambooth_jax.models.lpips` from a safetensors file (scripts/convert_lpips.py).

Each forward is one ``jax.jit`` per batch shape; batches are padded to a fixed size (one compile)
and split over the local devices (data parallel) when the batch divides. Matmuls run at float32
("highest") precision on every backend: the metrics are compared with numbers computed in float32.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.errors import ConfigError

BATCH = 16  # images per encoder call


@dataclasses.dataclass
class Encoders:
    """uint8 images / strings in, float64 numpy embeddings or distances out."""

    dino: Callable[[Sequence[np.ndarray]], np.ndarray]  # images -> (N, D)
    clip_image: Callable[[Sequence[np.ndarray]], np.ndarray]  # images -> (N, E)
    clip_text: Callable[[Sequence[str]], np.ndarray]  # texts -> (N, E)
    lpips: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (N, H, W, 3) x 2 uint8 -> (N,)
    names: dict  # what produced the numbers (for metrics.md)


def batched(model, fn: Callable, batch: int = BATCH, mesh=None) -> Callable[[np.ndarray], np.ndarray]:
    """``fn(model, x)`` jitted with the model's weights as an argument (not baked into the program
    as constants), applied to fixed-size, zero-padded batches of a (N, ...) array; with a mesh the
    weights are replicated and each batch split over its devices."""
    from flax import nnx

    from dreambooth_jax.sharding import batch_sharding, replicated

    graphdef, state = nnx.split(model)
    call = jax.jit(lambda st, x: fn(nnx.merge(graphdef, st), x))
    if mesh is not None:
        state = jax.device_put(state, replicated(mesh))
    place = (lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim))) if mesh is not None else jnp.asarray
    jitted = lambda x: call(state, place(x))  # noqa: E731

    def run(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        out = []
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            pad = batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            with jax.default_matmul_precision("highest"):
                out.append(np.asarray(jitted(chunk), np.float64)[:batch - pad])
        return np.concatenate(out)

    return run


def _folder(arg: str, option: str) -> Path:
    from dreambooth_jax.models.hub import resolve_model_path

    if not arg:
        raise ConfigError(f"{option} is empty: name the encoder's folder or hub id")
    return _with_option(option, lambda: Path(resolve_model_path(arg)))


def _with_option(option: str, fn: Callable):
    """Call a loader; its error (a config of the wrong kind, missing weights...) names the option too."""
    from dreambooth_jax.errors import DreamboothError

    try:
        return fn()
    except DreamboothError as e:
        raise type(e)(f"{option}: {e}") from e


def _clip_tokenizer(folder: Path):
    from dreambooth_jax.models.loading import default_tokenizer, load_tokenizer

    for sub in (folder, folder / "tokenizer"):
        if (sub / "vocab.json").is_file() or (sub / "tokenizer.json").is_file():
            return load_tokenizer(sub), str(sub)
    return default_tokenizer(), "the package's CLIP BPE (the folder has no tokenizer files)"


def load_dino(arg: str, mesh=None) -> tuple[Callable, str]:
    from dreambooth_jax.evaluation.preprocess import load_preprocessor
    from dreambooth_jax.models.vit import load_vit

    folder = _folder(arg, "--dino")
    model = _with_option("--dino", lambda: load_vit(folder))
    prep = _with_option("--dino", lambda: load_preprocessor(folder, "vit"))
    run = batched(model, lambda m, x: m.cls_embedding(x), mesh=mesh)
    return (lambda images: run(prep(images))), f"{arg} (ViT CLS token, {model.config.hidden_size}-d)"


def load_clip_encoders(arg: str, mesh=None) -> tuple[Callable, Callable, str]:
    from dreambooth_jax.evaluation.preprocess import load_preprocessor
    from dreambooth_jax.models.clip_vision import load_clip
    from dreambooth_jax.models.loading import tokenize

    folder = _folder(arg, "--clip")
    model = _with_option("--clip", lambda: load_clip(folder))
    prep = _with_option("--clip", lambda: load_preprocessor(folder, "clip"))
    tok, tok_name = _clip_tokenizer(folder)
    images = batched(model, lambda m, x: m.image_embeds(x), mesh=mesh)
    texts = batched(model, lambda m, ids: m.text_embeds(ids), mesh=mesh)
    return (lambda imgs: images(prep(imgs))), (lambda t: texts(tokenize(tok, list(t)))), f"{arg} (tokenizer: {tok_name})"


def load_lpips_distance(path: str, mesh=None) -> tuple[Callable, str]:
    from dreambooth_jax.models.lpips import load_lpips

    if not path:
        raise ConfigError("--lpips is empty: name the LPIPS safetensors file (scripts/convert_lpips.py writes it)")
    model = _with_option("--lpips", lambda: load_lpips(path))
    run = batched(model, lambda m, ab: m(ab[:, 0].astype(jnp.float32) / 127.5 - 1.0,
                                         ab[:, 1].astype(jnp.float32) / 127.5 - 1.0), mesh=mesh)

    def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ValueError(f"LPIPS pairs need equal shapes, got {a.shape} and {b.shape}")
        return run(np.stack([a, b], axis=1))

    return distance, f"{path} (LPIPS {getattr(model, 'net', '')})".replace(" )", ")")


def load_encoders(dino: str, clip: str, lpips: str, mesh=None) -> Encoders:
    """The three encoders (batches of BATCH split over ``mesh``'s devices when given); each bad
    argument is an error naming its option."""
    dino_fn, dino_name = load_dino(dino, mesh)
    clip_img, clip_txt, clip_name = load_clip_encoders(clip, mesh)
    lpips_fn, lpips_name = load_lpips_distance(lpips, mesh)
    return Encoders(dino=dino_fn, clip_image=clip_img, clip_text=clip_txt, lpips=lpips_fn,
                    names={"DINO": dino_name, "CLIP": clip_name, "LPIPS": lpips_name})
