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


OPTIMIZERS = ("adamw", "adafactor")


def make_optimizer(learning_rate: float | optax.Schedule, *, weight_decay: float = 1e-2,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float = 1.0,
                   grad_accum: int = 1, optimizer: str = "adamw") -> optax.GradientTransformation:
    """clip-by-global-norm + the optimizer, optionally accumulating gradients.

    adamw: fp32 first and second moments (8 bytes per trained parameter).
    adafactor: factored second moments (a row and a column vector per matrix), no first moment,
        absolute step sizes (``multiply_by_parameter_scale=False``: the learning rate means what it
        means for AdamW, as kohya's ``relative_step=False, scale_parameter=False``) and decoupled
        weight decay; about 0.01 bytes per parameter of the SD UNet's matrices.
    """
    if optimizer == "adamw":
        opt = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    elif optimizer == "adafactor":
        opt = optax.adafactor(learning_rate, multiply_by_parameter_scale=False, weight_decay_rate=weight_decay or None)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r} (one of {', '.join(OPTIMIZERS)})")
    tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), opt)
    return optax.MultiSteps(tx, grad_accum) if grad_accum > 1 else tx


def init_state(params: dict, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=jax.tree.map(jnp.copy, params) if ema else None)
