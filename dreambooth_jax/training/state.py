"""The train state pytree and the optimizer."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: dict  # {'unet': nnx.State, optionally 'text_encoder': nnx.State}
    opt_state: Any
    ema: dict | None  # EMA of params, or None


def make_optimizer(learning_rate: float | optax.Schedule, *, weight_decay: float = 1e-2,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   grad_accum: int = 1) -> optax.GradientTransformation:
    """clip-by-global-norm + AdamW (fp32 moments), optionally accumulating gradients."""
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm),
                     optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.MultiSteps(tx, grad_accum) if grad_accum > 1 else tx


def init_state(params: dict, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None)
