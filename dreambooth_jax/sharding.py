"""Device mesh and sharding rules: one place that decides where every array lives (used by the
train step and the samplers alike, so sampling never depends on the trainer).

Mesh axes: ``data`` (pure data parallelism, parameters replicated) and ``fsdp`` (data parallel
too, but parameters and optimizer state are split along it). The batch axis is split over both.
A parameter is split over ``fsdp`` along its largest dimension divisible by the fsdp size, if it
is large enough for that to pay; small ones (norms, biases) stay replicated.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over every device
MIN_SHARD_SIZE = 2 ** 14  # parameters with fewer elements are replicated


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices (of every process); fsdp must divide the count."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"fsdp={fsdp} must be >= 1 and divide the number of devices ({n})")
    return Mesh(np.asarray(devices).reshape(n // fsdp, fsdp), (DATA, FSDP))


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shard the largest dimension divisible by the fsdp size; replicate small or indivisible ones."""
    if fsdp_size <= 1 or math.prod(shape) < MIN_SHARD_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return P(*spec)
    return P()


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, optimizer state)."""
    n = mesh.shape[FSDP]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), n)), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis split over all devices; other axes whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble a global batch from each process's local slice (multi-host), or simply place a
    whole batch (single host). Every leaf's leading axis is the batch axis."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in local.items()}
