"""UNet2DConditionModel in Flax NNX, for Stable Diffusion 1.x / 2.x, the SD x4 upscaler and
DeepFloyd IF stages I and II.

Built from a diffusers ``unet/config.json``. Parameter paths equal the diffusers state-dict keys.
Input and output are NHWC.

IF's UNets (diffusers' port of the original ADM-style UNet) differ from SD's in: GELU throughout;
resnets with 'scale_shift' time conditioning and no activation before the time projection; down-
and upsamplers that are resnets with built-in 2x2 average pooling / nearest upsampling
(``ResnetDownsampleBlock2D``, ``SimpleCrossAttn*``); added-KV attention instead of transformer
blocks (the projected T5 tokens are extra keys and values of a spatial self-attention); the T5
states projected to ``cross_attention_dim`` (``encoder_hid_proj``) and, attention-pooled, added to
the time embedding (``add_embedding``); stage II's noise level embedded like a second timestep
(``class_embed_type="timestep"``). Their 6 output channels are epsilon and the learned variance
(the scheduler's ``variance_type="learned_range"``): nothing in the model itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.attention import attention
from dreambooth_jax.models.layers import (ACTIVATIONS, Attention, Conv2d, Downsample2D, GroupNorm, LayerNorm,
                                          Linear, ResnetBlock2D, Transformer2DModel, Upsample2D, maybe_remat)
from dreambooth_jax.models.options import ModelOptions, check_choice, parse_config, per_block

# Block type -> (its attention: None, "transformer" (SD's Transformer2DModel) or "added_kv" (IF's
# added-KV Attention), whether it is one of IF's blocks). diffusers passes resnet_skip_time_act and
# resnet_out_scale_factor to IF's blocks only, and IF's blocks resample with a resnet.
_DOWN = {"CrossAttnDownBlock2D": ("transformer", False), "DownBlock2D": (None, False),
         "SimpleCrossAttnDownBlock2D": ("added_kv", True), "ResnetDownsampleBlock2D": (None, True)}
_UP = {"CrossAttnUpBlock2D": ("transformer", False), "UpBlock2D": (None, False),
       "SimpleCrossAttnUpBlock2D": ("added_kv", True), "ResnetUpsampleBlock2D": (None, True)}
_MID = {"UNetMidBlock2DCrossAttn": ("transformer", False), "UNetMidBlock2DSimpleCrossAttn": ("added_kv", True)}
DOWN_TYPES, UP_TYPES, MID_TYPES = tuple(_DOWN), tuple(_UP), tuple(_MID)
_CROSS_NORM_GROUPS = 32  # diffusers' Attention(cross_attention_norm_num_groups=32); the UNet never sets it

_SUPPORTED = dict(
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
    mid_block_only_cross_attention=None,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=1280, transformer_layers_per_block=1, attention_head_dim=8,
    use_linear_projection=False, num_class_embeds=None, upcast_attention=False,
    conv_in_kernel=3, conv_out_kernel=3,
    # DeepFloyd IF
    resnet_time_scale_shift="default", resnet_skip_time_act=False, resnet_out_scale_factor=1.0,
    time_embedding_dim=None, time_embedding_act_fn=None, class_embed_type=None, encoder_hid_dim=None,
    encoder_hid_dim_type=None, addition_embed_type=None, addition_embed_type_num_heads=64,
    cross_attention_norm=None,
)
# Options of diffusers' UNet that we accept only at their default values.
_FIXED = dict(
    num_attention_heads=(None,), dropout=(0.0,), reverse_transformer_layers_per_block=(None,),
    dual_cross_attention=(False,), addition_time_embed_dim=(None,), time_embedding_type=("positional",),
    timestep_post_act=(None,), time_cond_proj_dim=(None,), projection_class_embeddings_input_dim=(None,),
    attention_type=("default",), class_embeddings_concat=(False,),
)
# Keys that do not change the computation of the blocks we build.
_IGNORED = {"sample_size"}


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
    # diffusers' 'attention_head_dim': a head *count* for transformer blocks, a head *width* for
    # added-KV attention (see from_diffusers)
    heads: tuple[int, ...]
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
    mid_block_type: str
    mid_block_only_cross_attention: bool
    act_fn: str  # the resnets' and time embeddings' nonlinearity
    time_embed_dim: int  # time_embedding_dim, or 4 * block_out_channels[0]
    time_embedding_act_fn: str | None  # applied to the summed embeddings before the blocks
    class_embed_type: str | None  # None (num_class_embeds: a label table) or "timestep"
    encoder_hid_dim: int | None  # width of encoder_hidden_states when projected (text_proj)
    addition_embed_type: str | None  # None or "text" (attention-pooled encoder states)
    addition_embed_type_num_heads: int
    resnet_scale_shift: bool  # resnet_time_scale_shift == "scale_shift"
    resnet_skip_time_act: bool  # IF blocks only, as in diffusers
    resnet_out_scale_factor: float  # IF blocks only, as in diffusers
    cross_attention_norm: str | None  # None or "group_norm" (added-KV attention only)

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
        check_choice(c["mid_block_type"], MID_TYPES, "mid_block_type", source)
        check_choice(c["act_fn"], tuple(ACTIVATIONS), "act_fn", source)
        check_choice(c["time_embedding_act_fn"], (None, *ACTIVATIONS), "time_embedding_act_fn", source)
        check_choice(c["resnet_time_scale_shift"], ("default", "scale_shift"), "resnet_time_scale_shift", source)
        check_choice(c["class_embed_type"], (None, "timestep"), "class_embed_type", source)
        check_choice(c["addition_embed_type"], (None, "text"), "addition_embed_type", source)
        check_choice(c["encoder_hid_dim_type"], (None, "text_proj"), "encoder_hid_dim_type", source)
        check_choice(c["cross_attention_norm"], (None, "group_norm"), "cross_attention_norm", source)
        # diffusers' naming quirk: with num_attention_heads unset, 'attention_head_dim' is the
        # number of heads of a transformer block (SD2's [5, 10, 20, 20] means 5 heads of 64
        # channels at 320 channels), but the width of a head in added-KV attention (IF's 64).
        heads = per_block(c["attention_head_dim"], n, "attention_head_dim", source)
        tlayers = per_block(c["transformer_layers_per_block"], n, "transformer_layers_per_block", source)
        if any(not isinstance(t, int) for t in tlayers):
            raise ConfigError(f"{source}: nested 'transformer_layers_per_block' lists are not supported")
        cross = per_block(c["cross_attention_dim"], n, "cross_attention_dim", source)
        boc = c["block_out_channels"]
        layout = _attention_layout(c["down_block_types"], c["up_block_types"], c["mid_block_type"], boc, heads)
        for ch, h, kind in layout:
            if ch % h:
                what = "attention heads" if kind == "transformer" else "channels per head (added-KV attention)"
                raise ConfigError(f"{source}: block channels {ch} not divisible by {h} {what}")
        if (c["cross_attention_norm"] and any(kind == "added_kv" for *_, kind in layout)
                and any(d % _CROSS_NORM_GROUPS for d in cross)):
            raise ConfigError(f"{source}: cross_attention_norm 'group_norm' needs cross_attention_dim divisible "
                              f"by {_CROSS_NORM_GROUPS}, got {c['cross_attention_dim']}")
        hid = c["encoder_hid_dim"]
        if c["encoder_hid_dim_type"] and hid is None:
            raise ConfigError(f"{source}: 'encoder_hid_dim_type' {c['encoder_hid_dim_type']!r} needs 'encoder_hid_dim'")
        if (hid is not None or c["addition_embed_type"]) and len(set(cross)) != 1:
            raise ConfigError(f"{source}: encoder_hid_dim / addition_embed_type need one cross_attention_dim for "
                              f"all blocks, got {c['cross_attention_dim']}")
        if c["addition_embed_type"] and (hid or cross[0]) % c["addition_embed_type_num_heads"]:
            raise ConfigError(f"{source}: the text embedding width {hid or cross[0]} is not divisible by "
                              f"addition_embed_type_num_heads {c['addition_embed_type_num_heads']}")
        only_cross = per_block(c["only_cross_attention"], n, "only_cross_attention", source)
        mid_only_cross = c["mid_block_only_cross_attention"]
        if mid_only_cross is None:  # diffusers: follows a single bool only_cross_attention, else False
            mid_only_cross = c["only_cross_attention"] if isinstance(c["only_cross_attention"], bool) else False
        return cls(
            raw=dict(raw), in_channels=c["in_channels"], out_channels=c["out_channels"],
            block_out_channels=tuple(boc),
            down_block_types=tuple(c["down_block_types"]), up_block_types=tuple(c["up_block_types"]),
            layers_per_block=tuple(per_block(c["layers_per_block"], n, "layers_per_block", source)),
            heads=tuple(heads), cross_attention_dim=tuple(cross), transformer_layers=tuple(tlayers),
            only_cross_attention=tuple(only_cross),
            use_linear_projection=bool(c["use_linear_projection"]),
            norm_num_groups=c["norm_num_groups"], norm_eps=c["norm_eps"],
            flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=c["freq_shift"],
            downsample_padding=c["downsample_padding"],
            mid_block_scale_factor=float(c["mid_block_scale_factor"]),
            num_class_embeds=c["num_class_embeds"], center_input_sample=c["center_input_sample"],
            conv_in_kernel=c["conv_in_kernel"], conv_out_kernel=c["conv_out_kernel"],
            mid_block_type=c["mid_block_type"], mid_block_only_cross_attention=bool(mid_only_cross),
            act_fn=c["act_fn"], time_embed_dim=c["time_embedding_dim"] or 4 * boc[0],
            time_embedding_act_fn=c["time_embedding_act_fn"], class_embed_type=c["class_embed_type"],
            encoder_hid_dim=hid, addition_embed_type=c["addition_embed_type"],
            addition_embed_type_num_heads=c["addition_embed_type_num_heads"],
            resnet_scale_shift=c["resnet_time_scale_shift"] == "scale_shift",
            resnet_skip_time_act=bool(c["resnet_skip_time_act"]),
            resnet_out_scale_factor=float(c["resnet_out_scale_factor"]),
            cross_attention_norm=c["cross_attention_norm"])


def _head_entry(kind: str, up: bool, index: int, n: int) -> int:
    """The attention_head_dim entry of down/up block ``index`` of ``n``, as diffusers reads it:
    up blocks read the per-block lists reversed, except that added-KV up blocks get
    ``attention_head_dim[index]`` unreversed (``UNet2DConditionModel.__init__``)."""
    return n - 1 - index if up and kind != "added_kv" else index


def _attention_layout(down_types, up_types, mid_type, boc, heads):
    """(channels, attention_head_dim entry, kind) of every block with attention."""
    n = len(boc)
    out = [(boc[i], heads[i], _DOWN[t][0]) for i, t in enumerate(down_types) if _DOWN[t][0]]
    out += [(boc[n - 1 - i], heads[_head_entry(_UP[t][0], True, i, n)], _UP[t][0])
            for i, t in enumerate(up_types) if _UP[t][0]]
    return out + [(boc[-1], heads[-1], _MID[mid_type][0])]


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
    def __init__(self, cin: int, dim: int, opts: ModelOptions, *, rngs: nnx.Rngs, act: str = "silu"):
        self.linear_1 = Linear(cin, dim, opts, rngs=rngs)
        self.linear_2 = Linear(dim, dim, opts, rngs=rngs)
        self.act = act

    def __call__(self, x):
        return self.linear_2(ACTIVATIONS[self.act](self.linear_1(x)))


class AttentionPooling(nnx.Module):
    """diffusers ``AttentionPooling`` (from IF): one query, the tokens' mean plus a learned
    position embedding, attends over itself and the tokens. (B, L, C) -> (B, C)."""

    def __init__(self, heads: int, dim: int, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.positional_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (1, dim), opts.param_dtype) / dim ** 0.5)
        self.k_proj = Linear(dim, dim, opts, rngs=rngs)
        self.q_proj = Linear(dim, dim, opts, rngs=rngs)
        self.v_proj = Linear(dim, dim, opts, rngs=rngs)
        self.heads = heads
        self.attention_impl = opts.attention

    def __call__(self, x):
        b, _, c = x.shape
        query = (x.astype(jnp.float32).mean(axis=1, keepdims=True) + self.positional_embedding[...]).astype(x.dtype)
        tokens = jnp.concatenate([query, x], axis=1)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, c // self.heads)
        out = attention(split(self.q_proj(query)), split(self.k_proj(tokens)), split(self.v_proj(tokens)),
                        impl=self.attention_impl)
        return out.reshape(b, c)


class TextTimeEmbedding(nnx.Module):
    """addition_embed_type 'text': the attention-pooled, normalised encoder states, projected to
    the time embedding's width."""

    def __init__(self, dim: int, temb: int, heads: int, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, 1e-5, opts, rngs=rngs)
        self.pool = AttentionPooling(heads, dim, opts, rngs=rngs)
        self.proj = Linear(dim, temb, opts, rngs=rngs)
        self.norm2 = LayerNorm(temb, 1e-5, opts, rngs=rngs)

    def __call__(self, x):
        return self.norm2(self.proj(self.pool(self.norm1(x))))


def _resnet(cfg: UNetConfig, opts: ModelOptions, rngs: nnx.Rngs, cin: int, cout: int, temb: int, *,
            if_block: bool, scale: float | None = None, resample: str | None = None) -> ResnetBlock2D:
    """A ResnetBlock2D with the options diffusers passes to a resnet of this kind of block
    (``scale``: the output scale factor, when the block sets its own: the mid-block's)."""
    if scale is None:
        scale = cfg.resnet_out_scale_factor if if_block else 1.0
    return ResnetBlock2D(cin, cout, temb, cfg.norm_num_groups, cfg.norm_eps, opts, rngs=rngs, output_scale_factor=scale,
                         act=cfg.act_fn, scale_shift=cfg.resnet_scale_shift,
                         skip_time_act=if_block and cfg.resnet_skip_time_act, resample=resample)


def _attention(cfg: UNetConfig, opts: ModelOptions, rngs: nnx.Rngs, kind: str, ch: int, entry: int,
               head_entry: int, only_cross: bool) -> nnx.Module:
    """The attention of a block at ``ch`` channels: config entry ``entry`` of the per-block lists
    (``head_entry`` of attention_head_dim, see _head_entry)."""
    if kind == "transformer":
        heads = cfg.heads[head_entry]
        return Transformer2DModel(heads, ch // heads, ch, cfg.transformer_layers[entry], cfg.cross_attention_dim[entry],
                                  cfg.norm_num_groups, opts, rngs=rngs,
                                  use_linear_projection=cfg.use_linear_projection, only_cross_attention=only_cross)
    head_dim = cfg.heads[head_entry]
    return Attention(ch, ch // head_dim, head_dim, opts, rngs=rngs, bias=True, group_norm_groups=cfg.norm_num_groups,
                     eps=1e-5, added_kv_dim=cfg.cross_attention_dim[entry],
                     cross_norm_groups=_CROSS_NORM_GROUPS if cfg.cross_attention_norm else None, self_kv=not only_cross)


class UNetBlock(nnx.Module):
    """One down or up block (``DOWN_TYPES`` / ``UP_TYPES``): resnets, each followed by its
    attention if the block has any, then the down/upsampler unless it is the last block."""

    def __init__(self, cfg: UNetConfig, opts: ModelOptions, *, rngs: nnx.Rngs, up: bool, index: int,
                 cin: int, cout: int, prev_out: int, temb: int, last: bool):
        kind = (cfg.up_block_types if up else cfg.down_block_types)[index]
        attn, if_block = (_UP if up else _DOWN)[kind]
        block = len(cfg.block_out_channels) - 1 - index if up else index  # config entry
        head_entry = _head_entry(attn, up, index, len(cfg.block_out_channels))
        layers = cfg.layers_per_block[block] + (1 if up else 0)
        resnets, attns = [], []
        for i in range(layers):
            if up:
                skip = cin if i == layers - 1 else cout
                rin = (prev_out if i == 0 else cout) + skip
            else:
                rin = cin if i == 0 else cout
            resnets.append(_resnet(cfg, opts, rngs, rin, cout, temb, if_block=if_block))
            if attn:
                attns.append(_attention(cfg, opts, rngs, attn, cout, block, head_entry,
                                        cfg.only_cross_attention[block]))
        self.resnets = nnx.List(resnets)
        self.attentions = nnx.List(attns) if attns else None
        self.remat = opts.remat
        if last:
            sampler = None
        elif if_block:
            sampler = _resnet(cfg, opts, rngs, cout, cout, temb, if_block=True, resample="up" if up else "down")
        else:
            sampler = Upsample2D(cout, opts, rngs=rngs) if up else Downsample2D(cout, cfg.downsample_padding, opts,
                                                                                rngs=rngs)
        if up:
            self.upsamplers = nnx.List([sampler]) if sampler is not None else None
        else:
            self.downsamplers = nnx.List([sampler]) if sampler is not None else None

    def _resample(self, sampler, h, temb):
        if isinstance(sampler, ResnetBlock2D):
            return maybe_remat(sampler, self.remat, h, temb)
        return sampler(h)

    def down(self, h, temb, context, mask=None):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = maybe_remat(resnet, self.remat, h, temb)
            if self.attentions is not None:
                h = maybe_remat(self.attentions[i], self.remat, h, context, mask)
            skips.append(h)
        if self.downsamplers is not None:
            h = self._resample(self.downsamplers[0], h, temb)
            skips.append(h)
        return h, skips

    def up(self, h, skips, temb, context, mask=None):
        for i, resnet in enumerate(self.resnets):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = maybe_remat(resnet, self.remat, h, temb)
            if self.attentions is not None:
                h = maybe_remat(self.attentions[i], self.remat, h, context, mask)
        if self.upsamplers is not None:
            h = self._resample(self.upsamplers[0], h, temb)
        return h


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn (never only-cross-attention) / UNetMidBlock2DSimpleCrossAttn:
    resnet, attention, resnet."""

    def __init__(self, cfg: UNetConfig, opts: ModelOptions, *, rngs: nnx.Rngs, temb: int):
        ch, last = cfg.block_out_channels[-1], len(cfg.block_out_channels) - 1
        attn, if_block = _MID[cfg.mid_block_type]
        self.resnets = nnx.List([_resnet(cfg, opts, rngs, ch, ch, temb, if_block=if_block,
                                         scale=cfg.mid_block_scale_factor) for _ in range(2)])
        self.attentions = nnx.List([_attention(cfg, opts, rngs, attn, ch, last, last,
                                               if_block and cfg.mid_block_only_cross_attention)])
        self.remat = opts.remat

    def __call__(self, h, temb, context, mask=None):
        h = maybe_remat(self.resnets[0], self.remat, h, temb)
        h = maybe_remat(self.attentions[0], self.remat, h, context, mask)
        return maybe_remat(self.resnets[1], self.remat, h, temb)


class UNet2DConditionModel(nnx.Module):
    def __init__(self, cfg: UNetConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.opts = opts
        boc = cfg.block_out_channels
        temb = cfg.time_embed_dim
        self.conv_in = Conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel, opts,
                              padding=(cfg.conv_in_kernel - 1) // 2, rngs=rngs)
        self.time_embedding = TimestepEmbedding(boc[0], temb, opts, rngs=rngs, act=cfg.act_fn)
        self.encoder_hid_proj = (Linear(cfg.encoder_hid_dim, cfg.cross_attention_dim[0], opts, rngs=rngs)
                                 if cfg.encoder_hid_dim else None)
        if cfg.class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(boc[0], temb, opts, rngs=rngs, act=cfg.act_fn)
        elif cfg.num_class_embeds:
            self.class_embedding = nnx.Embed(cfg.num_class_embeds, temb, dtype=opts.dtype,
                                             param_dtype=opts.param_dtype, rngs=rngs)
        else:
            self.class_embedding = None
        self.add_embedding = (TextTimeEmbedding(cfg.encoder_hid_dim or cfg.cross_attention_dim[0], temb,
                                                cfg.addition_embed_type_num_heads, opts, rngs=rngs)
                              if cfg.addition_embed_type == "text" else None)
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
                 class_labels: jax.Array | None = None, encoder_attention_mask: jax.Array | None = None) -> jax.Array:
        """sample: (B, H, W, in_channels); timesteps: scalar or (B,); encoder_hidden_states:
        (B, L, cross_attention_dim, or encoder_hid_dim where set); class_labels: (B,) (the
        upscaler's noise level as ints; IF stage II's noise level, embedded like a timestep);
        encoder_attention_mask: optional (B, L) bool or 0/1, 1 for the tokens the cross-attention
        may see (diffusers' argument of that name: IF's pipelines do not pass it, nor does it
        reach the text pooling of ``addition_embed_type="text"``).
        Returns the model output (B, H, W, out_channels) in the compute dtype."""
        cfg, dtype = self.config, self.opts.dtype
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if sample.shape[1] % factor or sample.shape[2] % factor:
            raise ValueError(f"UNet input spatial size {sample.shape[1:3]} must be divisible by {factor}")
        b = sample.shape[0]
        sinusoid = lambda t: timestep_embedding(jnp.broadcast_to(jnp.asarray(t), (b,)), cfg.block_out_channels[0],
                                                cfg.flip_sin_to_cos, cfg.freq_shift).astype(dtype)
        emb = self.time_embedding(sinusoid(timesteps))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet has class embeddings (num_class_embeds or class_embed_type): "
                                 "pass class_labels")
            if cfg.class_embed_type == "timestep":
                emb = emb + self.class_embedding(sinusoid(class_labels))
            else:
                labels = jnp.broadcast_to(jnp.asarray(class_labels), (b,))
                emb = emb + self.class_embedding(labels).astype(emb.dtype)
        context = encoder_hidden_states.astype(dtype)
        if self.add_embedding is not None:  # pools the encoder states as given, before encoder_hid_proj
            emb = emb + self.add_embedding(context)
        if cfg.time_embedding_act_fn:
            emb = ACTIVATIONS[cfg.time_embedding_act_fn](emb)
        if self.encoder_hid_proj is not None:
            context = self.encoder_hid_proj(context)
        mask = None
        if encoder_attention_mask is not None:
            mask = jnp.broadcast_to(jnp.asarray(encoder_attention_mask).astype(bool), context.shape[:2])
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        h = self.conv_in(sample.astype(dtype))
        skips = [h]
        for blk in self.down_blocks:
            h, s = blk.down(h, emb, context, mask)
            skips.extend(s)
        h = self.mid_block(h, emb, context, mask)
        for blk in self.up_blocks:
            n_res = len(blk.resnets)
            h = blk.up(h, skips[-n_res:], emb, context, mask)
            del skips[-n_res:]
        h = ACTIVATIONS[cfg.act_fn](self.conv_norm_out(h))
        return self.conv_out(h)
