"""LPIPS v0.1 (Zhang et al. 2018, the ``lpips`` package) in Flax NNX, for the DreamBooth DIV metric.

DIV, the DreamBooth paper's diversity score, is the mean LPIPS distance between pairs of images
generated from the same prompt. We compute LPIPS exactly as ``lpips.LPIPS(net=..., version='0.1')``
does in eval mode (``spatial=False``, ``lpips=True``):

1. ``ScalingLayer``: ``(x - shift) / scale`` per RGB channel (input in [-1, 1]);
2. the torchvision backbone's ``features`` up to five taps (AlexNet: relu1..relu5; VGG16:
   relu1_2, relu2_2, relu3_3, relu4_3, relu5_3);
3. per tap, ``normalize_tensor``: divide by the L2 norm over channels plus 1e-10;
4. squared difference of the two images' maps, the learned linear head ``lin{k}`` (a 1x1 conv
   to one channel, no bias; its Dropout is identity in eval mode), then the spatial mean;
5. the sum over taps: one distance per pair.

Weights file (made once by ``scripts/convert_lpips.py`` from the ``lpips`` package's head file
and torchvision's ImageNet checkpoint; read here without unpickling). One safetensors file,
float32, PyTorch layouts, keys named as in the two PyTorch modules:

* ``features.{i}.weight`` (out, in, k, k) and ``features.{i}.bias`` (out,): torchvision's
  ``alexnet().features[i]`` / ``vgg16().features[i]`` for every conv ``i`` before the last tap
  (AlexNet: 0, 3, 6, 8, 10; VGG16: 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28);
* ``lin{k}.model.1.weight`` (1, C_k, 1, 1), k = 0..4: lpips' heads, as in its ``.pth`` files;
* metadata ``lpips_net`` ('alex' or 'vgg') and ``lpips_version`` ('0.1').

``checkpoint_shapes(net)`` lists exactly these keys and shapes. Images are NHWC.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models.convert import read_safetensors, torch_to_state
from dreambooth_jax.models.options import ModelOptions

VERSION = "0.1"
META_NET, META_VERSION = "lpips_net", "lpips_version"

# torchvision's ``features`` Sequential, layer for layer: ("conv", cin, cout, kernel, stride,
# padding), ("relu",), ("pool", kernel, stride). Only the layers up to the last tap are kept.
_ALEX = (("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
         ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
         ("conv", 192, 384, 3, 1, 1), ("relu",),
         ("conv", 384, 256, 3, 1, 1), ("relu",),
         ("conv", 256, 256, 3, 1, 1), ("relu",))


def _vgg16_layers() -> tuple:
    layers, cin = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(("pool", 2, 2))
        else:
            layers += [("conv", cin, v, 3, 1, 1), ("relu",)]
            cin = v
    return tuple(layers)


# net -> (layers, end index of each lpips slice (the tap is that layer's output), tap channels)
NETS = {
    "alex": (_ALEX, (2, 5, 8, 10, 12), (64, 192, 384, 256, 256)),
    "vgg": (_vgg16_layers(), (4, 9, 16, 23, 30), (64, 128, 256, 512, 512)),
}
# lpips.ScalingLayer's buffers: ImageNet statistics expressed for inputs in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def check_net(net: str, source: str = "LPIPS") -> str:
    if net not in NETS:
        raise ConfigError(f"{source}: unknown LPIPS network {net!r} (supported: {', '.join(map(repr, NETS))})")
    return net


def checkpoint_shapes(net: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of an LPIPS weights file for ``net``: {key: shape} (PyTorch layouts)."""
    layers, _, chns = NETS[check_net(net)]
    out = {}
    for i, layer in enumerate(layers):
        if layer[0] == "conv":
            _, cin, cout, k, _, _ = layer
            out[f"features.{i}.weight"], out[f"features.{i}.bias"] = (cout, cin, k, k), (cout,)
    for k, c in enumerate(chns):
        out[f"lin{k}.model.1.weight"] = (1, c, 1, 1)
    return out


class ReLU(nnx.Module):
    def __call__(self, x):
        return jax.nn.relu(x)


class MaxPool(nnx.Module):
    """torch.nn.MaxPool2d(kernel, stride): no padding, floor mode."""

    def __init__(self, kernel: int, stride: int):
        self.kernel, self.stride = kernel, stride

    def __call__(self, x):
        return nnx.max_pool(x, (self.kernel, self.kernel), strides=(self.stride, self.stride), padding="VALID")


class Identity(nnx.Module):
    """Holds the place of lpips' (eval-mode) Dropout, so the head conv keeps its index 1."""

    def __call__(self, x):
        return x


def _conv(cin, cout, k, stride, pad, opts, precision, rngs, use_bias=True):
    # torch.nn.Conv2d semantics (symmetric integer padding), NHWC
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                    use_bias=use_bias, dtype=opts.dtype, param_dtype=opts.param_dtype,
                    precision=precision, rngs=rngs)


class NetLinLayer(nnx.Module):
    """lpips.NetLinLayer: (Dropout,) 1x1 conv to one channel without bias."""

    def __init__(self, channels: int, opts: ModelOptions, precision, *, rngs: nnx.Rngs):
        self.model = nnx.List([Identity(), _conv(channels, 1, 1, 1, 0, opts, precision, rngs, use_bias=False)])

    def __call__(self, x):
        return self.model[1](self.model[0](x))


class LPIPS(nnx.Module):
    """LPIPS v0.1 distance with the AlexNet ('alex', lpips' default) or VGG16 ('vgg') backbone.

    ``model(x0, x1)`` -> (N,) float32 for image pairs (N, H, W, 3) in [-1, 1]; d(x, x) is exactly 0
    and d(x, y) == d(y, x) exactly. Pure and jit-able (``nnx.jit``, or split/merge as
    ``lpips_distance`` does). For DIV, ``embed`` each image once (jitted) and compare the pairs
    with ``distance_between``, instead of running the backbone twice per pair.

    precision: of the backbone and head convs. 'highest' by default, so that the metric does not
    depend on the accelerator's default (TF32 on GPU, bf16 passes on TPU keep 10 / 7 mantissa bits).
    """

    def __init__(self, net: str = "alex", opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs,
                 precision: str | None = "highest"):
        layers, self.taps, chns = NETS[check_net(net)]
        self.net = net
        self.compute_dtype = opts.dtype
        mods = []
        for layer in layers:
            if layer[0] == "conv":
                _, cin, cout, k, stride, pad = layer
                mods.append(_conv(cin, cout, k, stride, pad, opts, precision, rngs))
            else:
                mods.append(ReLU() if layer[0] == "relu" else MaxPool(*layer[1:]))
        self.features = nnx.List(mods)
        # attribute names lin0..lin4, as lpips names its heads (and so the weight file's keys)
        for k, c in enumerate(chns):
            setattr(self, f"lin{k}", NetLinLayer(c, opts, precision, rngs=rngs))

    def tap_features(self, x: jax.Array, *, normalize: bool = False) -> list[jax.Array]:
        """The five backbone feature maps (float32, NHWC, not yet channel-normalized) of images
        (N, H, W, 3) in [-1, 1]; ``normalize=True`` takes [0, 1] instead (lpips' flag)."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects RGB images (N, H, W, 3), got shape {x.shape}")
        x = jnp.asarray(x, jnp.float32)
        if normalize:
            x = 2 * x - 1
        x = (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
        h, feats, start = x.astype(self.compute_dtype), [], 0
        for end in self.taps:
            for layer in self.features[start:end]:
                h = layer(h)
            start = end
            if h.shape[1] == 0 or h.shape[2] == 0:
                raise ValueError(f"images of {x.shape[1]}x{x.shape[2]} pixels are too small for LPIPS "
                                 f"'{self.net}' (nothing is left after {len(feats) + 1} slice(s))")
            feats.append(h.astype(jnp.float32))
        return feats

    def embed(self, x: jax.Array, *, normalize: bool = False) -> tuple[jax.Array, ...]:
        """The five channel-normalized feature maps (float32, NHWC) of images (N, H, W, 3), the
        inputs of ``distance_between``."""
        return tuple(_unit(f) for f in self.tap_features(x, normalize=normalize))

    def distance_between(self, f0, f1, *, per_layer: bool = False) -> jax.Array:
        """Distances (N,) between two ``embed`` outputs; (N, 5), one column per tap, if per_layer."""
        return self._heads([(a - b) ** 2 for a, b in zip(f0, f1)], per_layer)

    def __call__(self, x0: jax.Array, x1: jax.Array, *, normalize: bool = False,
                 per_layer: bool = False) -> jax.Array:
        """LPIPS distance of each pair: x0, x1 (N, H, W, 3) in [-1, 1] -> (N,) float32."""
        if x0.shape != x1.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {x0.shape} and {x1.shape}")
        # One compiled body (lax.map's loop) embeds x0, then x1: identical images get bitwise
        # identical features, so d(x, x) is exactly 0 and d(x, y) == d(y, x) exactly. Two inlined
        # passes, or one pass over the concatenated batch, do not promise that: XLA fuses each
        # copy its own way, or vectorizes batch rows differently, and they round differently
        # (measured on CPU: d(x, x) ~ 1e-17 instead of 0, float32 and bfloat16 alike).
        feats = jax.lax.map(lambda x: self.embed(x, normalize=normalize), jnp.stack([x0, x1]))
        diffs = [(u[0] - u[1]) ** 2 for u in feats]
        return self._heads(diffs, per_layer)

    def _heads(self, diffs, per_layer: bool) -> jax.Array:
        cols = [jnp.mean(getattr(self, f"lin{k}")(d.astype(self.compute_dtype)).astype(jnp.float32), axis=(1, 2, 3))
                for k, d in enumerate(diffs)]
        if per_layer:
            return jnp.stack(cols, axis=-1)
        out = cols[0]
        for c in cols[1:]:  # lpips adds the taps one by one, in order (val += res[l])
            out = out + c
        return out


def _unit(f: jax.Array) -> jax.Array:
    """lpips.normalize_tensor over the channel axis: the eps is added to the norm, not under the root."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)


@functools.partial(jax.jit, static_argnums=0)
def _distance(graphdef, state, x0, x1):
    return nnx.merge(graphdef, state)(x0, x1)


def lpips_distance(model: LPIPS, x0, x1, *, batch_size: int = 16) -> np.ndarray:
    """``model(x0, x1)`` for any number of pairs, jitted, in chunks of ``batch_size`` pairs (the
    last one zero-padded, so one program is compiled per image size). Returns (N,) float32."""
    x0, x1 = np.asarray(x0, np.float32), np.asarray(x1, np.float32)
    if x0.shape != x1.shape or x0.ndim != 4:
        raise ValueError(f"expected two image batches (N, H, W, 3) of one shape, got {x0.shape} and {x1.shape}")
    n = len(x0)
    graphdef, state = nnx.split(model)
    pad = lambda a: np.concatenate([a, np.zeros(((-n) % batch_size,) + a.shape[1:], np.float32)])
    x0, x1 = pad(x0), pad(x1)
    outs = [np.asarray(_distance(graphdef, state, x0[i:i + batch_size], x1[i:i + batch_size]))
            for i in range(0, len(x0), batch_size)]
    return np.concatenate(outs)[:n] if outs else np.zeros((0,), np.float32)


def load_lpips(path: str | Path, opts: ModelOptions = ModelOptions(), *, net: str | None = None,
               precision: str | None = "highest") -> LPIPS:
    """An LPIPS model from a weights file made by ``scripts/convert_lpips.py`` (see the module doc).

    net: the network the caller expects ('alex' or 'vgg'); None accepts the file's. Raises
    ConfigError naming the file when it is missing, damaged, not an LPIPS file, holds another
    network than ``net``, or its tensors do not match its network.
    """
    path = Path(path)
    if net is not None:
        check_net(net, f"LPIPS weights {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not an LPIPS weights file (.safetensors made by scripts/convert_lpips.py)")
    if not path.is_file():
        raise ConfigError(f"LPIPS weights file {path} does not exist; make it once with "
                          "scripts/convert_lpips.py (from the lpips package's heads and torchvision's weights)")
    try:
        tensors = read_safetensors(path)
    except CheckpointError as e:
        raise ConfigError(f"LPIPS weights: {e}") from None
    found = tensors.metadata.get(META_NET)
    if found is None:
        raise ConfigError(f"{path} is not an LPIPS weights file (no '{META_NET}' in its safetensors metadata); "
                          "make one with scripts/convert_lpips.py")
    check_net(found, str(path))
    if net is not None and found != net:
        raise ConfigError(f"{path} holds LPIPS '{found}' weights, but '{net}' was asked for")
    version = tensors.metadata.get(META_VERSION, VERSION)
    if version != VERSION:
        raise ConfigError(f"{path} holds LPIPS v{version} heads; only v{VERSION} is implemented")
    want, got = checkpoint_shapes(found), dict(tensors.shapes)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = sorted(k for k in want if k in got and tuple(got[k]) != want[k])
    if missing or extra or wrong:
        parts = ([f"missing {_some(missing)}"] if missing else []) + ([f"unexpected {_some(extra)}"] if extra else []) \
            + [f"{k} is {tuple(got[k])}, '{found}' needs {want[k]}" for k in wrong[:3]]
        raise ConfigError(f"{path} does not hold LPIPS '{found}' weights: {'; '.join(parts)}")
    abstract = nnx.eval_shape(lambda: LPIPS(found, opts, rngs=nnx.Rngs(0), precision=precision))
    graphdef, state = nnx.split(abstract)
    try:
        state = torch_to_state(tensors, state, source=str(path), dtype=np.dtype(opts.param_dtype))
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))


def _some(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")
