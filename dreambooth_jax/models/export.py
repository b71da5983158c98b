"""Export our models back to the diffusers/transformers layout: one component folder
(``save_component``) or a whole pipeline folder (``export_pipeline``), written beside the target
and renamed into place, in one dtype for the whole folder (the source's unless asked)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
from flax import nnx

from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models.clip import CLIPTextModel
from dreambooth_jax.models.convert import (ST_FLOAT_NAMES, SafetensorsFiles, fsync_path, parse_weight_file_name,
                                           read_safetensors, read_shard_index, state_to_torch,
                                           write_safetensors)
from dreambooth_jax.models.unet import UNet2DConditionModel
from dreambooth_jax.models.vae import AutoencoderKL
from dreambooth_jax.models.hub import resolve_model_path
from dreambooth_jax.models.loading import _read_json

DIFFUSERS_VERSION = "0.42.1"  # written into exported configs; any diffusers >= 0.20 reads them
_EXPORT = {
    UNet2DConditionModel: ("UNet2DConditionModel", "diffusion_pytorch_model", ""),
    AutoencoderKL: ("AutoencoderKL", "diffusion_pytorch_model", ""),
    CLIPTextModel: ("CLIPTextModel", "model", "text_model."),
}
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                 "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
# weight file variants diffusers/transformers load with ``variant=...``, and their dtype
VARIANT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def export_dtype(dtype) -> np.dtype:
    """'float32' / 'float16' / 'bfloat16' (or fp32/fp16/bf16, or a numpy/jax dtype) -> np.dtype."""
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = repr(dtype)
    name = _DTYPE_ALIASES.get(name.lower(), name.lower())
    if name not in EXPORT_DTYPES:
        raise ConfigError(f"unsupported export dtype {dtype!r}; choose float32, float16 or bfloat16")
    return EXPORT_DTYPES[name]


def _os_error_message(e: OSError, folder: Path, outcome: str, tmp: Path | None = None) -> str:
    """One line for a disk error while writing ``folder``; ``outcome`` says what is left."""
    where = str(e.filename) if e.filename else ""
    if tmp and where.startswith(str(tmp) + os.sep):  # in the temporary folder: name the file inside
        where = f"at {where[len(str(tmp)) + 1:]}"
    where = f" ({where})" if where else ""
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"disk full while writing {folder}: {reason}{where}; {outcome}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {folder}: {reason}{where} (read-only filesystem or no permission); {outcome}"
    return f"writing {folder} failed: {reason}{where}; {outcome}"


def _variant_file(stem: str, variant: str | None) -> str:
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


def _write_component(model: nnx.Module, folder: Path, dtype: np.dtype, variants: Iterable[str] = ()) -> None:
    class_name, stem, prefix = _EXPORT[type(model)]
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model.config.raw)
    if isinstance(model, CLIPTextModel):
        config.setdefault("architectures", ["CLIPTextModel"])
        config.setdefault("model_type", "clip_text_model")
        _set_transformers_load_dtype(config)
    else:
        config["_class_name"] = class_name
        config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    state = nnx.state(model, nnx.Param)
    for variant in [None, *variants]:
        dt = dtype if variant is None else EXPORT_DTYPES[VARIANT_DTYPES[variant]]
        tensors = state_to_torch(state, dtype=dt)
        write_safetensors(folder / _variant_file(stem, variant), {prefix + k: v for k, v in tensors.items()})
        del tensors
    _write_json(folder / "config.json", config)


def _write_json(path: Path, data: dict) -> None:
    """Replace a JSON file whole (temporary file, then rename)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _set_transformers_load_dtype(config: dict) -> None:
    """The dtype transformers gives a model loaded with default arguments.

    transformers >= 5 loads with ``dtype="auto"``: the config's ``dtype`` if set, else the
    weights' dtype, while diffusers loads its own models (UNet, VAE) in float32 unless asked
    otherwise. A pipeline of float16 files loaded with ``from_pretrained(folder)`` would then run
    a float16 text encoder into a float32 UNet (``mat1 and mat2 must have the same dtype``).
    So the config says float32, which is also what transformers < 5 does by default; an explicit
    ``torch_dtype=`` at load time overrides it for every component alike.
    """
    config["dtype"] = "float32"
    if "torch_dtype" in config:
        config["torch_dtype"] = "float32"


def save_component(model: nnx.Module, folder: str | Path, *, overwrite: bool = False,
                   dtype=np.float32, variants: Iterable[str] = ()) -> Path:
    """Write one model as a diffusers/transformers component folder (config.json + safetensors).

    dtype: of the weights file ('float32', 'float16', 'bfloat16' or a dtype). variants: also
    write ``<stem>.fp16.safetensors`` / ``.bf16`` / ``.fp32`` (what ``variant=`` loads).
    Disk errors are one-line CheckpointErrors.
    """
    folder = Path(folder)
    dt = export_dtype(dtype)
    bad = [v for v in variants if v not in VARIANT_DTYPES]
    if bad:
        raise ConfigError(f"unsupported weight variant(s) {bad}; choose from {sorted(VARIANT_DTYPES)}")
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise CheckpointError(f"refusing to overwrite non-empty folder {folder}")
    try:
        _write_component(model, folder, dt, variants)
    except OSError as e:
        raise CheckpointError(_os_error_message(e, folder, "each file in it is whole, old or new")) from None
    return folder


# --- the dtype of a pipeline folder
def _weight_files(folder: Path) -> list[tuple[Path, str | None, bool]]:
    """(file, variant, is_index) of the diffusers/transformers weight files in a component folder."""
    out = []
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            parsed = parse_weight_file_name(f.name)
            if parsed and f.is_file():
                out.append((f, parsed[1], parsed[2]))
    return out


def _main_weight_paths(folder: Path) -> list[Path]:
    """The safetensors files a default (no ``variant``) load reads; shards through their index."""
    files = _weight_files(folder)
    for f, variant, is_index in files:
        if variant is None and is_index:
            return [folder / s for s in sorted(set(read_shard_index(f).values()))]
    return [f for f, variant, is_index in files if variant is None and not is_index
            and not re.search(r"-\d{5}-of-\d{5}\.safetensors$", f.name)]


def pipeline_dtype(folder: str | Path) -> np.dtype | None:
    """The floating dtype of a pipeline folder's weights (from the safetensors headers, what a
    default load reads: no variant files), float32 if its components disagree, None if it has none."""
    folder = Path(folder)
    found = set()
    for component in sorted(d for d in folder.iterdir() if d.is_dir()):
        for f in _main_weight_paths(component):
            if f.is_file():
                found |= {ST_FLOAT_NAMES[d] for d in SafetensorsFiles([f]).dtypes.values() if d in ST_FLOAT_NAMES}
    if not found:
        return None
    if len(found) == 1 and next(iter(found)) in EXPORT_DTYPES:
        return EXPORT_DTYPES[next(iter(found))]
    return EXPORT_DTYPES["float32"]  # mixed (say a float32 UNet beside a float16 VAE): float32 holds every value


# --- export
def export_pipeline(source: str | Path, out: str | Path, models: dict[str, nnx.Module], *,
                    overwrite: bool = False, dtype=None) -> Path:
    """Write a complete pipeline folder: ``source``'s files, with ``models`` (e.g. the fine-tuned
    ``{'unet': unet}``) written in place of the originals. ``source`` is never modified.

    dtype: of every component's weights: None (default) keeps the source's (read from its
    safetensors headers; float32 if its components disagree), 'float32' / 'float16' /
    'bfloat16' converts the copied components too. fp16/bf16/fp32 ``variant`` files of a
    replaced component are written where the source had them. The folder loads with
    ``StableDiffusionPipeline.from_pretrained(out)`` (see ``_set_transformers_load_dtype``).

    Atomic: the new folder is written beside ``out`` (``<out>.tmp-<pid>``), flushed to disk, and
    renamed into place; a previous ``out`` is replaced only then. A full disk or read-only
    target is a one-line CheckpointError and leaves the previous ``out`` as it was.
    """
    source, out = resolve_model_path(source), Path(out)
    if out.resolve() == source.resolve():
        raise CheckpointError(f"export folder {out} is the source folder; choose another")
    if source.resolve() in out.resolve().parents:
        raise CheckpointError(f"export folder {out} is inside the source folder {source}; choose another")
    unknown = [f"{n} ({type(m).__name__})" for n, m in models.items() if type(m) not in _EXPORT]
    if unknown:
        raise ValueError(f"cannot export {', '.join(unknown)}: only {', '.join(c.__name__ for c in _EXPORT)}")
    target = export_dtype(dtype) if dtype is not None else (pipeline_dtype(source) or EXPORT_DTYPES["float32"])
    _clean_stale_exports(out)
    existed = out.exists() or out.is_symlink()
    if existed and not out.is_dir():
        raise CheckpointError(f"export folder {out} is a file; choose another path")
    if existed and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"refusing to overwrite non-empty folder {out}")
    kept = f"the previous {out} is unchanged" if existed else f"nothing was written to {out}"
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_export(source, tmp, models, target)
        _fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(_os_error_message(e, out, kept, tmp)) from None
        raise
    _move_into_place(tmp, out, existed, kept)
    return out


def _write_export(source: Path, dst: Path, models: dict[str, nnx.Module], target: np.dtype) -> None:
    _read_json(source / "model_index.json")  # a pipeline folder
    for entry in sorted(source.iterdir()):
        if entry.name in models:
            continue
        if entry.is_dir():
            _copy_component(entry, dst / entry.name, target)
        else:
            _copy_file(entry, dst / entry.name)
    for name, model in models.items():
        variants = sorted({v for _, v, _ in _weight_files(source / name) if v in VARIANT_DTYPES})
        _write_component(model, dst / name, target, variants)


def _copy_component(src: Path, dst: Path, target: np.dtype) -> None:
    """Copy a component folder; its default (non-variant) safetensors weights are converted to
    ``target`` where they differ (variant files are copied as they are: their name is their dtype),
    and a transformers model's config gets the load dtype of ``_set_transformers_load_dtype``."""
    main = set(_main_weight_paths(src))

    def copy(s: Path, d: Path) -> None:
        if s not in main or not _convert_weights(s, d, target):
            _copy_file(s, d)

    _copy_tree(src, dst, copy)
    for f, variant, is_index in _weight_files(dst):
        if is_index and variant is None:  # keep total_size right after a conversion
            data = json.loads(f.read_text())
            total = sum(SafetensorsFiles([dst / s]).nbytes() for s in sorted(set(data["weight_map"].values())))
            if data.get("metadata", {}).get("total_size") not in (None, total):
                data["metadata"]["total_size"] = total
                _write_json(f, data)
    if (dst / "config.json").is_file() and _weight_files(dst):
        config = _read_json(src / "config.json")
        # a transformers model (text encoder, safety checker): not a diffusers config (_class_name)
        if isinstance(config, dict) and "_class_name" not in config and (
                "model_type" in config or "architectures" in config):
            _set_transformers_load_dtype(config)
            _write_json(dst / "config.json", config)


def _copy_file(src: Path, dst: Path) -> None:
    """shutil.copy2, whose errors name the file written (copy2 may name the source instead)."""
    try:
        shutil.copy2(src, dst)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), str(dst)) from e


def _copy_tree(src: Path, dst: Path, copy_file: Callable[[Path, Path], None]) -> None:
    """shutil.copytree without its error aggregation (which hides the errno of a full disk):
    the first error propagates as it is. Symlinks (a hub cache snapshot) are copied as files."""
    dst.mkdir()
    for entry in sorted(src.iterdir()):
        if entry.is_dir():
            _copy_tree(entry, dst / entry.name, copy_file)
        else:
            copy_file(entry, dst / entry.name)


def _convert_weights(src: Path, dst: Path, target: np.dtype) -> bool:
    """Write ``src`` with its floating tensors in ``target``; False (nothing written) if it is
    already all ``target``."""
    files = read_safetensors(src)
    floats = {k for k, d in files.dtypes.items() if d in ST_FLOAT_NAMES}
    if all(ST_FLOAT_NAMES[files.dtypes[k]] == target.name for k in floats):
        return False
    meta = {k: v for k, v in files.metadata.items() if k != "format"}
    write_safetensors(dst, {k: files[k].astype(target) if k in floats else files[k] for k in files}, metadata=meta)
    return True


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root, topdown=False):
        for f in files:
            fsync_path(os.path.join(d, f))
        fsync_path(d)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: a leftover of an earlier export in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _clean_stale_exports(out: Path) -> None:
    """Remove what a killed export left beside ``out``: ``<out>.tmp-<pid>`` (an unfinished new
    folder) and ``<out>.old-<pid>`` (the previous folder, moved aside just before the new one was
    renamed into place; put back if ``out`` is missing). Folders of running exports are kept."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(re.escape(out.name) + r"\.(tmp|old)-(\d+)$")
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        try:
            if m.group(1) == "old" and not (out.exists() or out.is_symlink()):
                os.rename(p, out)
            else:
                shutil.rmtree(p)
        except OSError as e:
            raise CheckpointError(f"cannot clean up {p}, left by an interrupted export: {e.strerror or e}; "
                                  "remove it by hand") from None


def _move_into_place(tmp: Path, out: Path, existed: bool, kept: str) -> None:
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    try:
        if existed:
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if existed:
                os.rename(old, out)  # put the previous folder back
            raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_os_error_message(e, out, kept)) from None
    try:
        fsync_path(out.parent)
    except OSError:
        pass  # the rename is done; durability of the directory entry is best effort here
    if existed:
        shutil.rmtree(old, ignore_errors=True)
