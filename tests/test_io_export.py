"""export_pipeline: one dtype for the whole folder (the source's by default), loadable and
runnable in diffusers with default arguments; atomic (a full disk, a read-only target or a kill
leaves the previous export as it was)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

import dreambooth_jax
from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models import export_pipeline, load_pretrained, pipeline_dtype
from dreambooth_jax.models.convert import read_safetensors, write_safetensors

TOY_PRIOR = Path(dreambooth_jax.__file__).resolve().parent / "assets" / "toy" / "prior"


@pytest.fixture(scope="module")
def unet():
    """The toy prior's UNet as training leaves it: float32 parameters (the files are float16)."""
    pipe = load_pretrained(TOY_PRIOR, components=("unet",))
    leaf = next(iter(pipe.unet.conv_in.kernel.get_value().ravel()[:1]))
    assert np.asarray(leaf).dtype == np.float32
    return pipe.unet


def _weight_dtypes(folder: Path) -> dict[str, set[str]]:
    return {str(f.relative_to(folder)): set(read_safetensors(f).dtypes.values())
            for f in sorted(folder.rglob("*.safetensors"))}


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_toy_prior_export_runs_in_diffusers_by_default(unet, tmp_path):
    """`make demo`'s export: float32 trained UNet + float16 source. diffusers must load it with
    no dtype argument and generate an image."""
    import torch
    from diffusers import StableDiffusionPipeline

    out = export_pipeline(TOY_PRIOR, tmp_path / "model", {"unet": unet})
    tp = StableDiffusionPipeline.from_pretrained(str(out))
    img = tp("a photo of a red box", num_inference_steps=2, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    assert set().union(*_weight_dtypes(out).values()) == {"F16"}  # one dtype: the source's
    assert pipeline_dtype(TOY_PRIOR) == np.float16
    # our loader reads it back: the trained weights, rounded to float16
    again = load_pretrained(out, components=("unet",))
    a = np.asarray(unet.conv_in.kernel.get_value())
    np.testing.assert_array_equal(np.asarray(again.unet.conv_in.kernel.get_value()),
                                  a.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("dtype,st", [("float32", "F32"), ("bfloat16", "BF16"), ("fp16", "F16")])
def test_export_dtype_converts_every_component(unet, tmp_path, dtype, st):
    out = export_pipeline(TOY_PRIOR, tmp_path / "model", {"unet": unet}, dtype=dtype)
    dtypes = _weight_dtypes(out)
    assert sorted(dtypes) == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                              "vae/diffusion_pytorch_model.safetensors"]
    assert set().union(*dtypes.values()) == {st}
    vae_src = read_safetensors(TOY_PRIOR / "vae" / "diffusion_pytorch_model.safetensors")
    vae_out = read_safetensors(out / "vae" / "diffusion_pytorch_model.safetensors")
    k = "decoder.conv_out.weight"
    np.testing.assert_allclose(vae_out[k].astype(np.float32), vae_src[k].astype(np.float32), rtol=1e-2, atol=1e-3)
    if dtype == "float32":
        from diffusers import StableDiffusionPipeline

        tp = StableDiffusionPipeline.from_pretrained(str(out))
        assert {tp.unet.dtype, tp.vae.dtype, tp.text_encoder.dtype} == {__import__("torch").float32}
    with pytest.raises(ConfigError, match="unsupported export dtype 'int8'"):
        export_pipeline(TOY_PRIOR, tmp_path / "other", {"unet": unet}, dtype="int8")


def _convert_file(path: Path, dtype) -> None:
    t = read_safetensors(path)
    write_safetensors(path, {k: np.asarray(t[k]).astype(dtype) for k in t})


def test_variant_files_written_where_the_source_had_them(unet, tmp_path):
    """A source like SD 1.5's: float32 files plus ``*.fp16.safetensors`` variants."""
    src = shutil.copytree(TOY_PRIOR, tmp_path / "src")
    for comp, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        shutil.copy(src / comp / f"{stem}.safetensors", src / comp / f"{stem}.fp16.safetensors")
        _convert_file(src / comp / f"{stem}.safetensors", np.float32)
    assert pipeline_dtype(src) == np.float32  # the variant files are not what a default load reads
    out = export_pipeline(src, tmp_path / "model", {"unet": unet})
    dtypes = _weight_dtypes(out)
    assert dtypes["unet/diffusion_pytorch_model.safetensors"] == {"F32"}
    assert dtypes["unet/diffusion_pytorch_model.fp16.safetensors"] == {"F16"}
    assert dtypes["vae/diffusion_pytorch_model.fp16.safetensors"] == {"F16"}
    assert dtypes["text_encoder/model.safetensors"] == {"F32"}
    fp16 = read_safetensors(out / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    np.testing.assert_array_equal(  # the trained weights, not the source's
        fp16["conv_in.weight"], np.asarray(unet.conv_in.kernel.get_value()).transpose(3, 2, 0, 1).astype(np.float16))
    import torch
    from diffusers import StableDiffusionPipeline

    tp = StableDiffusionPipeline.from_pretrained(str(out), variant="fp16", torch_dtype=torch.float16)
    assert tp.unet.dtype == torch.float16


def test_mixed_source_exports_float32(unet, tmp_path):
    src = shutil.copytree(TOY_PRIOR, tmp_path / "src")
    _convert_file(src / "vae" / "diffusion_pytorch_model.safetensors", np.float32)
    assert pipeline_dtype(src) == np.float32
    out = export_pipeline(src, tmp_path / "model", {"unet": unet})
    assert set().union(*_weight_dtypes(out).values()) == {"F32"}


# ----------------------------------------------------------------------------- atomic export
@pytest.fixture
def previous(unet, tmp_path):
    """An earlier export at tmp_path/model, and its file hashes."""
    out = export_pipeline(TOY_PRIOR, tmp_path / "model", {"unet": unet})
    return out, _snapshot(out)


def _fail_on_call(n: int, exc: Exception, real, *, once: bool = False):
    """``real``, except that call ``n`` (and, unless ``once``, every later one) raises ``exc``."""
    count = [0]

    def fake(*args, **kwargs):
        count[0] += 1
        if count[0] == n or (count[0] > n and not once):
            raise exc
        return real(*args, **kwargs)

    return fake


@pytest.mark.parametrize("where", ["weights", "copy"])
def test_disk_full_keeps_the_previous_export(unet, previous, monkeypatch, where):
    out, before = previous
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "somefile")
    if where == "weights":  # the trained UNet's file, written after the copied components
        monkeypatch.setattr(safetensors.numpy, "save_file", _fail_on_call(1, full, safetensors.numpy.save_file))
    else:  # half way through copying the source's files
        monkeypatch.setattr(shutil, "copy2", _fail_on_call(3, full, shutil.copy2))
    with pytest.raises(CheckpointError) as e:
        export_pipeline(TOY_PRIOR, out, {"unet": unet}, overwrite=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"disk full while writing {out}: No space left on device")
    assert msg.endswith(f"the previous {out} is unchanged")
    assert _snapshot(out) == before
    assert _siblings(out) == ["model"]  # the temporary folder is gone


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_target_keeps_the_previous_export(unet, previous, monkeypatch, code):
    out, before = previous
    monkeypatch.setattr(shutil, "copy2", _fail_on_call(1, OSError(code, os.strerror(code)), shutil.copy2))
    with pytest.raises(CheckpointError, match=f"cannot write {out}: .*read-only filesystem or no permission"
                                              f".*; the previous {out} is unchanged"):
        export_pipeline(TOY_PRIOR, out, {"unet": unet}, overwrite=True)
    assert _snapshot(out) == before and _siblings(out) == ["model"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_failed_rename_keeps_the_previous_export(unet, previous, monkeypatch, fail_at):
    """1: moving the previous folder aside fails; 2: moving the new one into place fails."""
    out, before = previous
    monkeypatch.setattr(os, "rename", _fail_on_call(fail_at, PermissionError(errno.EACCES, "Permission denied"),
                                                    os.rename, once=True))
    with pytest.raises(CheckpointError, match=f"the previous {out} is unchanged"):
        export_pipeline(TOY_PRIOR, out, {"unet": unet}, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(out) == before and _siblings(out) == ["model"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_real_read_only_folder(unet, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match="cannot write .*nothing was written"):
            export_pipeline(TOY_PRIOR, ro / "model", {"unet": unet})
    finally:
        ro.chmod(0o755)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_a_killed_export_are_cleaned(unet, previous):
    out, before = previous
    dead = _dead_pid()
    stale = out.with_name(f"model.tmp-{dead}")
    (stale / "unet").mkdir(parents=True)
    (stale / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    live = out.with_name(f"model.tmp-{os.getppid()}")  # a running export's folder is not touched
    live.mkdir()
    export_pipeline(TOY_PRIOR, out, {"unet": unet}, overwrite=True, dtype="float32")
    assert _siblings(out) == ["model", live.name]
    assert _weight_dtypes(out)["unet/diffusion_pytorch_model.safetensors"] == {"F32"}
    # killed between moving the previous folder aside and moving the new one in: it is put back
    os.rename(out, out.with_name(f"model.old-{dead}"))
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        export_pipeline(TOY_PRIOR, out, {"unet": unet})
    assert _weight_dtypes(out)["unet/diffusion_pytorch_model.safetensors"] == {"F32"}
    assert _siblings(out) == ["model", live.name]


def test_export_still_refuses_what_it_refused(unet, previous, tmp_path):
    out, _ = previous
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        export_pipeline(TOY_PRIOR, out, {"unet": unet})
    with pytest.raises(CheckpointError, match="inside the source folder"):
        export_pipeline(out, out / "sub", {"unet": unet})
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        export_pipeline(TOY_PRIOR, tmp_path / "file", {"unet": unet}, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert json.loads((export_pipeline(TOY_PRIOR, empty, {"unet": unet}) / "model_index.json").read_text())
