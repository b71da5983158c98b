"""The DreamBooth train step: a pure function of (state, batch), jitted once over a device mesh.

state holds only what changes (trainable params, optimizer state, EMA, step); frozen parts
(the VAE is never needed: latents are precomputed; the text encoder when not trained) are passed
as arguments, never closed over, so one compiled step serves any weights of that shape.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dreambooth_jax.diffusion import schedules
from dreambooth_jax.models.lora import LoRAKey, set_dropout_keys
from dreambooth_jax.training.loss import min_snr_weights, prior_preservation_loss
from dreambooth_jax.sharding import MIN_SHARD_SIZE, batch_sharding, param_shardings, replicated
from dreambooth_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step computes; every field is static (a change recompiles)."""

    prior_loss_weight: float = 1.0
    min_snr_gamma: float | None = None  # None: plain MSE
    offset_noise: float = 0.0  # std of a per-channel constant added to the noise
    ema_decay: float | None = None  # None: no EMA
    sr_noise_level: int | None = None  # x4 upscaler: low-res noise augmentation level (class label)
    sr_noise_random: bool = False  # draw each example's level uniformly from [0, sr_noise_level] (pretraining)
    latent_scale: float = 0.18215  # VAE scaling_factor
    # Compute dtype of the trained weight matrices / kernels, cast on their fsdp shards before the
    # model runs (so the all-gather moves and holds bf16, not fp32); None: float32 compute. The layers
    # cast kernels to the compute dtype anyway, so the forward is unchanged.
    cast_params: str | None = None
    latent_shift: float = 0.0


def _denoise_inputs(cfg: StepConfig, schedule, low_res_schedule, batch: dict, key: jax.Array):
    """Sample latents, timesteps and noise; returns (model input, timesteps, class labels, target, snr)."""
    k_lat, k_noise, k_t, k_off, k_lr = jax.random.split(key, 5)
    mean = batch["latent_mean"]
    if "latent_logvar" in batch:  # a VAE's latent distribution: one draw per step
        z = mean + jnp.exp(0.5 * batch["latent_logvar"]) * jax.random.normal(k_lat, mean.shape, mean.dtype)
    else:  # pixel space (DeepFloyd IF): the images themselves
        z = mean
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

    batch: latent_mean/latent_logvar (B, h, w, C) from the frozen VAE (latent_mean alone: pixel
    space, the images in [-1, 1], as DeepFloyd IF trains), is_class (B,), and either
    ``context`` (B, L, D) precomputed text embeddings or ``input_ids`` (B, L) when the text
    encoder runs in the step; ``low_res`` (B, h, w, 3) for the upscaler (for DeepFloyd IF stage II
    already upscaled to the sample's size, as its UNet reads it).
    state.params: {'unet': ..., optionally 'text_encoder': ...}, what is trained: a whole model's
    parameters, or only its LoRA adapters. frozen: {name: the rest of that model} for every model
    that is not trained whole: its frozen base (in the compute dtype) beside the adapters in
    state.params, or all of it for a frozen text encoder that gets ids. A model's graphdef must
    come from ``nnx.split(model, <trained filter>, ...)`` in that order.
    """
    prediction_type = schedule.prediction_type
    _MODEL_INDEX = {"unet": 0, "text_encoder": 1}
    graphdefs = {"unet": unet_graphdef, "text_encoder": text_graphdef}

    def model(name, params, frozen, key):
        # tree.map rebuilds the frozen part's Variables at this trace level: merged as they come (created
        # outside jax.grad), a lifted nnx.remat inside the model could not update them
        parts = [jax.tree.map(lambda a: a, p[name]) for p in (params, frozen) if name in p]
        if cfg.cast_params is not None and name in params:
            parts[0] = jax.tree.map(lambda a: _cast_weight(a, cfg.cast_params), parts[0])
        m = nnx.merge(graphdefs[name], *parts)
        keys = nnx.state(m, LoRAKey)
        if jax.tree.leaves(keys):  # LoRA dropout: fresh masks every step
            nnx.update(m, set_dropout_keys(keys, jax.random.key_data(jax.random.fold_in(key, _MODEL_INDEX[name]))))
        return m

    def loss_fn(params, frozen, batch, key):
        k_model = jax.random.fold_in(key, 7)  # dropout masks; key itself as before (noise, timesteps)
        if "input_ids" in batch:
            context, _ = model("text_encoder", params, frozen, k_model)(batch["input_ids"])
        else:
            context = batch["context"]
        noisy, t, labels, target, snr = _denoise_inputs(cfg, schedule, low_res_schedule, batch, key)
        pred = model("unet", params, frozen, k_model)(noisy, t, context, class_labels=labels)
        if pred.shape[-1] == 2 * target.shape[-1]:  # learned variance (DeepFloyd IF): the loss is on eps
            pred = pred[..., :target.shape[-1]]  # only, as diffusers' IF DreamBooth script trains it
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


def _cast_weight(a: jax.Array, dtype: str) -> jax.Array:
    """Weight matrices and kernels (the arrays fsdp shards) in ``dtype``; norms and biases stay fp32."""
    if a.ndim >= 2 and a.size >= MIN_SHARD_SIZE and jnp.issubdtype(a.dtype, jnp.floating):
        return a.astype(dtype)
    return a


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
    with jax.set_mesh(mesh):  # traced with the mesh in context: kernels XLA cannot partition run per shard
        return jitted.lower(abstract_state, abstract_batch, rng, abstract_frozen).compile()
