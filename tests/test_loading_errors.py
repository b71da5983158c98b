"""Bad checkpoints and configs give clear errors that name the file and the problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models import load_pretrained, load_unet, load_vae
from dreambooth_jax.models.convert import read_safetensors, write_safetensors


@pytest.fixture
def sd1_copy(pipeline_dirs, tmp_path):
    return shutil.copytree(pipeline_dirs("sd1"), tmp_path / "copy")


def test_missing_folder_and_component(sd1_copy, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained("./not/here")  # relative path: never treated as a hub id
    shutil.rmtree(sd1_copy / "vae")
    with pytest.raises(CheckpointError, match="no 'vae/' component folder"):
        load_pretrained(sd1_copy)
    (sd1_copy / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json"):
        load_pretrained(sd1_copy)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("key,value,match", [
    ("resnet_time_scale_shift", "spatial", "unsupported value 'spatial' for 'resnet_time_scale_shift'"),
    ("down_block_types", ["KDownBlock2D", "DownBlock2D"], "down_block_types"),
    ("my_new_option", 3, "unknown config key 'my_new_option'"),
    ("class_embed_type", "projection", "class_embed_type"),
])
def test_unsupported_unet_config(sd1_copy, key, value, match):
    _edit_config(sd1_copy / "unet", **{key: value})
    with pytest.raises(ConfigError, match=match) as e:
        load_unet(sd1_copy / "unet")
    assert "unet/config.json" in str(e.value)


def test_unsupported_text_encoder_config(sd1_copy):
    _edit_config(sd1_copy / "text_encoder", hidden_act="relu")
    with pytest.raises(ConfigError, match="hidden_act"):
        load_pretrained(sd1_copy, components=("text_encoder",))


def _rewrite_weights(path, fn):
    tensors = {k: np.array(v) for k, v in read_safetensors(path).items()}
    fn(tensors)
    write_safetensors(path, tensors)


def test_missing_and_unexpected_tensors(sd1_copy):
    w = sd1_copy / "unet" / "diffusion_pytorch_model.safetensors"

    def edit(t):
        t.pop("conv_in.weight")
        t["extra.layer.weight"] = np.zeros(3, np.float32)

    _rewrite_weights(w, edit)
    with pytest.raises(CheckpointError) as e:
        load_unet(sd1_copy / "unet")
    msg = str(e.value)
    assert "1 unexpected tensor(s) in the checkpoint: extra.layer.weight" in msg
    assert "1 parameter(s) missing from the checkpoint: conv_in.weight" in msg


def test_shape_mismatch_names_tensor(sd1_copy):
    _edit_config(sd1_copy / "unet", cross_attention_dim=48)
    with pytest.raises(CheckpointError, match="attn2.to_k.weight' has shape"):
        load_unet(sd1_copy / "unet")


def test_pickled_weights_need_opt_in(sd1_copy):
    import torch

    folder = sd1_copy / "vae"
    st = folder / "diffusion_pytorch_model.safetensors"
    sd = {k: torch.from_numpy(np.array(v)) for k, v in read_safetensors(st).items()}
    torch.save(sd, folder / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(CheckpointError, match="only pickled weights.*allow_pickle=True"):
        load_vae(folder)
    vae = load_vae(folder, allow_pickle=True)
    assert vae.config.latent_channels == 4


def test_old_vae_attention_names_load(pipeline_dirs, sd1_copy):
    """SD folders saved before diffusers 0.14 name the VAE attention query/key/value/proj_attn."""
    w = sd1_copy / "vae" / "diffusion_pytorch_model.safetensors"

    def rename(t):
        for k in [k for k in t if ".attentions.0.to_" in k]:
            new = (k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value")
                   .replace("to_out.0", "proj_attn"))
            t[new] = t.pop(k)[..., None, None] if k.endswith("weight") else t.pop(k)

    _rewrite_weights(w, rename)  # also as 1x1-conv shaped weights, as in the original LDM files
    a, b = load_vae(sd1_copy / "vae"), load_vae(pipeline_dirs("sd1") / "vae")
    x = np.random.RandomState(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(a(x)), np.asarray(b(x)), atol=1e-6)


def test_safetensors_io_matches_library(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    t = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2,), np.float16),
         "c": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16)}
    write_safetensors(tmp_path / "x.safetensors", t)
    back = read_safetensors(tmp_path / "x.safetensors")
    for k in t:
        np.testing.assert_array_equal(np.asarray(back[k], np.float32), np.asarray(t[k], np.float32))
        assert back[k].dtype == t[k].dtype
    save_file({"a": t["a"]}, str(tmp_path / "y.safetensors"))
    np.testing.assert_array_equal(read_safetensors(tmp_path / "y.safetensors")["a"], t["a"])
    assert load_file(str(tmp_path / "x.safetensors"))["a"].shape == (3, 4)
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")
