"""Jit-compiled DeepFloyd IF sampling: stage I (text -> 64x64 pixels) and stage II (x4 super-resolution).

As diffusers' ``IFPipeline`` / ``IFSuperResolutionPipeline``: prompts are encoded by T5
(:func:`encode`; the attention mask reaches T5 only, never the UNet), the UNet denoises pixels
directly (no VAE) and outputs ``[epsilon, variance]`` (6 channels) for the DDPM scheduler's
learned-range variance; classifier-free guidance guides the epsilon half and keeps the
conditional branch's variance; the image is ``(x / 2 + 0.5).clamp(0, 1)``. Stage II upscales the
low-res image bilinearly (``F.interpolate(mode="bilinear", align_corners=True)``), noises it at
``noise_level`` with its image_noising_scheduler, concatenates it after the sample on the channel
axis at every step, and tells the UNet the noise level as class labels (both CFG halves).

Each stage's whole denoising loop is ONE jitted function (``lax.fori_loop`` over the sampler's
step); parameters are arguments, guidance / eta / noise level are traced values, the number of
steps and the image size static. Batches are split over the mesh when one is given.
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
from dreambooth_jax.diffusion.pipeline import _Stage, to_uint8
from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.if_loading import IFPipeline
from dreambooth_jax.models.layers import with_remat
from dreambooth_jax.models.t5 import IF_MAX_LENGTH, encode_prompts
from dreambooth_jax.sharding import replicated


@dataclasses.dataclass
class IFSampleResult:
    images: np.ndarray  # (N, H, W, 3) uint8
    x0: np.ndarray  # (N, H, W, 3) float32: the final sample (diffusers' output_type="pt"), in [-1, 1]


# ----------------------------------------------------------------------------- prompts
@nnx.jit
def _t5_forward(model, ids, mask):
    return model(ids, mask)


def encode(pipe: IFPipeline, prompts: Sequence[str] | str, *, max_length: int = IF_MAX_LENGTH
           ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (embeddings (B, max_length, d_model) float32, attention mask (B, max_length) int32),
    as ``IFPipeline.encode_prompt`` with ``clean_caption=False``: lowercased, stripped, padded to 77
    tokens; T5 reads the mask. The stages take the embeddings only (diffusers' IF pipelines do not
    pass the mask to the UNet); negative prompts are encoded the same way (diffusers' default: "")."""
    if pipe.text_encoder is None or pipe.tokenizer is None:
        missing = " and ".join(n for n in ("text_encoder", "tokenizer") if getattr(pipe, n) is None)
        raise ConfigError(f"{pipe.path} was loaded without a {missing} (its model_index.json may name none, "
                          "as IF stage II folders often do): pass prompt embeddings, e.g. stage I's encode()")
    ids, mask = encode_prompts(pipe.tokenizer, prompts, max_length)
    return np.asarray(_t5_forward(pipe.text_encoder, jnp.asarray(ids), jnp.asarray(mask))), mask


# ----------------------------------------------------------------------------- image ops
def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear interpolation with align_corners=True, computed as
    torch's CPU kernel does in float32: scale = (in - 1) / (out - 1), src = scale * i, i0 = int(src),
    i1 = i0 + 1 (clamped), w1 = src - i0, w0 = 1 - w1; equal sizes copy."""
    if n_in == n_out:
        i = np.arange(n_out)
        return i, i, np.ones(n_out, np.float32), np.zeros(n_out, np.float32)
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = np.float32(scale) * np.arange(n_out, dtype=np.float32)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    return i0, i1, np.float32(1) - w1, w1


def upsample_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """NHWC -> (N, height, width, C), as ``F.interpolate(x, (height, width), mode="bilinear",
    align_corners=True)``: interpolated along the width, then the height, with torch's float32 taps."""
    _, h, w, _ = x.shape
    r0, r1, rw0, rw1 = _linear_taps(h, height)
    c0, c1, cw0, cw1 = _linear_taps(w, width)
    cols = x[:, :, c0] * cw0[:, None] + x[:, :, c1] * cw1[:, None]
    return cols[:, r0] * rw0[:, None, None] + cols[:, r1] * rw1[:, None, None]


# ----------------------------------------------------------------------------- stages
class _IFStage(_Stage):
    """What both IF stages share: the UNet split into graphdef + params (replicated over the mesh),
    the sampler, guidance, and the loop. Uses _Stage's ``_merge`` / ``_put`` / ``_call``; its
    ``__init__`` is not called, since it also splits a VAE and a CLIP text encoder, which IF lacks."""

    def __init__(self, pipe: IFPipeline, sampler: str, steps: int, mesh: Mesh | None, sampler_options: dict | None):
        if pipe.unet is None or pipe.scheduler_config is None:
            raise ConfigError(f"{pipe.path}: load the 'unet' and 'scheduler' components to sample")
        if steps < 1:
            raise ConfigError(f"number of sampling steps must be >= 1, got {steps}")
        self.pipe, self.mesh = pipe, mesh
        self.schedule = schedules.schedule_from_config(pipe.scheduler_config,
                                                       str(pipe.path / "scheduler" / "scheduler_config.json"))
        options = dict(sampler_options or {})
        if sampler.endswith("_karras"):  # as pipeline._Stage: the sampler with Karras sigmas
            sampler, options = sampler.removesuffix("_karras"), dict(options, use_karras_sigmas=True)
        self.sampler = samplers.make_sampler(sampler, self.schedule, steps, **options)
        graphdef, params = nnx.split(with_remat(pipe.unet, False))  # no backward pass here
        self.graphdefs = {"unet": graphdef}
        params = {"unet": params}
        self.params = jax.device_put(params, replicated(mesh)) if mesh is not None else params
        cfg = pipe.unet.config
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)
        self._fn = jax.jit(self._run)

    def _put(self, *arrays):
        """_Stage._put, passing None (an optional input not given) through."""
        placed = iter(super()._put(*(a for a in arrays if a is not None)))
        return tuple(None if a is None else next(placed) for a in arrays)

    def _check_size(self, height: int, width: int) -> None:
        if height <= 0 or width <= 0 or height % self.factor or width % self.factor:
            raise ConfigError(f"image size {height}x{width} must be a positive multiple of {self.factor} "
                              "(the UNet's downsampling)")

    def _embeds(self, prompt_embeds, negative_embeds) -> tuple[np.ndarray, np.ndarray]:
        prompt_embeds = np.asarray(prompt_embeds, np.float32)
        if prompt_embeds.ndim != 3 or not len(prompt_embeds):
            raise ConfigError(f"prompt embeddings must be (N, L, D) with N >= 1, got shape {prompt_embeds.shape}")
        if negative_embeds is None:  # diffusers' default negative prompt: ""
            negative_embeds, _ = encode(self.pipe, [""] * len(prompt_embeds), max_length=prompt_embeds.shape[1])
        negative_embeds = np.asarray(negative_embeds, np.float32)
        if negative_embeds.shape != prompt_embeds.shape:
            raise ConfigError(f"negative embeddings {negative_embeds.shape} and prompt embeddings "
                              f"{prompt_embeds.shape} differ in shape")
        return prompt_embeds, negative_embeds

    def _step_noise(self, step_noise, shape) -> np.ndarray | None:
        """(steps, N, H, W, C) -> batch-major (N, steps, H, W, C), so the mesh splits its batch axis."""
        if step_noise is None:
            return None
        step_noise = np.asarray(step_noise, np.float32)
        if step_noise.shape != (self.sampler.num_steps, *shape):
            raise ConfigError(f"step_noise must be (steps, N, H, W, C) = {(self.sampler.num_steps, *shape)}, "
                              f"got {step_noise.shape}")
        return np.ascontiguousarray(step_noise.swapaxes(0, 1))

    def _denoise(self, unet, context, x, key, step_noise, guidance, eta, image=None, labels=None):
        """The loop: x_T -> x_0. ``image`` (stage II: the noised upscaled image) is concatenated after
        the sample before the sampler's input scaling, as diffusers does; ``labels`` go to both halves."""
        c = x.shape[-1]
        labels2 = None if labels is None else jnp.concatenate([labels, labels])

        def body(i, carry):
            x, state = carry
            x_in = x if image is None else jnp.concatenate([x, image.astype(x.dtype)], axis=-1)
            x_in = self.sampler.scale_model_input(jnp.concatenate([x_in, x_in]), i)
            out = unet(x_in, self.sampler.timesteps[i], context, class_labels=labels2).astype(jnp.float32)
            uncond, text = jnp.split(out, 2)
            (eps_u, _), (eps_c, var_c) = (samplers.split_model_output(o, c) for o in (uncond, text))
            # diffusers guides only when guidance > 1 (else the conditional branch alone)
            eps = jnp.where(guidance > 1, eps_u + guidance * (eps_c - eps_u), eps_c)
            out = eps if var_c is None else jnp.concatenate([eps, var_c], axis=-1)
            noise = None if step_noise is None else step_noise[:, i]
            return self.sampler.step(state, i, out, x, key, eta=eta, noise=noise)

        x, _ = jax.lax.fori_loop(0, self.sampler.num_steps, body, (x, self.sampler.init_state(x)))
        return x


class IFStageI(_IFStage):
    """DeepFloyd IF stage I: prompt embeddings -> (N, height, width, 3) images (64x64 for IF-I)."""

    def __init__(self, pipe: IFPipeline, *, sampler: str = "ddpm", steps: int = 100, mesh: Mesh | None = None,
                 sampler_options: dict | None = None):
        if pipe.is_super_resolution:
            raise ConfigError(f"{pipe.path} is an IF stage II (super-resolution) pipeline; use IFStageII for it")
        super().__init__(pipe, sampler, steps, mesh, sampler_options)
        self.channels = pipe.unet.config.in_channels

    def _run(self, params, cond, uncond, x, key, step_noise, guidance, eta):
        unet = self._merge(params)["unet"]
        context = jnp.concatenate([uncond, cond])
        x = self._denoise(unet, context, x * self.sampler.init_noise_sigma, key, step_noise, guidance, eta)
        return to_uint8(x), x

    def __call__(self, prompt_embeds: np.ndarray, negative_embeds: np.ndarray | None = None, *, height: int = 64,
                 width: int = 64, seed: int = 0, guidance: float = 7.0, eta: float = 0.0,
                 noise: np.ndarray | None = None, step_noise: np.ndarray | None = None) -> IFSampleResult:
        """prompt_embeds / negative_embeds: (N, L, D) from :func:`encode` (negative None: "" encoded
        by the pipeline's T5). noise: the initial x_T (N, height, width, 3), else drawn from ``seed``;
        step_noise: (steps, N, height, width, 3) ancestral noise per step (else drawn from ``seed``)."""
        self._check_size(height, width)
        cond, uncond = self._embeds(prompt_embeds, negative_embeds)
        shape = (len(cond), height, width, self.channels)
        k_x, k_loop = jax.random.split(jax.random.key(seed))
        if noise is None:
            noise = jax.random.normal(k_x, shape, jnp.float32)
        noise = np.asarray(noise, np.float32)
        if noise.shape != shape:
            raise ConfigError(f"noise must be (N, H, W, C) = {shape}, got {noise.shape}")
        step_noise = self._step_noise(step_noise, shape)
        cond, uncond, noise, step_noise = self._put(cond, uncond, noise, step_noise)
        images, x = self._call(self.params, cond, uncond, noise, jax.random.key_data(k_loop), step_noise,
                               jnp.float32(guidance), jnp.float32(eta))
        return IFSampleResult(np.asarray(images), np.asarray(x))


class IFStageII(_IFStage):
    """DeepFloyd IF stage II: low-res images + prompt embeddings -> (N, height, width, 3) images."""

    def __init__(self, pipe: IFPipeline, *, sampler: str = "ddpm", steps: int = 50, mesh: Mesh | None = None,
                 sampler_options: dict | None = None):
        if not pipe.is_super_resolution:
            raise ConfigError(f"{pipe.path} is an IF stage I pipeline; use IFStageI for it")
        if pipe.image_noising_scheduler_config is None:
            raise ConfigError(f"{pipe.path}: load the 'scheduler' component (it reads image_noising_scheduler too)")
        super().__init__(pipe, sampler, steps, mesh, sampler_options)
        self.noising_schedule = schedules.schedule_from_config(
            pipe.image_noising_scheduler_config,
            str(pipe.path / "image_noising_scheduler" / "scheduler_config.json"))
        self.channels = pipe.unet.config.in_channels // 2

    def _run(self, params, cond, uncond, low_res, aug_noise, x, key, step_noise, guidance, eta, noise_level):
        unet = self._merge(params)["unet"]
        context = jnp.concatenate([uncond, cond])
        level = jnp.full((low_res.shape[0],), noise_level, jnp.int32)
        upscaled = upsample_bilinear(low_res, x.shape[1], x.shape[2])
        upscaled = schedules.add_noise(self.noising_schedule, upscaled, aug_noise, level)
        x = self._denoise(unet, context, x * self.sampler.init_noise_sigma, key, step_noise, guidance, eta,
                          image=upscaled, labels=level)
        return to_uint8(x), x

    def __call__(self, low_res: np.ndarray, prompt_embeds: np.ndarray, negative_embeds: np.ndarray | None = None,
                 *, noise_level: int = 250, height: int = 256, width: int = 256, seed: int = 0,
                 guidance: float = 4.0, eta: float = 0.0, noise: np.ndarray | None = None,
                 aug_noise: np.ndarray | None = None, step_noise: np.ndarray | None = None) -> IFSampleResult:
        """low_res: (N, h, w, 3) uint8, or float in [-1, 1] (stage I's ``x0``). noise: x_T
        (N, height, width, 3); aug_noise: the noise added to the upscaled image (N, height, width, 3);
        step_noise: (steps, N, height, width, 3); each drawn from ``seed`` when not given."""
        self._check_size(height, width)
        low_res = np.asarray(low_res)
        if low_res.dtype == np.uint8:  # as diffusers reads a PIL image
            low_res = low_res.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
        low_res = low_res.astype(np.float32)
        cond, uncond = self._embeds(prompt_embeds, negative_embeds)
        if low_res.ndim != 4 or low_res.shape[-1] != self.channels or len(low_res) != len(cond):
            raise ConfigError(f"low-res images must be (N, h, w, {self.channels}) for N = {len(cond)} prompt "
                              f"embeddings, got {low_res.shape}")
        n_train = self.noising_schedule.num_train_timesteps
        if not 0 <= noise_level < n_train:
            raise ConfigError(f"noise_level {noise_level} outside [0, {n_train}) (the image_noising_scheduler's "
                              "timesteps)")
        shape = (len(cond), height, width, self.channels)
        k_x, k_aug, k_loop = jax.random.split(jax.random.key(seed), 3)
        noise = np.asarray(jax.random.normal(k_x, shape, jnp.float32) if noise is None else noise, np.float32)
        aug_noise = np.asarray(jax.random.normal(k_aug, shape, jnp.float32) if aug_noise is None else aug_noise,
                               np.float32)
        for name, a in (("noise", noise), ("aug_noise", aug_noise)):
            if a.shape != shape:
                raise ConfigError(f"{name} must be (N, H, W, C) = {shape}, got {a.shape}")
        step_noise = self._step_noise(step_noise, shape)
        cond, uncond, low_res, aug_noise, noise, step_noise = self._put(
            cond, uncond, low_res, aug_noise, noise, step_noise)
        images, x = self._call(self.params, cond, uncond, low_res, aug_noise, noise, jax.random.key_data(k_loop),
                               step_noise, jnp.float32(guidance), jnp.float32(eta), jnp.int32(noise_level))
        return IFSampleResult(np.asarray(images), np.asarray(x))
