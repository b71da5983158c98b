"""The DreamBooth prior-preservation loss, as a pure function.

loss = mean over instance examples of MSE(pred, target)
     + prior_loss_weight * mean over class examples of MSE(pred, target)

Instance and class examples are marked per example (``is_class``), not by position, so the split
is right however the batch is sharded: the means are global reductions under ``jax.jit``. (The
old diffusers Flax script split each device's shard in two halves after sharding a concatenated
batch, which mixes instance and class examples on more than one device.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all but the batch axis, in float32. Shape (B,)."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(d * d, axis=tuple(range(1, d.ndim)))


def min_snr_weights(snr: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an epsilon or v target."""
    clipped = jnp.minimum(snr, gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    if prediction_type == "epsilon":
        return clipped / snr
    return clipped  # x0 ("sample") target


def prior_preservation_loss(pred: jax.Array, target: jax.Array, is_class: jax.Array,
                            prior_loss_weight: float | jax.Array,
                            weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns (loss, metrics). is_class: (B,) bool/0-1, True for class (prior) examples.
    weights: optional (B,) per-example weights (e.g. min-SNR). An empty half contributes 0."""
    per_ex = per_example_mse(pred, target)
    if weights is not None:
        per_ex = per_ex * weights.astype(jnp.float32)
    cls = is_class.astype(jnp.float32)
    inst = 1.0 - cls
    instance_loss = jnp.sum(per_ex * inst) / jnp.maximum(jnp.sum(inst), 1.0)
    prior_loss = jnp.sum(per_ex * cls) / jnp.maximum(jnp.sum(cls), 1.0)
    loss = instance_loss + prior_loss_weight * prior_loss
    return loss, {"loss": loss, "instance_loss": instance_loss, "prior_loss": prior_loss}
