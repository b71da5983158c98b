"""LoRA adapters (Hu et al. 2021) on our Linear and Conv2d layers.

An adapted layer computes ``y = W x + scale * up(down(dropout(x)))`` with ``scale = alpha / rank``:
``down`` maps the layer's input to ``rank`` channels (for a conv: a conv with the base kernel's
size, stride and padding, as LoCon does), ``up`` maps them to the output channels (for a conv: a
1x1 conv). ``down`` starts Gaussian (std 1/rank, peft's ``init_lora_weights="gaussian"``, the
diffusers DreamBooth LoRA script's choice) and ``up`` at zero, so an adapted model computes exactly
what the base model does until the first update.

The delta is computed on its own path, never folded into the (possibly bf16) base weight during
training: a small update added to a bf16 weight would round away. ``merge_lora`` folds the adapters
into the weights in float32 for export and sampling.

Adapter weights are ``LoRAParam`` (a subclass of ``nnx.Param``), so ``nnx.split(model, LoRAParam,
...)`` separates them from the frozen base. Adapter paths are ``<module path>.lora.down`` /
``.lora.up``; module paths are diffusers' (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.errors import ConfigError


class LoRAParam(nnx.Param):
    """A trainable adapter weight."""


class LoRAKey(nnx.Variable):
    """The dropout key data (uint32 (2,)) of one adapter; the train step replaces it every step."""


# Presets of ``lora_targets`` (module-name suffixes, matched at a '.' boundary, as peft does).
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
# DeepFloyd IF's attention reads the text through these (added-KV attention); its presets include
# them, as diffusers' train_dreambooth_lora.py adapts them for IF.
UNET_ADDED_KV = ("add_k_proj", "add_v_proj")
PRESETS = {
    "attention": UNET_ATTENTION,  # diffusers' train_dreambooth_lora.py
    "attention+ff": UNET_ATTENTION + UNET_FEED_FORWARD,
    "all": ("*",),  # every Linear and Conv2d (LoCon-style)
}


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = UNET_ATTENTION
    dropout: float = 0.0
    init: str = "gaussian"  # gaussian down / zero up

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


def resolve_targets(targets: str | Sequence[str], model: nnx.Module | None = None) -> tuple[str, ...]:
    """A preset name, a comma-separated string or a list of module-name suffixes. With ``model``
    given, the attention presets also name its added-KV projections if it has them (IF)."""
    if isinstance(targets, str):
        if targets in PRESETS:
            extra = ()
            if targets != "all" and model is not None and any(
                    _matches(n, UNET_ADDED_KV[0]) for n in adaptable_modules(model)):
                extra = UNET_ADDED_KV
            return PRESETS[targets] + extra
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: list[str] = []
    for t in targets:
        out.extend(PRESETS.get(t, (t,)))
    return tuple(out)


class LoRA(nnx.Module):
    """The adapter of one Linear (kernel (in, out)) or Conv2d (kernel (kh, kw, in, out))."""

    def __init__(self, kernel_shape: tuple[int, ...], spec: LoRASpec, *, rng: np.random.Generator,
                 param_dtype=jnp.float32, index: int = 0):
        *window, cin, cout = kernel_shape
        r = spec.rank
        if spec.init != "gaussian":
            raise ConfigError(f"lora_init {spec.init!r} is not implemented (supported: 'gaussian')")
        # numpy draws: no XLA compile per kernel shape (jax.random would compile one per shape)
        down = rng.standard_normal((*window, cin, r), dtype=np.float32) / np.float32(r)
        self.down = LoRAParam(jnp.asarray(down, param_dtype))
        self.up = LoRAParam(jnp.zeros((*([1] * len(window)), r, cout), param_dtype))
        self.rank = r
        self.alpha = float(spec.rank if spec.alpha is None else spec.alpha)
        self.scale = self.alpha / r
        self.rate = float(spec.dropout)
        self.deterministic = True  # Module.train() turns dropout on
        self.key = LoRAKey(jnp.array([0, index], jnp.uint32)) if self.rate else None

    def __call__(self, x, dtype, conv=None):
        if self.rate and not self.deterministic:
            keep = jax.random.bernoulli(jax.random.wrap_key_data(self.key[...]), 1.0 - self.rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        down, up = self.down[...].astype(dtype), self.up[...].astype(dtype)
        x = x.astype(dtype)
        if conv is None:
            h = x @ down
            return (h @ up) * jnp.asarray(self.scale, dtype)
        strides, padding = conv
        h = jax.lax.conv_general_dilated(x, down, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.einsum("bhwr,ro->bhwo", h, up[0, 0]) * jnp.asarray(self.scale, dtype)

    def delta(self) -> jax.Array:
        """scale * the adapter as a weight of the base kernel's shape (float32)."""
        down, up = jnp.asarray(self.down[...], jnp.float32), jnp.asarray(self.up[...], jnp.float32)
        return self.scale * jnp.einsum("...ir,ro->...io", down, up.reshape(up.shape[-2:]),
                                       precision=jax.lax.Precision.HIGHEST)  # no TF32 / bf16 passes on GPU/TPU


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def adaptable_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """{diffusers module name: module} of every Linear / Conv2d that can carry an adapter."""
    from dreambooth_jax.models.layers import Conv2d, Linear

    return {_dotted(path): m for path, m in nnx.iter_modules(model) if isinstance(m, (Linear, Conv2d))}


def _matches(name: str, target: str) -> bool:
    return target == "*" or name == target or name.endswith("." + target)


def add_lora(model: nnx.Module, spec: LoRASpec, *, seed: int = 0, component: str = "unet") -> list[str]:
    """Attach adapters (in place) to every Linear/Conv2d of ``model`` whose name matches a target;
    returns the adapted module names. Targets matching nothing are a ConfigError listing names."""
    if spec.rank < 1:
        raise ConfigError(f"lora_rank must be >= 1 to add adapters, got {spec.rank}")
    modules = adaptable_modules(model)
    chosen = [n for n in modules if any(_matches(n, t) for t in spec.targets)]
    unmatched = [t for t in spec.targets if t != "*" and not any(_matches(n, t) for n in modules)]
    if unmatched or not chosen:
        suffixes = sorted({n.split(".")[-1] if not n.split(".")[-1].isdigit() else ".".join(n.split(".")[-2:])
                           for n in modules})
        raise ConfigError(f"lora_targets {', '.join(unmatched) or list(spec.targets)} match no layer of the {component} "
                          f"(layer names end in: {', '.join(suffixes)}; presets: {', '.join(PRESETS)})")
    for i, name in enumerate(chosen):
        m = modules[name]
        if m.lora is not None:
            raise ConfigError(f"{component} layer {name} already has an adapter")
        m.lora = LoRA(tuple(m.kernel.shape), spec, rng=np.random.default_rng([seed, i]), index=i,
                      param_dtype=m.kernel[...].dtype if jnp.issubdtype(m.kernel[...].dtype, jnp.floating) else jnp.float32)
    return chosen


def has_lora(model: nnx.Module) -> bool:
    return any(isinstance(m, LoRA) for _, m in nnx.iter_modules(model))


def lora_modules(model: nnx.Module) -> dict[str, LoRA]:
    """{adapted module name: its LoRA}."""
    return {name: m.lora for name, m in adaptable_modules(model).items() if m.lora is not None}


def merge_lora(model: nnx.Module, scale: float = 1.0) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its base weight (in float32, then the
    weight's dtype) and removed; ``model`` is left as it was."""
    copy = nnx.merge(*nnx.split(model))  # new Variables over the same (immutable) arrays
    for name, m in adaptable_modules(copy).items():
        if m.lora is None:
            continue
        w = m.kernel[...]
        m.kernel.set_value((jnp.asarray(w, jnp.float32) + scale * m.lora.delta()).astype(w.dtype))
        m.lora = None
    return copy


def strip_lora(model: nnx.Module) -> nnx.Module:
    """A view of ``model`` without its adapters (the base model)."""
    copy = nnx.merge(*nnx.split(model))
    for _, m in adaptable_modules(copy).items():
        m.lora = None
    return copy


def set_dropout_keys(key_state: nnx.State, rng: jax.Array) -> nnx.State:
    """Fresh dropout keys for one step: each adapter's key is ``fold_in(rng, its index)``."""
    base = jax.random.wrap_key_data(rng)
    return jax.tree.map(lambda k: jax.random.key_data(jax.random.fold_in(base, k[1])), key_state)


def adapter_count(model: nnx.Module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, LoRAParam)))
