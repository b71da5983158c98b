"""Weights between diffusers/transformers safetensors and our NNX models, both ways.

Our modules carry diffusers' attribute names, so a parameter at NNX path
``('down_blocks', 0, 'resnets', 1, 'conv1', 'kernel')`` is the tensor
``down_blocks.0.resnets.1.conv1.weight``. Only layouts differ: conv kernels are HWIO here and
OIHW in PyTorch, linear kernels are transposed. Conversion is strict: a checkpoint tensor with no
parameter, or a parameter with no tensor, is an error listing the names.
"""

from __future__ import annotations

import errno as _errno
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import jax
import ml_dtypes  # noqa: F401  registers numpy's "bfloat16" dtype name, which safetensors' numpy reader needs
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from dreambooth_jax.errors import CheckpointError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# safetensors dtype names -> numpy dtypes (for the BF16 fallback below; the library does the rest)
ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
ST_FLOAT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


# ----------------------------------------------------------------------------- safetensors IO
# Reading and writing go through the `safetensors` library (it validates the header, the tensor
# sizes against the file size and the offsets; a damaged file is refused when it is opened).
# What we add: (1) one-line CheckpointErrors naming the file and the fault instead of the
# library's SafetensorError; (2) lazy access: ``safe_open(..., framework="numpy").get_tensor``
# returns a *copy* of one tensor (not a view of the mapping), so reading every tensor of a
# checkpoint up front would hold a second copy of the whole model in memory; we read one tensor
# when it is asked for, so the loader converts and drops them one by one; (3) a fallback for
# BF16: the library's numpy reader builds the array with ``np.dtype("bfloat16")``, which numpy
# only knows once ml_dtypes is imported (imported above), and safetensors releases before the
# numpy bf16 support (issue safetensors#598, 0.5.3) raise ``TypeError: data type 'bfloat16' not
# understood`` even then. For those we read the raw little-endian bytes of that one tensor
# from the file at the offsets of its (already library-validated) header and view them as
# ml_dtypes.bfloat16.
class SafetensorsFiles(Mapping):
    """Read-only ``{name: np.ndarray}`` over one or more safetensors files (shards), read lazily.

    Every file is opened (and so validated by the library) at construction; a tensor is read
    from its file when it is accessed. ``dtypes`` names every tensor's safetensors dtype
    ('F32', 'F16', 'BF16', ...) and ``shapes`` their shapes, without reading any data.
    """

    def __init__(self, paths: Iterable[str | Path]):
        self.paths = [Path(p) for p in paths]
        self._handles, self._where, self.dtypes, self.shapes, self.metadata = [], {}, {}, {}, {}
        for path in self.paths:
            f = _open_safetensors(path)
            self._handles.append(f)
            self.metadata.update(f.metadata() or {})
            for name in f.keys():
                if name in self._where:
                    raise CheckpointError(f"tensor '{name}' is in both {self._where[name][0]} and {path}")
                self._where[name] = (path, f)
                info = f.get_slice(name)
                self.dtypes[name], self.shapes[name] = info.get_dtype(), tuple(info.get_shape())

    def __getitem__(self, name: str) -> np.ndarray:
        path, f = self._where[name]
        try:
            return f.get_tensor(name)
        except TypeError:  # old safetensors: numpy framework cannot build bfloat16 (see above)
            if self.dtypes[name] != "BF16":
                raise
            return _read_raw_tensor(path, name)
        except safetensors.SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor '{name}': {e}") from None

    def nbytes(self) -> int:
        """Bytes of tensor data (what a shard index's ``total_size`` counts)."""
        return sum(int(np.prod(self.shapes[k], dtype=np.int64)) * np.dtype(ST_DTYPES[d]).itemsize
                   for k, d in self.dtypes.items() if d in ST_DTYPES)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _open_safetensors(path: Path):
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist" if not path.exists()
                              else f"weights file {path} is not a file")
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    fix = "re-download or re-export it"
    if size == 0:
        raise CheckpointError(f"{bad}: it is empty (0 bytes; an interrupted download or copy?); {fix}")
    try:
        return safetensors.safe_open(str(path), framework="numpy")
    except safetensors.SafetensorError as e:
        msg = str(e).removeprefix("Error while deserializing header: ")
        if "header too small" in msg:
            why = f"{size} bytes are too few for a safetensors header (truncated?)"
        elif "not fully covered" in msg or "incomplete" in msg:
            why = (f"its size ({size} bytes) does not match the tensor sizes in its header: the file is "
                   "truncated (an interrupted download or copy?) or has extra bytes")
        else:
            why = f"corrupt header ({msg})"
        raise CheckpointError(f"{bad}: {why}; {fix}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read weights file {path}: {e.strerror or e}") from None


def _read_raw_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor's bytes at its header offsets (the library validated the header and sizes)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))[name]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, dtype=ST_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()


def read_safetensors(path: str | Path) -> SafetensorsFiles:
    """A .safetensors file as a read-only ``{name: np.ndarray}`` mapping (lazy; bf16 via
    ml_dtypes; no torch). Raises CheckpointError naming the file if it is missing or damaged."""
    return SafetensorsFiles([path])


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy arrays as a safetensors file loadable by diffusers/transformers (format 'pt').

    Written with ``safetensors.numpy.save_file`` to a temporary file beside ``path``, flushed to
    disk (fsync) and renamed over ``path``: a crash leaves the old file or the new one, never a
    partial one. Disk errors are raised as OSError with their errno (ENOSPC, EACCES, EROFS, ...),
    whatever layer they come from.
    """
    path = Path(path)
    # save_file hands the library each array's data pointer and nbytes: arrays must be
    # C-contiguous (a strided view would write the wrong bytes).
    arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        safetensors.numpy.save_file(arrays, str(tmp), metadata={"format": "pt", **(metadata or {})})
        fsync_path(tmp)
        os.replace(tmp, path)
    except safetensors.SafetensorError as e:
        m = _OS_ERROR.search(str(e))
        if m:  # an I/O error inside the library: keep its errno for the caller
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None
        raise ValueError(f"cannot write {path}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; files must be flushed
        if not (Path(path).is_dir() and e.errno in (_errno.EINVAL, _errno.ENOTSUP, _errno.EBADF)):
            raise
    finally:
        os.close(fd)


# diffusion_pytorch_model.safetensors, model.fp16.safetensors, model-00001-of-00002.safetensors,
# model.fp16-00001-of-00002.safetensors, and their index: model.safetensors.index.json, for a variant
# model.safetensors.index.fp16.json (transformers' and diffusers' name) or model.fp16.safetensors.index.json
_WEIGHT_FILE = re.compile(r"^(?P<stem>diffusion_pytorch_model|model)(?:\.(?P<variant>[A-Za-z0-9_]+))?"
                          r"(?:-\d{5}-of-\d{5})?\.safetensors(?P<index>\.index(?:\.(?P<ivariant>[A-Za-z0-9_]+))?\.json)?$")


def parse_weight_file_name(name: str) -> tuple[str, str | None, bool] | None:
    """``(stem, variant or None, is_index)`` of a diffusers/transformers weight file name, or None."""
    m = _WEIGHT_FILE.match(name)
    if not m or (m["variant"] and m["ivariant"]):
        return None
    return m["stem"], m["variant"] or m["ivariant"], bool(m["index"])


def load_component_weights(folder: Path, stem: str, *, allow_pickle: bool = False,
                           variant: str | None = None) -> Mapping[str, np.ndarray]:
    """Find and read the weights of one component folder.

    stem: 'diffusion_pytorch_model' (diffusers) or 'model' (transformers). Reads a single
    safetensors file or a sharded one (``*.safetensors.index.json``). Pickled ``.bin`` files are
    refused unless ``allow_pickle`` (they can run arbitrary code when loaded).
    """
    name = f"{stem}.{variant}" if variant else stem
    single, index = folder / f"{name}.safetensors", folder / f"{name}.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single)
    if variant and not index.is_file():  # model.safetensors.index.fp16.json: how transformers/diffusers name it
        index = folder / f"{stem}.safetensors.index.{variant}.json"
    if index.is_file():
        return read_sharded(index)
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


def read_shard_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` ({tensor: shard file}) of a ``*.safetensors.index.json``; checked."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("'weight_map' is not a {tensor: file} mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = "no 'weight_map'" if isinstance(e, KeyError) else e
        raise CheckpointError(f"sharded weights index {index} is not valid: {why}") from None
    return weight_map


def read_sharded(index: Path) -> SafetensorsFiles:
    """The shards an index names, as one mapping; checked: every shard exists, and holds the
    tensors the index maps to it."""
    weight_map = read_shard_index(index)
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index} names {len(missing)} shard(s) missing from {index.parent}: "
                              f"{_names(missing)} (an incomplete download or copy?)")
    files = SafetensorsFiles([index.parent / s for s in shards])
    absent = [k for k, s in weight_map.items() if files._where.get(k, (None,))[0] != index.parent / s]
    if absent:
        raise CheckpointError(f"{index} maps {len(absent)} tensor(s) to shards that do not hold them: "
                              f"{_names(absent)}")
    return files


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
