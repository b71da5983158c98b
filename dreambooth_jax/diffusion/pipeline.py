"""Jit-compiled text-to-image (base) and super-resolution (x4 upscaler) pipelines.

Each stage is ONE jitted function: token ids -> text embeddings -> the whole denoising loop
(``lax.fori_loop`` over the sampler's step) -> VAE decode -> uint8 images. Parameters are
arguments (never closed over); guidance scale, eta and the upscaler's noise level are traced
values, so changing them does not recompile; the number of steps and image size are static.
Batches are split over the mesh's data axes when a mesh is given.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dreambooth_jax.diffusion import samplers, schedules
from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.layers import with_remat
from dreambooth_jax.models.loading import Pipeline, tokenize
from dreambooth_jax.sharding import batch_sharding, replicated


def to_uint8(images: jax.Array) -> jax.Array:
    """[-1, 1] float images -> uint8, rounding like diffusers' numpy_to_pil."""
    return jnp.round(jnp.clip(images / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)


@dataclasses.dataclass
class SampleResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    latents: np.ndarray  # final latents (N, h, w, C), float32


class _Stage:
    """Shared machinery of both stages: split models into graphdef + params, shard, jit."""

    def __init__(self, pipe: Pipeline, sampler: str, steps: int, mesh: Mesh | None, sampler_options: dict,
                 scheduler_config: dict):
        if steps < 1:
            raise ConfigError(f"number of sampling steps must be >= 1, got {steps}")
        self.pipe = pipe
        self.mesh = mesh
        self.schedule = schedules.schedule_from_config(scheduler_config)
        if sampler.endswith("_karras"):  # e.g. dpmpp_2m_karras: the sampler with Karras sigmas
            sampler, sampler_options = sampler.removesuffix("_karras"), dict(sampler_options, use_karras_sigmas=True)
        self.sampler = samplers.make_sampler(sampler, self.schedule, steps, **sampler_options)
        self.graphdefs, params = {}, {}
        for name in ("unet", "vae", "text_encoder"):  # no remat: there is no backward pass here
            self.graphdefs[name], params[name] = nnx.split(with_remat(getattr(pipe, name), False))
        self.params = jax.device_put(params, replicated(mesh)) if mesh is not None else params
        self._compiled = None

    def _merge(self, params):
        return {k: nnx.merge(self.graphdefs[k], params[k]) for k in self.graphdefs}

    def _encode_text(self, models, ids, neg_ids):
        cond, _ = models["text_encoder"](ids)
        uncond, _ = models["text_encoder"](neg_ids)
        return jnp.concatenate([uncond, cond], axis=0)

    def _guided(self, unet, context, guidance, labels=None):
        def model_fn(x, t):
            out = unet(jnp.concatenate([x, x], axis=0), t, context,
                       class_labels=None if labels is None else jnp.concatenate([labels, labels]))
            uncond, cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
            return uncond + guidance * (cond - uncond)
        return model_fn

    def _put(self, *arrays):
        if self.mesh is None:
            return arrays
        n = self.mesh.size
        for a in arrays:
            if a.shape[0] % n:
                raise ConfigError(f"batch of {a.shape[0]} images does not split over {n} devices; "
                                  f"use a multiple of {n}")
        return tuple(jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in arrays)

    def _call(self, *args):
        """The jitted loop, traced with the mesh in context (kernels XLA cannot partition run per shard)."""
        if self.mesh is None:
            return self._fn(*args)
        with jax.set_mesh(self.mesh):
            return self._fn(*args)

    def _ids(self, prompts: Sequence[str], negative: Sequence[str] | str | None):
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("no prompts given (need at least one image to sample)")
        if negative is None or isinstance(negative, str):
            negative = [negative or ""] * len(prompts)
        if len(negative) != len(prompts):
            raise ConfigError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
        max_len = self.pipe.text_encoder.config.max_position_embeddings
        return tokenize(self.pipe.tokenizer, prompts, max_len), tokenize(self.pipe.tokenizer, negative, max_len)


class BaseSampler(_Stage):
    """Text -> image for SD 1.x/2.x pipelines (epsilon or v-prediction)."""

    def __init__(self, pipe: Pipeline, *, sampler: str = "ddim", steps: int = 50, mesh: Mesh | None = None,
                 sampler_options: dict | None = None):
        super().__init__(pipe, sampler, steps, mesh, sampler_options or {}, pipe.scheduler_config)
        if pipe.is_upscaler:
            raise ConfigError(f"{pipe.path} is an x4 upscaler; use UpscaleSampler for it")
        self.latent_channels = pipe.unet.config.in_channels
        self.factor = pipe.vae.config.downscale
        self._fn = jax.jit(self._run)

    def _run(self, params, ids, neg_ids, latents, key, guidance, eta):
        models = self._merge(params)
        context = self._encode_text(models, ids, neg_ids)
        model_fn = self._guided(models["unet"], context, guidance)
        x = samplers.sample_loop(self.sampler, model_fn, latents * self.sampler.init_noise_sigma, key, eta=eta)
        vcfg = self.pipe.vae.config
        images = models["vae"].decode(x / vcfg.scaling_factor + vcfg.shift_factor)
        return to_uint8(images), x

    def initial_latents(self, n: int, height: int, width: int, seed: int) -> np.ndarray:
        """Standard-normal starting latents, reproducible per (seed, n, size)."""
        self._check_size(height, width)
        shape = (n, height // self.factor, width // self.factor, self.latent_channels)
        return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))

    def _check_size(self, height: int, width: int) -> None:
        multiple = self.factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ConfigError(f"image size {height}x{width} must be a positive multiple of {multiple} "
                              f"(VAE factor {self.factor} x UNet downsampling)")

    def __call__(self, prompts: Sequence[str], *, negative_prompts=None, height: int = 512, width: int = 512,
                 seed: int = 0, guidance: float = 7.5, eta: float = 0.0, latents: np.ndarray | None = None
                 ) -> SampleResult:
        ids, neg = self._ids(prompts, negative_prompts)
        if latents is None:
            latents = self.initial_latents(len(ids), height, width, seed)
        ids, neg, latents = self._put(ids, neg, np.asarray(latents, np.float32))
        key = jax.random.key_data(jax.random.key(seed + 1))
        images, x = self._call(self.params, ids, neg, latents, key, jnp.float32(guidance), jnp.float32(eta))
        return SampleResult(np.asarray(images), np.asarray(x))


class UpscaleSampler(_Stage):
    """SD x4 upscaler: low-res image -> noise augmentation at ``noise_level`` through the
    low_res_scheduler -> concatenated with the latent -> denoised with class_labels=noise_level ->
    decoded by the upscaler's VAE (scaling 0.08333)."""

    def __init__(self, pipe: Pipeline, *, sampler: str = "ddim", steps: int = 50, mesh: Mesh | None = None,
                 sampler_options: dict | None = None):
        if not pipe.is_upscaler:
            raise ConfigError(f"{pipe.path} has no low_res_scheduler: not an x4 upscaler pipeline")
        super().__init__(pipe, sampler, steps, mesh, sampler_options or {}, pipe.scheduler_config)
        self.low_res_schedule = schedules.schedule_from_config(pipe.low_res_scheduler_config)
        self.latent_channels = pipe.vae.config.latent_channels
        self.factor = pipe.vae.config.downscale
        self._fn = jax.jit(self._run)

    def _run(self, params, ids, neg_ids, low_res, aug_noise, latents, key, guidance, eta, noise_level):
        models = self._merge(params)
        context = self._encode_text(models, ids, neg_ids)
        level = jnp.full((low_res.shape[0],), noise_level, jnp.int32)
        image = schedules.add_noise(self.low_res_schedule, low_res, aug_noise, level)
        image2, level2 = jnp.concatenate([image, image]), jnp.concatenate([level, level])
        unet = models["unet"]

        def model_fn(x, t):  # the low-res image is concatenated after the sampler's input scaling
            x_in = jnp.concatenate([jnp.concatenate([x, x]), image2.astype(x.dtype)], axis=-1)
            uncond, cond = jnp.split(unet(x_in, t, context, class_labels=level2).astype(jnp.float32), 2)
            return uncond + guidance * (cond - uncond)

        x = samplers.sample_loop(self.sampler, model_fn, latents * self.sampler.init_noise_sigma, key, eta=eta)
        images = models["vae"].decode(x / self.pipe.vae.config.scaling_factor)
        return to_uint8(images), x

    def __call__(self, low_res: np.ndarray, prompts: Sequence[str], *, negative_prompts=None,
                 noise_level: int = 20, seed: int = 0, guidance: float = 9.0, eta: float = 0.0,
                 latents: np.ndarray | None = None, aug_noise: np.ndarray | None = None) -> SampleResult:
        """low_res: (N, h, w, 3) uint8 or float in [-1, 1]; output is (N, 4h, 4w, 3) uint8.
        latents / aug_noise: optional initial latents and low-res augmentation noise (else drawn
        from ``seed``)."""
        low_res = np.asarray(low_res)
        if low_res.dtype == np.uint8:
            low_res = low_res.astype(np.float32) / 127.5 - 1.0
        if not 0 <= noise_level <= (self.pipe.max_noise_level or 350):
            raise ConfigError(f"noise_level {noise_level} outside [0, {self.pipe.max_noise_level}]")
        ids, neg = self._ids(prompts, negative_prompts)
        if len(ids) != len(low_res):
            raise ConfigError(f"{len(low_res)} low-res images for {len(ids)} prompts")
        n, h, w, _ = low_res.shape
        k_lat, k_aug, k_loop = jax.random.split(jax.random.key(seed), 3)
        if latents is None:
            latents = jax.random.normal(k_lat, (n, h, w, self.latent_channels), jnp.float32)
        if aug_noise is None:
            aug_noise = jax.random.normal(k_aug, low_res.shape, jnp.float32)
        ids, neg, low_res, aug_noise, latents = self._put(
            ids, neg, low_res.astype(np.float32), np.asarray(aug_noise, np.float32), np.asarray(latents, np.float32))
        images, x = self._call(self.params, ids, neg, low_res, aug_noise, latents, jax.random.key_data(k_loop),
                             jnp.float32(guidance), jnp.float32(eta), jnp.int32(noise_level))
        return SampleResult(np.asarray(images), np.asarray(x))
