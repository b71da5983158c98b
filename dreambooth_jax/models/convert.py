"""Weights between diffusers/transformers safetensors and our NNX models, both ways.

Our modules carry diffusers' attribute names, so a parameter at NNX path
``('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')`` is the tensor
``down_blocks.0.resnets.1.conv1.weight``. Only layouts differ: conv kernels are HWIO here and
OIHW in PyTorch, linear kernels are transposed. Conversion is strict: a checkpoint tensor with no
parameter, or a parameter with no tensor, is an error listing the names.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Callable, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from dreambooth_jax.errors import CheckpointError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors IO
def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a .safetensors file into numpy arrays (memory-mapped, bf16 via ml_dtypes, no torch)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read weights file {path}: {e}") from e
    try:
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8:8 + n])
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from e
    out = {}
    base = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(mm, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize,
                                  offset=base + start).reshape(info["shape"])
    return out


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Write numpy arrays as a safetensors file loadable by diffusers/transformers (format 'pt')."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _ST_NAMES:
            raise ValueError(f"cannot write tensor {name} of dtype {a.dtype} to safetensors")
        blob = a.tobytes()
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # 8-byte alignment of the data section
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)


def load_component_weights(folder: Path, stem: str, *, allow_pickle: bool = False,
                           variant: str | None = None) -> dict[str, np.ndarray]:
    """Find and read the weights of one component folder.

    stem: 'diffusion_pytorch_model' (diffusers) or 'model' (transformers). Reads a single
    safetensors file or a sharded one (``*.safetensors.index.json``). Pickled ``.bin`` files are
    refused unless ``allow_pickle`` (they can run arbitrary code when loaded).
    """
    name = f"{stem}.{variant}" if variant else stem
    single, index = folder / f"{name}.safetensors", folder / f"{name}.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        out = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_safetensors(folder / shard))
        return out
    pickled = folder / f"{name}.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{folder} has only pickled weights ({pickled.name}); pickled files can run "
                "arbitrary code when loaded. Convert them to safetensors, or pass allow_pickle=True "
                "(CLI: --allow-pickle) if you trust this file.")
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"reading {pickled} needs PyTorch installed") from e
        sd = torch.load(pickled, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
    raise CheckpointError(f"no weights in {folder}: expected {single.name} (or a sharded index)")


# ----------------------------------------------------------------------------- name/layout maps
def flax_path_to_torch(path: tuple) -> str:
    *parents, leaf = path
    return ".".join([str(p) for p in parents] + [_LEAF_TO_TORCH.get(str(leaf), str(leaf))])


def _to_flax_layout(t: np.ndarray, target_shape: tuple, leaf: str, key: str) -> np.ndarray:
    if leaf == "kernel":
        if t.ndim == 4 and len(target_shape) == 4:
            t = t.transpose(2, 3, 1, 0)
        elif t.ndim == 4 and len(target_shape) == 2 and t.shape[2:] == (1, 1):
            t = t[:, :, 0, 0].T  # 1x1 conv stored for a linear layer (old VAE attention)
        elif t.ndim == 2 and len(target_shape) == 2:
            t = t.T
    if tuple(t.shape) != tuple(target_shape):
        raise CheckpointError(f"tensor '{key}' has shape {tuple(t.shape)} after layout conversion, "
                              f"the model expects {tuple(target_shape)} (config and weights disagree?)")
    return t


def _to_torch_layout(a: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        if a.ndim == 4:
            return a.transpose(3, 2, 0, 1)
        if a.ndim == 2:
            return a.T
    return a


def torch_to_state(tensors: Mapping[str, np.ndarray], abstract_state: nnx.State, *, source: str,
                   rename: Callable[[str], str | None] = lambda k: k, dtype=np.float32) -> nnx.State:
    """Fill an abstract NNX state (from ``nnx.eval_shape``) with checkpoint tensors.

    rename maps a checkpoint key to our key, or to None for tensors to drop (e.g. buffers).
    Raises CheckpointError listing unexpected and missing names.
    """
    wanted = {flax_path_to_torch(p): (p, v) for p, v in nnx.to_flat_state(abstract_state)}
    filled, unexpected = {}, []
    for key, t in tensors.items():
        ours = rename(key)
        if ours is None:
            continue
        if ours not in wanted:
            unexpected.append(key)
            continue
        path, var = wanted[ours]
        arr = _to_flax_layout(np.asarray(t), var.shape, str(path[-1]), key)
        filled[path] = np.asarray(arr, dtype=var.dtype if dtype is None else dtype)
    missing = [k for k, (p, _) in wanted.items() if p not in filled]
    if unexpected or missing:
        raise CheckpointError(
            f"{source}: checkpoint and model disagree.\n"
            + (f"  {len(unexpected)} unexpected tensor(s) in the checkpoint: {_names(unexpected)}\n" if unexpected else "")
            + (f"  {len(missing)} parameter(s) missing from the checkpoint: {_names(missing)}\n" if missing else ""))
    flat = [(p, v.replace(value=filled[p])) for p, v in nnx.to_flat_state(abstract_state)]
    return nnx.from_flat_state(flat)


def state_to_torch(state: nnx.State, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our NNX parameters as a diffusers/transformers state dict (numpy, PyTorch layouts)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        a = np.asarray(jax.device_get(var.get_value() if hasattr(var, "get_value") else var.value))
        out[flax_path_to_torch(path)] = _to_torch_layout(a, str(path[-1])).astype(dtype)
    return out


def _names(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
