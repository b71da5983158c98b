"""Options shared by every model layer, and strict parsing of diffusers/transformers configs."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from dreambooth_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a model computes, independent of its architecture config.

    dtype: compute dtype of matmuls/convs (bf16 on TPU/GPU). Norms, softmax and the time
        embedding always run in float32.
    param_dtype: dtype in which parameters are stored (float32 master weights by default).
    attention: attention kernel, see ``dreambooth_jax.models.attention.attention``.
    remat: wrap transformer and resnet blocks in ``nnx.remat`` (saves activation memory in
        training at the cost of recomputation).
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "auto"
    remat: bool = False


def parse_config(
    raw: Mapping[str, Any],
    supported: Mapping[str, Any],
    source: str,
    *,
    fixed: Mapping[str, tuple] = (),
    ignored: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """Validate a checkpoint's config dict against what our model implements.

    supported: keys we implement, with their defaults (the returned dict holds all of them).
    fixed: keys we accept only with one of the listed values (the reference's default
        behaviour); any other value is a ConfigError naming key, value and ``source``.
    ignored: keys that do not change the computation (metadata, sample sizes...).
    Keys starting with ``_`` are metadata and ignored. Any other key is a ConfigError.
    """
    fixed = dict(fixed)
    out = dict(supported)
    for key, value in raw.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in supported:
            out[key] = value
        elif key in fixed:
            allowed = fixed[key]
            if _normalize(value) not in [_normalize(a) for a in allowed]:
                raise ConfigError(
                    f"{source}: unsupported value {value!r} for config key '{key}' "
                    f"(dreambooth-jax implements {' or '.join(repr(a) for a in allowed)})")
        else:
            raise ConfigError(
                f"{source}: unknown config key '{key}' (value {value!r}); dreambooth-jax does not "
                "implement it, so loading would silently compute something else")
    return out


def _normalize(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def per_block(value: Any, n: int, key: str, source: str) -> list:
    """Expand an int/bool config value to one entry per block, checking list lengths."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{source}: '{key}' has {len(value)} entries, expected {n} (one per block)")
        return list(value)
    return [value] * n


def check_choice(value: Any, allowed: tuple, key: str, source: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: unsupported value {value!r} for '{key}' (supported: {', '.join(map(repr, allowed))})")
