"""Building blocks shared by the UNet and the VAE, mirroring diffusers' module names.

Attribute names follow diffusers' PyTorch modules exactly (``resnets``, ``conv1``, ``to_out``...),
so that a parameter's path in our state *is* its safetensors key with '.' separators; the
weight conversion in ``convert.py`` relies on this. Tensors are NHWC (channels last).
"""

from __future__ import annotations

import functools

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


# diffusers' ``get_activation`` names we implement (torch's nn.GELU is the exact, erf-based GELU)
ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu, "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def upsample_nearest(x):
    """x2 nearest-neighbour upsampling of NHWC input (torch ``F.interpolate(scale_factor=2.0)``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x):
    """2x2 average pooling, stride 2, of NHWC input with even sides (torch ``AvgPool2d(2, 2)``)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Placeholder(nnx.Module):
    """Holds the index of a parameter-free torch module (Dropout, activation) in a list."""

    def __call__(self, x):
        return x


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (pre-norm, no dropout).

    act: the nonlinearity (a key of ACTIVATIONS). scale_shift: diffusers' time_embedding_norm
    'scale_shift' (the time embedding projects to a scale and a shift applied after norm2) instead
    of 'default' (added before norm2). skip_time_act: no nonlinearity on the time embedding before
    its projection. resample: 'down' / 'up' resamples input and hidden state after norm1 (2x2
    average pooling / nearest x2: the ``down=True`` / ``up=True`` blocks IF uses as its
    down/upsamplers).
    """

    def __init__(self, cin: int, cout: int, temb_channels: int | None, groups: int, eps: float,
                 opts: ModelOptions, *, rngs: nnx.Rngs, output_scale_factor: float = 1.0, act: str = "silu",
                 scale_shift: bool = False, skip_time_act: bool = False, resample: str | None = None):
        self.norm1 = GroupNorm(groups, cin, eps, opts, rngs=rngs)
        self.conv1 = Conv2d(cin, cout, 3, opts, padding=1, rngs=rngs)
        self.time_emb_proj = (Linear(temb_channels, cout * (2 if scale_shift else 1), opts, rngs=rngs)
                              if temb_channels else None)
        self.norm2 = GroupNorm(groups, cout, eps, opts, rngs=rngs)
        self.conv2 = Conv2d(cout, cout, 3, opts, padding=1, rngs=rngs)
        self.conv_shortcut = Conv2d(cin, cout, 1, opts, rngs=rngs) if cin != cout else None
        self.output_scale_factor = output_scale_factor
        self.act, self.scale_shift, self.skip_time_act, self.resample = act, scale_shift, skip_time_act, resample

    def __call__(self, x, temb=None):
        act = ACTIVATIONS[self.act]
        h = act(self.norm1(x))
        if self.resample is not None:
            resample = avg_pool2 if self.resample == "down" else upsample_nearest
            x, h = resample(x), resample(h)
        h = self.conv1(h)
        if self.time_emb_proj is None:
            h = self.norm2(h)
        else:
            t = self.time_emb_proj(temb if self.skip_time_act else act(temb))[:, None, None, :]
            if self.scale_shift:
                scale, shift = jnp.split(t, 2, axis=-1)
                h = self.norm2(h) * (1 + scale) + shift
            else:
                h = self.norm2(h + t)
        h = self.conv2(act(h))
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
        return self.conv(upsample_nearest(x))


class Attention(nnx.Module):
    """diffusers ``Attention`` for the configurations SD, its VAE and DeepFloyd IF use.

    Token input (B, L, C) for the UNet transformer blocks. With ``group_norm_groups`` set it is
    spatial attention: NHWC input, group norm first, residual added at the end (the VAE
    mid-block). With ``added_kv_dim`` as well it is IF's added-KV attention (diffusers'
    ``AttnAddedKVProcessor``): the context, group-normed first if ``cross_norm_groups`` is set
    (``cross_attention_norm="group_norm"``), is projected by ``add_k_proj`` / ``add_v_proj`` to
    keys and values placed before the image tokens' own; ``self_kv=False`` (diffusers'
    ``only_cross_attention``) drops the latter, and with them ``to_k`` / ``to_v``.

    mask: optional (B, L_context) bool, True for context tokens that may be attended to (the image
    tokens' own keys always may).
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, opts: ModelOptions, *,
                 rngs: nnx.Rngs, cross_dim: int | None = None, bias: bool = False,
                 group_norm_groups: int | None = None, eps: float = 1e-6, added_kv_dim: int | None = None,
                 cross_norm_groups: int | None = None, self_kv: bool = True):
        inner = heads * head_dim
        kv_dim = cross_dim or query_dim
        self.heads = heads
        self.attention_impl = opts.attention
        self.group_norm = (GroupNorm(group_norm_groups, query_dim, eps, opts, rngs=rngs)
                           if group_norm_groups else None)
        self.norm_cross = (GroupNorm(cross_norm_groups, added_kv_dim, 1e-5, opts, rngs=rngs)
                           if added_kv_dim and cross_norm_groups else None)
        self.to_q = Linear(query_dim, inner, opts, use_bias=bias, rngs=rngs)
        self.to_k = Linear(kv_dim, inner, opts, use_bias=bias, rngs=rngs) if self_kv else None
        self.to_v = Linear(kv_dim, inner, opts, use_bias=bias, rngs=rngs) if self_kv else None
        self.add_k_proj = Linear(added_kv_dim, inner, opts, rngs=rngs) if added_kv_dim else None
        self.add_v_proj = Linear(added_kv_dim, inner, opts, rngs=rngs) if added_kv_dim else None
        self.to_out = nnx.List([Linear(inner, query_dim, opts, rngs=rngs), Placeholder()])

    def __call__(self, x, context=None, mask=None):
        spatial = x.ndim == 4
        residual = x
        if spatial:
            b, hh, ww, c = x.shape
            x = x.reshape(b, hh * ww, c)
        if self.group_norm is not None:
            x = self.group_norm(x)
        q = self.to_q(x)
        if self.add_k_proj is not None:
            ctx = context if self.norm_cross is None else self.norm_cross(context)
            k, v = self.add_k_proj(ctx), self.add_v_proj(ctx)
            if self.to_k is not None:
                k = jnp.concatenate([k, self.to_k(x)], axis=1)
                v = jnp.concatenate([v, self.to_v(x)], axis=1)
                if mask is not None:
                    mask = jnp.pad(mask, ((0, 0), (0, x.shape[1])), constant_values=True)
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1)
        out = attention(split(q), split(k), split(v), impl=self.attention_impl,
                        mask=None if mask is None else mask[:, None, None, :])
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

    def __call__(self, x, context, mask=None):
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context, mask)
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

    def __call__(self, x, context, mask=None):
        """mask: optional (B, L_context) bool, True for context tokens the cross-attention may see."""
        b, hh, ww, c = x.shape
        residual = x
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.reshape(b, hh * ww, h.shape[-1])
        if self.use_linear_projection:
            h = self.proj_in(h)
        for blk in self.transformer_blocks:  # remat, if on, wraps this whole module (unet.py)
            h = blk(h, context, mask)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(b, hh, ww, h.shape[-1])
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + residual
