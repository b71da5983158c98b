"""safetensors files are read and written through the `safetensors` library; a damaged file is
one CheckpointError line naming the file and the fault, never a raw traceback."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import dreambooth_jax
from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.models import load_pretrained, load_vae
from dreambooth_jax.models.convert import load_component_weights, read_safetensors, write_safetensors

TOY_PRIOR = Path(dreambooth_jax.__file__).resolve().parent / "assets" / "toy" / "prior"


def _tensors():
    return {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2,), np.float16),
            "c": np.array([1.5, -2.0, 3.25], dtype=ml_dtypes.bfloat16), "i": np.arange(3, dtype=np.int64)}


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_reader_and_writer_are_the_library(tmp_path, monkeypatch):
    calls = []
    real_save, real_open = safetensors.numpy.save_file, safetensors.safe_open
    monkeypatch.setattr(safetensors.numpy, "save_file", lambda *a, **k: calls.append("save") or real_save(*a, **k))
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: calls.append("open") or real_open(*a, **k))
    t = _tensors()
    write_safetensors(tmp_path / "x.safetensors", t)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert calls == ["save", "open"]
    assert set(back) == set(t) and back.dtypes == {"a": "F32", "b": "F16", "c": "BF16", "i": "I64"}
    for k in t:
        assert back[k].dtype == t[k].dtype and back[k].shape == t[k].shape
        np.testing.assert_array_equal(np.asarray(back[k], np.float32), np.asarray(t[k], np.float32))
    # What diffusers/transformers need: metadata format 'pt', readable by torch (bf16 included).
    from safetensors.torch import load_file

    with real_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
    tt = load_file(str(tmp_path / "x.safetensors"))
    np.testing.assert_array_equal(tt["c"].float().numpy(), t["c"].astype(np.float32))
    assert not [p for p in tmp_path.iterdir() if p.name != "x.safetensors"]  # no temp file left


def test_writer_takes_strided_arrays(tmp_path):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    views = {"t": base.T, "s": base[:, ::2]}  # the library reads nbytes from the data pointer
    write_safetensors(tmp_path / "v.safetensors", views)
    back = read_safetensors(tmp_path / "v.safetensors")
    for k, v in views.items():
        np.testing.assert_array_equal(back[k], v)


def test_bf16_fallback_for_old_library(tmp_path, monkeypatch):
    """safetensors releases whose numpy reader cannot build bfloat16 (TypeError) still load."""
    write_safetensors(tmp_path / "x.safetensors", _tensors())
    real_open = safetensors.safe_open

    class OldNumpyReader:
        def __init__(self, *a, **k):
            self._f = real_open(*a, **k)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def get_tensor(self, name):
            if self._f.get_slice(name).get_dtype() == "BF16":
                raise TypeError("data type 'bfloat16' not understood")
            return self._f.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", OldNumpyReader)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert back["c"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back["c"].astype(np.float32), [1.5, -2.0, 3.25])
    np.testing.assert_array_equal(back["a"], _tensors()["a"])


def test_writer_disk_errors_keep_errno_and_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.zeros(3, np.float32)})
    before = path.read_bytes()

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with pytest.raises(OSError) as e:
        write_safetensors(path, {"a": np.ones(3, np.float32)})
    assert e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"a": np.ones((64, 64), np.float32), "b": np.zeros(8, np.float16)})
    return path


@pytest.mark.parametrize("damage,match", [
    (lambda d: d[:-100], "truncated"),
    (lambda d: d[:-1], "truncated"),
    (lambda d: d + b"\0" * 16, "extra bytes"),
    (lambda d: b"", "empty \\(0 bytes"),
    (lambda d: b"\x05\x00", "too few for a safetensors header"),
    (lambda d: d[:8] + b"{garbage" + d[16:], "corrupt header"),
    (lambda d: (10 ** 12).to_bytes(8, "little") + d[8:], "corrupt header"),
])
def test_damaged_file_is_one_line(weights, damage, match):
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(CheckpointError, match=match) as e:
        dict(read_safetensors(weights))
    msg = _one_line(e)
    assert str(weights) in msg and "not a valid safetensors file" in msg


def test_truncated_component_through_the_loader(tmp_path):
    """What a user sees for an interrupted download: the file and the fault, one line."""
    src = shutil.copytree(TOY_PRIOR, tmp_path / "prior")
    w = src / "vae" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_pretrained(src, components=("vae",))
    assert str(w) in _one_line(e)
    w.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_vae(src / "vae")


def _shard(folder, stem="diffusion_pytorch_model"):
    """Split a component's weights into two shards with an index, as large checkpoints are."""
    single = folder / f"{stem}.safetensors"
    t = {k: np.array(v) for k, v in read_safetensors(single).items()}
    names = sorted(t)
    parts = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        shard = f"{stem}-{i:05d}-of-00002.safetensors"
        write_safetensors(folder / shard, {k: t[k] for k in part})
        weight_map.update({k: shard for k in part})
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    single.unlink()
    return index, t


def test_sharded_weights(tmp_path):
    src = shutil.copytree(TOY_PRIOR, tmp_path / "prior")
    index, t = _shard(src / "vae")
    loaded = load_component_weights(src / "vae", "diffusion_pytorch_model")
    assert set(loaded) == set(t)
    load_vae(src / "vae")  # loads
    # an index naming a shard that is not there
    (src / "vae" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing") as e:
        load_vae(src / "vae")
    msg = _one_line(e)
    assert "diffusion_pytorch_model-00002-of-00002.safetensors" in msg and str(index) in msg
    # an index that is not valid JSON / has no weight_map
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match="index.*not valid"):
        load_vae(src / "vae")
    index.write_text("{}")
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        load_vae(src / "vae")


def test_index_mapping_tensor_to_wrong_shard(tmp_path):
    src = shutil.copytree(TOY_PRIOR, tmp_path / "prior")
    index, t = _shard(src / "vae")
    data = json.loads(index.read_text())
    k = sorted(data["weight_map"])[0]
    data["weight_map"][k] = "diffusion_pytorch_model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"maps 1 tensor.*{k}"):
        load_vae(src / "vae")
