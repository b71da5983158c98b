"""AutoencoderKL in Flax NNX (SD 1.x/2.x 4-level VAE, the x4 upscaler's 3-level VAE).

Built from a diffusers ``vae/config.json``; parameter paths equal the diffusers state-dict keys
(old checkpoints' ``query/key/value/proj_attn`` attention names are renamed on load).
Images are NHWC in [-1, 1]. ``encode``/``decode`` do not apply ``scaling_factor``; the pipelines
and the trainer do, as diffusers' pipelines do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.layers import (Attention, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D,
                                          Upsample2D)
from dreambooth_jax.models.options import ModelOptions, check_choice, parse_config

_SUPPORTED = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, scaling_factor=0.18215,
    shift_factor=None, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True,
)
_FIXED = dict(latents_mean=(None,), latents_std=(None,))
_IGNORED = {"sample_size", "force_upcast"}
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    raw: dict
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    scaling_factor: float
    shift_factor: float
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD, 4 for the x4 upscaler's VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, raw: Mapping[str, Any], source: str = "vae/config.json") -> "VAEConfig":
        c = parse_config(raw, _SUPPORTED, source, fixed=_FIXED, ignored=_IGNORED)
        n = len(c["block_out_channels"])
        if len(c["down_block_types"]) != n or len(c["up_block_types"]) != n:
            raise ConfigError(f"{source}: down_block_types, up_block_types and block_out_channels must have the same length")
        for t in c["down_block_types"]:
            check_choice(t, ("DownEncoderBlock2D",), "down_block_types", source)
        for t in c["up_block_types"]:
            check_choice(t, ("UpDecoderBlock2D",), "up_block_types", source)
        check_choice(c["act_fn"], ("silu", "swish"), "act_fn", source)
        return cls(raw=dict(raw), in_channels=c["in_channels"], out_channels=c["out_channels"],
                   block_out_channels=tuple(c["block_out_channels"]),
                   layers_per_block=c["layers_per_block"], latent_channels=c["latent_channels"],
                   norm_num_groups=c["norm_num_groups"], scaling_factor=float(c["scaling_factor"]),
                   shift_factor=float(c["shift_factor"] or 0.0), use_quant_conv=c["use_quant_conv"],
                   use_post_quant_conv=c["use_post_quant_conv"],
                   mid_block_add_attention=c["mid_block_add_attention"])


class VAEBlock(nnx.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets without time embedding, then resample."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, opts: ModelOptions, *,
                 rngs: nnx.Rngs, down: bool, resample: bool):
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, None, groups, _EPS, opts, rngs=rngs)
                                 for i in range(layers)])
        sampler = (Downsample2D(cout, 0, opts, rngs=rngs) if down else Upsample2D(cout, opts, rngs=rngs))
        if down:
            self.downsamplers = nnx.List([sampler]) if resample else None
        else:
            self.upsamplers = nnx.List([sampler]) if resample else None

    def __call__(self, h):
        for r in self.resnets:
            h = r(h)
        samplers = getattr(self, "downsamplers", None) or getattr(self, "upsamplers", None)
        return samplers[0](h) if samplers is not None else h


class VAEMidBlock(nnx.Module):
    """UNetMidBlock2D: resnet, single-head spatial self-attention, resnet."""

    def __init__(self, ch: int, groups: int, add_attention: bool, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(ch, ch, None, groups, _EPS, opts, rngs=rngs) for _ in range(2)])
        self.attentions = (nnx.List([Attention(ch, 1, ch, opts, rngs=rngs, bias=True,
                                               group_norm_groups=groups, eps=_EPS)])
                           if add_attention else None)

    def __call__(self, h):
        h = self.resnets[0](h)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        boc, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, boc[0], 3, opts, padding=1, rngs=rngs)
        self.down_blocks = nnx.List([
            VAEBlock(boc[max(i - 1, 0)], boc[i], cfg.layers_per_block, g, opts, rngs=rngs, down=True,
                     resample=i < n - 1) for i in range(n)])
        self.mid_block = VAEMidBlock(boc[-1], g, cfg.mid_block_add_attention, opts, rngs=rngs)
        self.conv_norm_out = GroupNorm(g, boc[-1], _EPS, opts, rngs=rngs)
        self.conv_out = Conv2d(boc[-1], 2 * cfg.latent_channels, 3, opts, padding=1, rngs=rngs)

    def __call__(self, x):
        h = self.conv_in(x)
        for blk in self.down_blocks:
            h = blk(h)
        h = self.mid_block(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        rev, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, opts, padding=1, rngs=rngs)
        self.mid_block = VAEMidBlock(rev[0], g, cfg.mid_block_add_attention, opts, rngs=rngs)
        self.up_blocks = nnx.List([
            VAEBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, opts, rngs=rngs, down=False,
                     resample=i < n - 1) for i in range(n)])
        self.conv_norm_out = GroupNorm(g, rev[-1], _EPS, opts, rngs=rngs)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, opts, padding=1, rngs=rngs)

    def __call__(self, z):
        h = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            h = blk(h)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    def __init__(self, cfg: VAEConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.opts = opts
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, opts, rngs=rngs)
        self.decoder = Decoder(cfg, opts, rngs=rngs)
        self.quant_conv = Conv2d(2 * lc, 2 * lc, 1, opts, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv2d(lc, lc, 1, opts, rngs=rngs) if cfg.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, 3) in [-1, 1] -> latent distribution (mean, logvar), each (B, h, w, C),
        float32, logvar clipped to [-30, 20] like diffusers' DiagonalGaussianDistribution."""
        h = self.encoder(x.astype(self.opts.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, C) -> images (B, H, W, out_channels), about [-1, 1], float32."""
        z = z.astype(self.opts.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction through the posterior mode (as ``AutoencoderKL.forward(sample_posterior=False)``)."""
        mean, _ = self.encode(x)
        return self.decode(mean)


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """Draw from the diagonal Gaussian posterior."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def scale_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    """VAE latent -> diffusion-space latent: (z - shift) * scaling_factor."""
    return (z - cfg.shift_factor) * cfg.scaling_factor


def unscale_latents(z: jax.Array, cfg: VAEConfig) -> jax.Array:
    return z / cfg.scaling_factor + cfg.shift_factor
