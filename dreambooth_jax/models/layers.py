"""Building blocks shared by the UNet and the VAE, mirroring diffusers' module names.

Attribute names follow diffusers' PyTorch modules exactly (``resnets``, ``conv1``, ``to_out``...),
so that a parameter's path in our state *is* its safetensors key with '.' separators; the
weight conversion in ``convert.py`` relies on this. Tensors are NHWC (channels last).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.attention import attention
from dreambooth_jax.models.options import ModelOptions


class Conv2d(nnx.Conv):
    """torch.nn.Conv2d semantics (symmetric integer padding) on NHWC input."""

    def __init__(self, cin: int, cout: int, kernel: int, opts: ModelOptions, *, rngs: nnx.Rngs,
                 stride: int = 1, padding: int = 0, use_bias: bool = True):
        super().__init__(cin, cout, (kernel, kernel), strides=(stride, stride),
                         padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                         dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.lora = nnx.data(None)  # a models.lora.LoRA adapter, when one is attached

    def __call__(self, x):
        y = super().__call__(x)
        if self.lora is not None:
            y = y + self.lora(x, y.dtype, conv=(self.strides, self.padding))
        return y


class Linear(nnx.Linear):
    def __init__(self, cin: int, cout: int, opts: ModelOptions, *, rngs: nnx.Rngs, use_bias: bool = True):
        super().__init__(cin, cout, use_bias=use_bias, dtype=opts.dtype,
                         param_dtype=opts.param_dtype, rngs=rngs)
        self.lora = nnx.data(None)  # a models.lora.LoRA adapter, when one is attached

    def __call__(self, x):
        y = super().__call__(x)
        if self.lora is not None:
            y = y + self.lora(x, y.dtype)
        return y


class GroupNorm(nnx.GroupNorm):
    """torch.nn.GroupNorm computed in float32, output in the compute dtype."""

    def __init__(self, groups: int, channels: int, eps: float, opts: ModelOptions, *, rngs: nnx.Rngs):
        super().__init__(channels, num_groups=groups, epsilon=eps, dtype=jnp.float32,
                         param_dtype=opts.param_dtype, use_fast_variance=False, rngs=rngs)
        self.out_dtype = opts.dtype

    def __call__(self, x):
        return super().__call__(x.astype(jnp.float32)).astype(self.out_dtype)


class LayerNorm(nnx.LayerNorm):
    """torch.nn.LayerNorm computed in float32, output in the compute dtype."""

    def __init__(self, dim: int, eps: float, opts: ModelOptions, *, rngs: nnx.Rngs):
        super().__init__(dim, epsilon=eps, dtype=jnp.float32, param_dtype=opts.param_dtype,
                         use_fast_variance=False, rngs=rngs)
        self.out_dtype = opts.dtype

    def __call__(self, x):
        return super().__call__(x.astype(jnp.float32)).astype(self.out_dtype)


def maybe_remat(module, remat: bool, *args):
    """Call ``module(*args)``, under ``nnx.remat`` (recompute activations in backward) if asked."""
    if remat:
        return nnx.remat(lambda m, *a: m(*a))(module, *args)
    return module(*args)


def with_remat(module: nnx.Module, remat: bool) -> nnx.Module:
    """A view of ``module`` (same parameter arrays, nothing copied) whose blocks run with or
    without ``nnx.remat``. Remat only pays in a backward pass, and a lifted ``nnx.remat`` cannot
    run inside a jitted sampler's ``fori_loop`` (it would update the module from another trace
    level), so samplers call the model through ``with_remat(model, False)`` whatever it was
    loaded with; the train step turns it on where the config asks for it."""
    view = nnx.merge(*nnx.split(module))
    for _, sub in nnx.iter_modules(view):
        if hasattr(sub, "remat"):
            sub.remat = remat
    return view


class Placeholder(nnx.Module):
    """Holds the index of a parameter-free torch module (Dropout, activation) in a list."""

    def __call__(self, x):
        return x


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (pre-norm, 'default' time embedding norm, SiLU)."""

    def __init__(self, cin: int, cout: int, temb_channels: int | None, groups: int, eps: float,
                 opts: ModelOptions, *, rngs: nnx.Rngs, output_scale_factor: float = 1.0):
        self.norm1 = GroupNorm(groups, cin, eps, opts, rngs=rngs)
        self.conv1 = Conv2d(cin, cout, 3, opts, padding=1, rngs=rngs)
        self.time_emb_proj = Linear(temb_channels, cout, opts, rngs=rngs) if temb_channels else None
        self.norm2 = GroupNorm(groups, cout, eps, opts, rngs=rngs)
        self.conv2 = Conv2d(cout, cout, 3, opts, padding=1, rngs=rngs)
        self.conv_shortcut = Conv2d(cin, cout, 1, opts, rngs=rngs) if cin != cout else None
        self.output_scale_factor = output_scale_factor

    def __call__(self, x, temb=None):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Strided 3x3 conv. padding=0 (the VAE encoder) pads bottom/right by one, as diffusers does."""

    def __init__(self, channels: int, padding: int, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, opts, stride=2, padding=padding, rngs=rngs)

    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2 then 3x3 conv."""

    def __init__(self, channels: int, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, opts, padding=1, rngs=rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Attention(nnx.Module):
    """diffusers ``Attention`` for the configurations SD uses.

    Token input (B, L, C) for the UNet transformer blocks. With ``group_norm_groups`` set it is
    the VAE mid-block attention: NHWC input, group norm first, residual added at the end.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, opts: ModelOptions, *,
                 rngs: nnx.Rngs, cross_dim: int | None = None, bias: bool = False,
                 group_norm_groups: int | None = None, eps: float = 1e-6):
        inner = heads * head_dim
        kv_dim = cross_dim or query_dim
        self.heads = heads
        self.attention_impl = opts.attention
        self.group_norm = (GroupNorm(group_norm_groups, query_dim, eps, opts, rngs=rngs)
                           if group_norm_groups else None)
        self.to_q = Linear(query_dim, inner, opts, use_bias=bias, rngs=rngs)
        self.to_k = Linear(kv_dim, inner, opts, use_bias=bias, rngs=rngs)
        self.to_v = Linear(kv_dim, inner, opts, use_bias=bias, rngs=rngs)
        self.to_out = nnx.List([Linear(inner, query_dim, opts, rngs=rngs), Placeholder()])

    def __call__(self, x, context=None):
        spatial = x.ndim == 4
        residual = x
        if spatial:
            b, hh, ww, c = x.shape
            x = x.reshape(b, hh * ww, c)
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1)
        out = attention(split(q), split(k), split(v), impl=self.attention_impl)
        out = self.to_out[0](out.reshape(out.shape[0], out.shape[1], -1))
        if spatial:
            out = out.reshape(residual.shape)
        if self.group_norm is not None:
            out = out + residual
        return out


class GEGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.proj = Linear(dim, inner * 2, opts, rngs=rngs)

    def __call__(self, x):
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate.astype(jnp.float32), approximate=False).astype(h.dtype)


class FeedForward(nnx.Module):
    def __init__(self, dim: int, opts: ModelOptions, *, rngs: nnx.Rngs, mult: int = 4):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, opts, rngs=rngs), Placeholder(),
                             Linear(inner, dim, opts, rngs=rngs)])

    def __call__(self, x):
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Self-attention (or cross-attention when ``only_cross_attention``), cross-attention, GEGLU FF."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_dim: int, opts: ModelOptions, *,
                 rngs: nnx.Rngs, only_cross_attention: bool = False):
        self.only_cross_attention = only_cross_attention
        self.norm1 = LayerNorm(dim, 1e-5, opts, rngs=rngs)
        self.attn1 = Attention(dim, heads, head_dim, opts, rngs=rngs,
                               cross_dim=cross_dim if only_cross_attention else None)
        self.norm2 = LayerNorm(dim, 1e-5, opts, rngs=rngs)
        self.attn2 = Attention(dim, heads, head_dim, opts, rngs=rngs, cross_dim=cross_dim)
        self.norm3 = LayerNorm(dim, 1e-5, opts, rngs=rngs)
        self.ff = FeedForward(dim, opts, rngs=rngs)

    def __call__(self, x, context):
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """diffusers Transformer2DModel (continuous input): GroupNorm, proj_in, blocks, proj_out, residual."""

    def __init__(self, heads: int, head_dim: int, channels: int, layers: int, cross_dim: int,
                 groups: int, opts: ModelOptions, *, rngs: nnx.Rngs, use_linear_projection: bool,
                 only_cross_attention: bool = False):
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(groups, channels, 1e-6, opts, rngs=rngs)
        if use_linear_projection:
            self.proj_in = Linear(channels, inner, opts, rngs=rngs)
            self.proj_out = Linear(inner, channels, opts, rngs=rngs)
        else:
            self.proj_in = Conv2d(channels, inner, 1, opts, rngs=rngs)
            self.proj_out = Conv2d(inner, channels, 1, opts, rngs=rngs)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, head_dim, cross_dim, opts, rngs=rngs,
                                  only_cross_attention=only_cross_attention)
            for _ in range(layers)])

    def __call__(self, x, context):
        b, hh, ww, c = x.shape
        residual = x
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.reshape(b, hh * ww, h.shape[-1])
        if self.use_linear_projection:
            h = self.proj_in(h)
        for blk in self.transformer_blocks:  # remat, if on, wraps this whole module (unet.py)
            h = blk(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(b, hh, ww, h.shape[-1])
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + residual
