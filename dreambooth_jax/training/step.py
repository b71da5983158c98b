"""The DreamBooth train step: a pure function of (state, batch), jitted once over a device mesh.

state holds only what changes (trainable params, optimizer state, EMA, step); frozen parts
(the VAE is never needed: latents are precomputed; the text encoder when not trained) are passed
as arguments, never closed over, so one compiled step serves any weights of that shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dreambooth_jax.diffusion import schedules
from dreambooth_jax.training.loss import min_snr_weights, prior_preservation_loss
from dreambooth_jax.sharding import batch_sharding, param_shardings, replicated
from dreambooth_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step computes; every field is static (a change recompiles)."""

    prior_loss_weight: float = 1.0
    min_snr_gamma: float | None = None  # None: plain MSE
    offset_noise: float = 0.0  # std of a per-channel constant added to the noise
    ema_decay: float | None = None  # None: no EMA
    train_text_encoder: bool = False
    sr_noise_level: int | None = None  # x4 upscaler: low-res noise augmentation level (class label)
    sr_noise_random: bool = False  # draw each example's level uniformly from [0, sr_noise_level] (pretraining)
    latent_scale: float = 0.18215  # VAE scaling_factor
    latent_shift: float = 0.0


def _denoise_inputs(cfg: StepConfig, schedule, low_res_schedule, batch: dict, key: jax.Array):
    """Sample latents, timesteps and noise; returns (model input, timesteps, class labels, target, snr)."""
    k_lat, k_noise, k_t, k_off, k_lr = jax.random.split(key, 5)
    mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_lat, mean.shape, mean.dtype)
    x0 = (z - cfg.latent_shift) * cfg.latent_scale
    b = x0.shape[0]
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    if cfg.offset_noise:
        noise = noise + cfg.offset_noise * jax.random.normal(k_off, (b, 1, 1, x0.shape[-1]), x0.dtype)
    t = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noisy = schedules.add_noise(schedule, x0, noise, t)
    target = schedules.training_target(schedule, x0, noise, t)
    labels = None
    if cfg.sr_noise_level is not None:  # x4 upscaler: condition on the noise-augmented low-res image
        if cfg.sr_noise_random:
            level = jax.random.randint(jax.random.fold_in(k_lr, 1), (b,), 0, cfg.sr_noise_level + 1)
        else:
            level = jnp.full((b,), cfg.sr_noise_level, jnp.int32)
        low = batch["low_res"]
        low = schedules.add_noise(low_res_schedule, low, jax.random.normal(k_lr, low.shape, low.dtype), level)
        noisy = jnp.concatenate([noisy, low.astype(noisy.dtype)], axis=-1)
        labels = level
    return noisy, t, labels, target, schedules.snr(schedule, t)


def make_train_step(unet_graphdef: nnx.GraphDef, schedule, tx: optax.GradientTransformation,
                    cfg: StepConfig, *, text_graphdef: nnx.GraphDef | None = None,
                    low_res_schedule=None) -> Callable:
    """Returns ``step(state, batch, rng, frozen) -> (state, metrics)`` (not yet jitted).

    batch: latent_mean/latent_logvar (B, h, w, C) from the frozen VAE, is_class (B,), and either
    ``context`` (B, L, D) precomputed text embeddings or ``input_ids`` (B, L) when the text
    encoder is trained; ``low_res`` (B, h, w, 3) for the upscaler. frozen: {'text_encoder': state}
    when the text encoder is frozen but ids are given, else {}.
    """
    prediction_type = schedule.prediction_type

    def loss_fn(params, frozen, batch, key):
        if "input_ids" in batch:
            te_state = params["text_encoder"] if cfg.train_text_encoder else frozen["text_encoder"]
            context, _ = nnx.merge(text_graphdef, te_state)(batch["input_ids"])
        else:
            context = batch["context"]
        noisy, t, labels, target, snr = _denoise_inputs(cfg, schedule, low_res_schedule, batch, key)
        pred = nnx.merge(unet_graphdef, params["unet"])(noisy, t, context, class_labels=labels)
        weights = None if cfg.min_snr_gamma is None else min_snr_weights(snr, cfg.min_snr_gamma, prediction_type)
        return prior_preservation_loss(pred, target, batch["is_class"], cfg.prior_loss_weight, weights)

    def step(state: TrainState, batch: dict, rng: jax.Array, frozen: dict):
        key = jax.random.fold_in(rng, state.step)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, frozen, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = cfg.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics

    return step


def jit_train_step(step: Callable, abstract_state: TrainState, abstract_batch: dict,
                   abstract_frozen: dict, mesh) -> Callable:
    """jit with declared in/out shardings and the state donated; compile ahead of time so shape
    errors surface before any data is loaded. Returns the compiled executable."""
    s_state = param_shardings(abstract_state, mesh)
    s_batch = {k: batch_sharding(mesh, v.ndim) for k, v in abstract_batch.items()}
    s_frozen = param_shardings(abstract_frozen, mesh)
    jitted = jax.jit(step, in_shardings=(s_state, s_batch, replicated(mesh), s_frozen),
                     out_shardings=(s_state, replicated(mesh)), donate_argnums=(0,))
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jitted.lower(abstract_state, abstract_batch, rng, abstract_frozen).compile()
