"""UNet2DConditionModel in Flax NNX, for Stable Diffusion 1.x / 2.x and the SD x4 upscaler.

Built from a diffusers ``unet/config.json``. Parameter paths equal the diffusers state-dict keys.
Input and output are NHWC.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.layers import (Conv2d, Downsample2D, GroupNorm, Linear, ResnetBlock2D,
                                          Transformer2DModel, Upsample2D, maybe_remat)
from dreambooth_jax.models.options import ModelOptions, check_choice, parse_config, per_block

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

_SUPPORTED = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8,
    use_linear_projection=False, num_class_embeds=None, upcast_attention=False,
    conv_in_kernel=3, conv_out_kernel=3,
)
# Options of diffusers' UNet that we accept only at their default (SD/upscaler) values.
_FIXED = dict(
    num_attention_heads=(None,), dropout=(0.0,), class_embed_type=(None,),
    reverse_transformer_layers_per_block=(None,), encoder_hid_dim=(None,),
    encoder_hid_dim_type=(None,), dual_cross_attention=(False,), addition_embed_type=(None,),
    addition_time_embed_dim=(None,), resnet_time_scale_shift=("default",),
    resnet_skip_time_act=(False,), resnet_out_scale_factor=(1.0,),
    time_embedding_type=("positional",), time_embedding_dim=(None,),
    time_embedding_act_fn=(None,), timestep_post_act=(None,), time_cond_proj_dim=(None,),
    projection_class_embeddings_input_dim=(None,), attention_type=("default",),
    class_embeddings_concat=(False,), cross_attention_norm=(None,),
)
# Keys that do not change the computation of the blocks we build.
_IGNORED = {"sample_size", "mid_block_only_cross_attention", "addition_embed_type_num_heads"}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers UNet2DConditionModel config, expanded to one value per block."""

    raw: dict  # the validated config.json contents (written back on export)
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: tuple[int, ...]
    heads: tuple[int, ...]  # diffusers' 'attention_head_dim' (a head *count*, see from_diffusers)
    cross_attention_dim: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    only_cross_attention: tuple[bool, ...]
    use_linear_projection: bool
    norm_num_groups: int
    norm_eps: float
    flip_sin_to_cos: bool
    freq_shift: float
    downsample_padding: int
    mid_block_scale_factor: float
    num_class_embeds: int | None
    center_input_sample: bool
    conv_in_kernel: int
    conv_out_kernel: int

    @classmethod
    def from_diffusers(cls, raw: Mapping[str, Any], source: str = "unet/config.json") -> "UNetConfig":
        c = parse_config(raw, _SUPPORTED, source, fixed=_FIXED, ignored=_IGNORED)
        n = len(c["block_out_channels"])
        if len(c["down_block_types"]) != n or len(c["up_block_types"]) != n:
            raise ConfigError(f"{source}: down_block_types, up_block_types and block_out_channels must have the same length")
        for t in c["down_block_types"]:
            check_choice(t, DOWN_TYPES, "down_block_types", source)
        for t in c["up_block_types"]:
            check_choice(t, UP_TYPES, "up_block_types", source)
        check_choice(c["mid_block_type"], ("UNetMidBlock2DCrossAttn",), "mid_block_type", source)
        check_choice(c["act_fn"], ("silu", "swish"), "act_fn", source)
        # diffusers' naming quirk: with num_attention_heads unset, 'attention_head_dim' is the
        # number of heads (SD2's [5, 10, 20, 20] means 5 heads of 64 channels at 320 channels).
        heads = per_block(c["attention_head_dim"], n, "attention_head_dim", source)
        tlayers = per_block(c["transformer_layers_per_block"], n, "transformer_layers_per_block", source)
        if any(not isinstance(t, int) for t in tlayers):
            raise ConfigError(f"{source}: nested 'transformer_layers_per_block' lists are not supported")
        for ch, h in zip(c["block_out_channels"], heads):
            if ch % h:
                raise ConfigError(f"{source}: block channels {ch} not divisible by {h} attention heads")
        return cls(
            raw=dict(raw), in_channels=c["in_channels"], out_channels=c["out_channels"],
            block_out_channels=tuple(c["block_out_channels"]),
            down_block_types=tuple(c["down_block_types"]), up_block_types=tuple(c["up_block_types"]),
            layers_per_block=tuple(per_block(c["layers_per_block"], n, "layers_per_block", source)),
            heads=tuple(heads),
            cross_attention_dim=tuple(per_block(c["cross_attention_dim"], n, "cross_attention_dim", source)),
            transformer_layers=tuple(tlayers),
            only_cross_attention=tuple(per_block(c["only_cross_attention"], n, "only_cross_attention", source)),
            use_linear_projection=bool(c["use_linear_projection"]),
            norm_num_groups=c["norm_num_groups"], norm_eps=c["norm_eps"],
            flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=c["freq_shift"],
            downsample_padding=c["downsample_padding"],
            mid_block_scale_factor=float(c["mid_block_scale_factor"]),
            num_class_embeds=c["num_class_embeds"], center_input_sample=c["center_input_sample"],
            conv_in_kernel=c["conv_in_kernel"], conv_out_kernel=c["conv_out_kernel"])


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding, float32, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    def __init__(self, cin: int, dim: int, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.linear_1 = Linear(cin, dim, opts, rngs=rngs)
        self.linear_2 = Linear(dim, dim, opts, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class UNetBlock(nnx.Module):
    """One down or up block: CrossAttnDownBlock2D / DownBlock2D / CrossAttnUpBlock2D / UpBlock2D."""

    def __init__(self, cfg: UNetConfig, opts: ModelOptions, *, rngs: nnx.Rngs, up: bool, index: int,
                 cin: int, cout: int, prev_out: int, temb: int, last: bool):
        kind = (cfg.up_block_types if up else cfg.down_block_types)[index]
        block = len(cfg.block_out_channels) - 1 - index if up else index  # config entry
        layers = cfg.layers_per_block[block] + (1 if up else 0)
        heads = cfg.heads[block]
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        resnets, attns = [], []
        for i in range(layers):
            if up:
                skip = cin if i == layers - 1 else cout
                rin = (prev_out if i == 0 else cout) + skip
            else:
                rin = cin if i == 0 else cout
            resnets.append(ResnetBlock2D(rin, cout, temb, g, eps, opts, rngs=rngs))
            if kind.startswith("CrossAttn"):
                attns.append(Transformer2DModel(
                    heads, cout // heads, cout, cfg.transformer_layers[block],
                    cfg.cross_attention_dim[block], g, opts, rngs=rngs,
                    use_linear_projection=cfg.use_linear_projection,
                    only_cross_attention=cfg.only_cross_attention[block]))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attns) if attns else None
        self.remat = opts.remat
        if up:
            self.upsamplers = nnx.List([Upsample2D(cout, opts, rngs=rngs)]) if not last else None
        else:
            self.downsamplers = (nnx.List([Downsample2D(cout, cfg.downsample_padding, opts, rngs=rngs)])
                                 if not last else None)

    def down(self, h, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = maybe_remat(resnet, self.remat, h, temb)
            if self.attentions is not None:
                h = maybe_remat(self.attentions[i], self.remat, h, context)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips

    def up(self, h, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = maybe_remat(resnet, self.remat, h, temb)
            if self.attentions is not None:
                h = maybe_remat(self.attentions[i], self.remat, h, context)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, (transformer, resnet) x 1. Never only-cross-attention."""

    def __init__(self, cfg: UNetConfig, opts: ModelOptions, *, rngs: nnx.Rngs, temb: int):
        ch, heads = cfg.block_out_channels[-1], cfg.heads[-1]
        g, eps, osf = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, temb, g, eps, opts, rngs=rngs, output_scale_factor=osf)
                                 for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(
            heads, ch // heads, ch, cfg.transformer_layers[-1], cfg.cross_attention_dim[-1], g, opts,
            rngs=rngs, use_linear_projection=cfg.use_linear_projection)])
        self.remat = opts.remat

    def __call__(self, h, temb, context):
        h = maybe_remat(self.resnets[0], self.remat, h, temb)
        h = maybe_remat(self.attentions[0], self.remat, h, context)
        return maybe_remat(self.resnets[1], self.remat, h, temb)


class UNet2DConditionModel(nnx.Module):
    def __init__(self, cfg: UNetConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.opts = opts
        boc = cfg.block_out_channels
        temb = boc[0] * 4
        self.conv_in = Conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel, opts,
                              padding=(cfg.conv_in_kernel - 1) // 2, rngs=rngs)
        self.time_embedding = TimestepEmbedding(boc[0], temb, opts, rngs=rngs)
        self.class_embedding = (nnx.Embed(cfg.num_class_embeds, temb, dtype=opts.dtype,
                                          param_dtype=opts.param_dtype, rngs=rngs)
                                if cfg.num_class_embeds else None)
        n = len(boc)
        self.down_blocks = nnx.List([
            UNetBlock(cfg, opts, rngs=rngs, up=False, index=i, cin=boc[max(i - 1, 0)], cout=boc[i],
                      prev_out=0, temb=temb, last=i == n - 1) for i in range(n)])
        self.mid_block = MidBlock(cfg, opts, rngs=rngs, temb=temb)
        rev = boc[::-1]
        self.up_blocks = nnx.List([
            UNetBlock(cfg, opts, rngs=rngs, up=True, index=i, cin=rev[min(i + 1, n - 1)], cout=rev[i],
                      prev_out=rev[max(i - 1, 0)], temb=temb, last=i == n - 1) for i in range(n)])
        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, boc[0], cfg.norm_eps, opts, rngs=rngs)
        self.conv_out = Conv2d(boc[0], cfg.out_channels, cfg.conv_out_kernel, opts,
                               padding=(cfg.conv_out_kernel - 1) // 2, rngs=rngs)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 class_labels: jax.Array | None = None) -> jax.Array:
        """sample: (B, H, W, in_channels); timesteps: scalar or (B,); encoder_hidden_states:
        (B, L, cross_attention_dim); class_labels: (B,) ints (the upscaler's noise level).
        Returns the model output (B, H, W, out_channels) in the compute dtype."""
        cfg, dtype = self.config, self.opts.dtype
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"UNet input spatial size {sample.shape[1:3]} must be divisible by {factor}")
        b = sample.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        emb = self.time_embedding(
            timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet has class embeddings (num_class_embeds): pass class_labels")
            emb = emb + self.class_embedding(jnp.broadcast_to(jnp.asarray(class_labels), (b,))).astype(emb.dtype)
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        context = encoder_hidden_states.astype(dtype)
        h = self.conv_in(sample.astype(dtype))
        skips = [h]
        for blk in self.down_blocks:
            h, s = blk.down(h, emb, context)
            skips.extend(s)
        h = self.mid_block(h, emb, context)
        for blk in self.up_blocks:
            n_res = len(blk.resnets)
            h = blk.up(h, skips[-n_res:], emb, context)
            del skips[-n_res:]
        h = jax.nn.silu(self.conv_norm_out(h))
        return self.conv_out(h)
