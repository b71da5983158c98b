"""Our export of each component loads in diffusers/transformers and computes the same outputs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.models import export_pipeline, load_pretrained, save_component, tokenize
from dreambooth_jax.testing.reference import max_rel_err


@pytest.mark.parametrize("name", ["sd2", "upscaler"])
def test_component_round_trip(name, pipeline_dirs, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = load_pretrained(pipeline_dirs(name))
    rng = np.random.RandomState(1)
    # UNet
    save_component(pipe.unet, tmp_path / "unet")
    tu = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    x = rng.randn(1, 16, 16, pipe.unet.config.in_channels).astype(np.float32)
    ctx = rng.randn(1, 77, 32).astype(np.float32)
    labels = np.array([42]) if name == "upscaler" else None
    ours = pipe.unet(jnp.asarray(x), jnp.asarray([500]), jnp.asarray(ctx), class_labels=labels)
    with torch.no_grad():
        ref = tu(torch.from_numpy(x.transpose(0, 3, 1, 2)), 500, torch.from_numpy(ctx),
                 class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()
    assert max_rel_err(np.asarray(ours).transpose(0, 3, 1, 2), ref) <= 1e-4
    # VAE
    save_component(pipe.vae, tmp_path / "vae")
    tv = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    img = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tv(torch.from_numpy(img.transpose(0, 3, 1, 2))).sample.numpy()
    assert max_rel_err(np.asarray(pipe.vae(jnp.asarray(img))).transpose(0, 3, 1, 2), ref) <= 1e-4
    assert tv.config.scaling_factor == pipe.vae.config.scaling_factor
    # Text encoder (written with the 'text_model.' prefix of real SD folders)
    save_component(pipe.text_encoder, tmp_path / "text_encoder")
    tt = CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids = tokenize(pipe.tokenizer, ["a sks dog in the snow"])
    with torch.no_grad():
        ref = tt(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert max_rel_err(pipe.text_encoder(jnp.asarray(ids))[0], ref) <= 1e-4


def test_export_pipeline_loads_in_diffusers(pipeline_dirs, tmp_path):
    from diffusers import DiffusionPipeline

    src = pipeline_dirs("sd1")
    pipe = load_pretrained(src)
    out = export_pipeline(src, tmp_path / "exported", {"unet": pipe.unet})
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    tp = DiffusionPipeline.from_pretrained(str(out))
    assert type(tp).__name__ == "StableDiffusionPipeline"
    again = load_pretrained(out)  # and our own loader reads it back
    x = jnp.ones((1, 8, 8, 4))
    ctx = jnp.ones((1, 77, 32))
    np.testing.assert_allclose(np.asarray(again.unet(x, 10, ctx)), np.asarray(pipe.unet(x, 10, ctx)), atol=1e-6)
    # Nothing the user had is overwritten.
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        export_pipeline(src, out, {"unet": pipe.unet})
    with pytest.raises(CheckpointError, match="is the source folder"):
        export_pipeline(src, src, {"unet": pipe.unet}, overwrite=True)
