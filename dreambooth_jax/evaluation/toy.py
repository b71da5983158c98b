"""The toy world's evaluator: a small CNN that plays the roles of the paper's metrics.

DreamBooth measures subject fidelity with DINO / CLIP-I, prompt (context) fidelity with CLIP-T,
prior preservation with PRES and diversity with DIV. In the toy world the renderer knows the truth
of every photo, so one tiny classifier trained on fresh renders stands in for all of them: heads for
class, color (+ the subject's pseudo-color), context and "is this the subject", and a 64-d
L2-normalised embedding for feature similarities. Metrics are plain numpy on ``evaluate``'s output.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageFilter

from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.models.convert import read_safetensors, write_safetensors
from dreambooth_jax.toy import world

DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / "assets" / "toy" / "evaluator"
SIZE = 32  # every toy photo is judged at the base model's resolution
HEADS = ("cls", "color", "context", "subject")
WEIGHTS = "model.safetensors"


def _labels() -> dict:
    return {"classes": list(world.CLASSES), "colors": list(world.COLORS) + [world.SUBJECT],
            "contexts": list(world.CONTEXTS)}


class ToyEvaluator(nnx.Module):
    """NHWC images in [-1, 1] -> {'cls', 'color', 'context', 'subject'} logits and 'embedding'.

    Three stages of (conv3x3, conv3x3 stride 2), each followed by GroupNorm + SiLU, then global
    average pooling, a linear layer to ``embed_dim`` features (the embedding, before L2
    normalisation) and one linear head per label.
    """

    def __init__(self, channels=(24, 48, 96), embed_dim: int = 64, groups: int = 8, *, rngs: nnx.Rngs):
        self.channels, self.embed_dim, self.groups = tuple(channels), embed_dim, groups
        convs, norms, cin = [], [], 3
        for c in self.channels:
            for stride in (1, 2):
                convs.append(nnx.Conv(cin, c, (3, 3), strides=stride, rngs=rngs))
                norms.append(nnx.GroupNorm(c, num_groups=groups, rngs=rngs))
                cin = c
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.proj = nnx.Linear(cin, embed_dim, rngs=rngs)
        lab = _labels()
        sizes = {"cls": len(lab["classes"]), "color": len(lab["colors"]), "context": len(lab["contexts"]), "subject": 2}
        self.heads = nnx.Dict({k: nnx.Linear(embed_dim, n, rngs=rngs) for k, n in sizes.items()})

    def config(self) -> dict:
        return {"channels": list(self.channels), "embed_dim": self.embed_dim, "groups": self.groups, "image_size": SIZE}

    def __call__(self, x):
        maps = []
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = nnx.silu(norm(conv(x)))
            if i % 2:  # the output of each stage (16x16, 8x8, 4x4): the perceptual distance's features
                maps.append(x)
        feat = self.proj(x.mean(axis=(1, 2)))
        out = {k: self.heads[k](nnx.silu(feat)) for k in HEADS}
        out["embedding"] = feat / jnp.sqrt(jnp.sum(feat**2, -1, keepdims=True) + 1e-12)
        out.update({f"map{i}": m for i, m in enumerate(maps)})
        return out


# ----------------------------------------------------------------------------- data
def _photos(scenes) -> np.ndarray:
    """Rendered at 128 and downsampled, like every 32 px photo of the project."""
    return world.downsample(np.stack([world.render(sc, 128) for sc in scenes]), SIZE)


def _targets(scenes) -> dict:
    lab = _labels()
    return {"cls": np.array([lab["classes"].index(s.cls) for s in scenes], np.int32),
            "color": np.array([lab["colors"].index(s.color) for s in scenes], np.int32),
            "context": np.array([lab["contexts"].index(s.context) for s in scenes], np.int32),
            "subject": np.array([s.color == world.SUBJECT for s in scenes], np.int32)}


def labelled_set(n: int, n_subject: int, seed: int) -> tuple[np.ndarray, dict]:
    """``n`` random scenes + ``n_subject`` subject scenes in all contexts: uint8 photos, int labels."""
    rng = np.random.default_rng(seed)
    scenes = [world.random_scene(rng) for _ in range(n)]
    scenes += world.subject_scenes(n_subject, seed + 1, contexts=tuple(world.CONTEXTS))
    return _photos(scenes), _targets(scenes)


def _augment(key, x):
    """Blur, shift, flip, brightness/contrast and noise, per sample, so that the evaluator judges
    blurry or noisy generated samples by their content and not by their sharpness."""
    n, h, w, _ = x.shape
    ks = jax.random.split(key, 7)
    u = lambda k, lo, hi, shape=(n, 1, 1, 1): jax.random.uniform(k, shape, minval=lo, maxval=hi)  # noqa: E731
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = ((x - mean) * u(ks[0], 0.9, 1.1) + mean + 1) * u(ks[1], 0.9, 1.1) - 1  # contrast, brightness
    # separable gaussian blur, sigma ~ U(0, 1.2) px, 7 taps (sigma -> 0 is the identity)
    sigma = u(ks[2], 0.0, 1.2, (n, 1))
    taps = jnp.exp(-jnp.arange(-3, 4.0) ** 2 / (2 * jnp.maximum(sigma, 1e-3) ** 2))
    taps = taps / taps.sum(-1, keepdims=True)
    pad = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)), mode="edge")
    pad = sum(taps[:, i, None, None, None] * pad[:, i:i + h] for i in range(7))
    x = sum(taps[:, i, None, None, None] * pad[:, :, i:i + w] for i in range(7))
    # shifts by up to 2 px (edge padding), horizontal flips
    pad = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    off = jax.random.randint(ks[3], (n, 2), 0, 5)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, 3)))(pad, off)
    x = jnp.where(jax.random.bernoulli(ks[4], 0.5, (n, 1, 1, 1)), x[:, :, ::-1], x)
    return jnp.clip(x, -1, 1) + u(ks[5], 0.0, 0.1) * jax.random.normal(ks[6], x.shape)  # noise in [-1, 1] units


def _to_float(images_uint8) -> np.ndarray:
    return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------- training
def train_evaluator(steps: int = 1200, batch: int = 64, seed: int = 0, *, n_pool: int = 6000,
                    n_subject: int = 2000, lr: float = 2e-3, log=print) -> ToyEvaluator:
    """Train on a pool of fresh renders (random scenes + the subject in all six contexts)."""
    t0 = time.perf_counter()
    pool_x, pool_y = labelled_set(n_pool, 0, seed + 100)
    subj_x, subj_y = labelled_set(0, n_subject, seed + 200)
    log(f"rendered {n_pool} + {n_subject} training photos in {time.perf_counter() - t0:.0f}s")
    pool_x, subj_x = _to_float(pool_x), _to_float(subj_x)

    model = ToyEvaluator(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr * 0.02)
    tx = optax.adamw(sched, weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key, x, y):
        def loss_fn(p):
            out = nnx.merge(graphdef, p)(_augment(key, x))
            losses = {k: optax.softmax_cross_entropy_with_integer_labels(out[k], y[k]).mean() for k in HEADS}
            acc = {k: (out[k].argmax(-1) == y[k]).mean() for k in HEADS}
            return sum(losses.values()), acc

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    n_pos = batch // 4  # the subject head sees ~25% positives
    t0, hist = time.perf_counter(), []
    for i in range(steps):
        a, b = rng.integers(len(pool_x), size=batch - n_pos), rng.integers(len(subj_x), size=n_pos)
        x = np.concatenate([pool_x[a], subj_x[b]])
        y = {k: np.concatenate([pool_y[k][a], subj_y[k][b]]) for k in HEADS}
        params, opt_state, loss, acc = step(params, opt_state, jax.random.fold_in(key, i), x, y)
        hist.append((float(loss), {k: float(v) for k, v in acc.items()}))
        if (i + 1) % 100 == 0 or i + 1 == steps:
            recent = hist[-100:]
            accs = " ".join(f"{k}={np.mean([h[1][k] for h in recent]):.3f}" for k in HEADS)
            log(f"step {i + 1}/{steps} loss={np.mean([h[0] for h in recent]):.4f} train acc {accs} "
                f"({time.perf_counter() - t0:.0f}s)")
    return nnx.merge(graphdef, params)


def held_out_accuracy(model: ToyEvaluator, n: int = 600, n_subject: int = 200, seed: int = 900_001,
                      blur_sigma: float = 1.0) -> dict:
    """Accuracy per head on fresh renders (a seed never trained on), clean and gaussian-blurred."""
    images, y = labelled_set(n, n_subject, seed)
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(blur_sigma))) for im in images])
    res = {}
    for name, ims in (("clean", images), ("blurred", blurred)):
        out = evaluate(model, ims)
        res[name] = {k: round(float((out[k].argmax(-1) == y[k]).mean()), 4) for k in HEADS}
    res.update(n=n, n_subject=n_subject, seed=seed, blur_sigma=blur_sigma)
    return res


# ----------------------------------------------------------------------------- save / load
def save_evaluator(model: ToyEvaluator, folder, extra: dict | None = None) -> Path:
    """Weights as ``model.safetensors`` (dotted NNX paths) + ``config.json`` (architecture, labels, extra)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    write_safetensors(folder / WEIGHTS, tensors)
    config = {"architecture": model.config(), **_labels(), **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return folder


def load_evaluator(folder=None) -> ToyEvaluator:
    """Load a saved evaluator (default: the shipped one). Raises CheckpointError naming the folder."""
    folder = Path(folder) if folder is not None else DEFAULT_FOLDER
    try:
        config = json.loads((folder / "config.json").read_text())
        arch = config["architecture"]
        model = ToyEvaluator(arch["channels"], arch["embed_dim"], arch["groups"], rngs=nnx.Rngs(0))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"no usable toy evaluator in {folder}: config.json is missing or invalid ({e})") from e
    if any(config.get(k) != v for k, v in _labels().items()):
        raise CheckpointError(f"the toy evaluator in {folder} was trained for other labels than the current toy world")
    tensors = read_safetensors(folder / WEIGHTS)  # raises CheckpointError naming the file
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    wanted = {".".join(map(str, p)): (p, v) for p, v in flat}
    if set(tensors) != set(wanted) or any(tensors[k].shape != v.shape for k, (_, v) in wanted.items()):
        raise CheckpointError(f"the weights in {folder / WEIGHTS} do not match its config.json")
    nnx.update(model, nnx.from_flat_state([(p, v.replace(value=jnp.asarray(tensors[k]))) for k, (p, v) in wanted.items()]))
    return model


# ----------------------------------------------------------------------------- evaluation
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    out = nnx.merge(graphdef, state)(x)
    return {k: jax.nn.softmax(out[k]) if k in HEADS else out[k] for k in out}


def evaluate(model: ToyEvaluator, images_uint8, batch: int = 64) -> dict[str, np.ndarray]:
    """Probabilities per head (``cls``, ``color``, ``context``, ``subject``), ``embedding``, and
    the feature maps ``map0..map2`` of the three stages (for ``perceptual_distance``).

    images: uint8 (N, H, W, 3) of any size; resized to 32x32 with anti-aliasing (LANCZOS) first.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
    if images.shape[1:3] != (SIZE, SIZE):
        images = world.downsample(images, SIZE)
    x = _to_float(images)
    n = len(x)
    x = np.concatenate([x, np.zeros(((-n) % batch, SIZE, SIZE, 3), np.float32)])  # one compiled shape
    graphdef, state = nnx.split(model)
    outs = [_forward(graphdef, state, x[i:i + batch]) for i in range(0, len(x), batch)]
    return {k: np.concatenate([np.asarray(o[k]) for o in outs])[:n] for k in outs[0]} if outs else {}


# ----------------------------------------------------------------------------- metrics
def subject_fidelity(out) -> float:
    """Mean P(subject) over the samples: how much they show the subject (the DINO / CLIP-I role)."""
    return float(np.mean(out["subject"][:, 1]))


def subject_similarity(out, ref_out) -> float:
    """Mean cosine similarity between each sample's embedding and the mean embedding of the real
    subject photos ``ref_out`` (DINO-style feature similarity)."""
    ref = np.mean(ref_out["embedding"], axis=0)
    e = out["embedding"] / np.linalg.norm(out["embedding"], axis=-1, keepdims=True)
    return float(np.mean(e @ (ref / np.linalg.norm(ref))))


def context_fidelity(out, context_names) -> float:
    """Mean probability of the prompted context, one context name per image, or one for all
    (the CLIP-T role: does the sample show what the prompt asked for)."""
    n = len(out["context"])
    names = [context_names] * n if isinstance(context_names, str) else list(context_names)
    if len(names) != n:
        raise ValueError(f"{len(names)} context names for {n} images")
    idx = [list(world.CONTEXTS).index(c) for c in names]
    return float(np.mean(out["context"][np.arange(n), idx]))


def class_fidelity(out, class_name: str) -> float:
    """Mean P(class_name) over the samples."""
    return float(np.mean(out["cls"][:, list(world.CLASSES).index(class_name)]))


def pres(out) -> float:
    """PRES (prior preservation): the mean P(subject) of samples of the *class* prompt ("a photo of
    a box") from the fine-tuned model. High PRES means the subject leaked into its class (language
    drift); lower is better."""
    return subject_fidelity(out)


def div(out_groups) -> float:
    """DIV: the mean over prompts of the mean pairwise (1 - cosine similarity) of the embeddings of
    the samples of that prompt (the paper uses LPIPS distances; this is the toy analogue).
    ``out_groups``: one ``evaluate`` output per prompt, each with at least two samples."""
    scores = []
    for out in out_groups:
        e = out["embedding"] / np.linalg.norm(out["embedding"], axis=-1, keepdims=True)
        n = len(e)
        if n < 2:
            raise ValueError("DIV needs at least two samples per prompt")
        iu = np.triu_indices(n, k=1)
        scores.append(np.mean(1.0 - (e @ e.T)[iu]))
    return float(np.mean(scores))


def perceptual_distance(a: dict, b: dict) -> np.ndarray:
    """LPIPS-style distance between two ``evaluate`` outputs of the same length, per pair: at each
    position of each stage's feature map the channel vector is unit-normalised, the squared
    difference is averaged over positions, then over the three stages (LPIPS learns per-channel
    weights; here they are uniform). Unlike the pooled embedding it sees layout: where the object
    is, its size and pose, the background."""
    total = 0.0
    keys = sorted(k for k in a if k.startswith("map"))
    for k in keys:
        fa = a[k] / np.sqrt(np.sum(a[k] ** 2, -1, keepdims=True) + 1e-10)
        fb = b[k] / np.sqrt(np.sum(b[k] ** 2, -1, keepdims=True) + 1e-10)
        total = total + np.mean(np.sum((fa - fb) ** 2, -1), axis=(1, 2))
    return total / len(keys)


def perceptual_div(out_groups) -> float:
    """DIV as the paper computes it, with ``perceptual_distance`` in the place of LPIPS: the mean
    over prompts of the mean distance over all pairs of samples of that prompt."""
    scores = []
    for out in out_groups:
        n = len(out["embedding"])
        if n < 2:
            raise ValueError("DIV needs at least two samples per prompt")
        i, j = np.triu_indices(n, k=1)
        scores.append(np.mean(perceptual_distance({k: v[i] for k, v in out.items()}, {k: v[j] for k, v in out.items()})))
    return float(np.mean(scores))
