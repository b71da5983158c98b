"""DreamBooth on DeepFloyd IF end to end: configs/if-stage1.yaml and configs/if-stage2.yaml run
as shipped (every setting kept but sizes, counts and paths) on tiny random IF stages
(tests/test_if_pipeline.py's: diffusers-saved, a tiny T5 with an offline tokenizer, stage II
without a text encoder), through the real CLI.

Stage I: LoRA with prior preservation, class images drawn by the frozen stage I; its export must
load and run in diffusers' IFPipeline, and its LoRA file, loaded by diffusers into the source
pipeline, must give the exported (merged) UNet's output. Stage II alone (max_train_steps 0): full
fine-tuning on (8, 32) px pairs, class pairs from the frozen cascade (stage I's run's class images,
reused, upscaled by the frozen stage II), the T5 embeddings reused; its export must load and
upscale in IFSuperResolutionPipeline. Then `sample` with the LoRA file equals `sample` with the
exported folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.testing.reference import max_rel_err
from test_if_pipeline import if_stages  # noqa: F401  (the fixture, used by name)
from test_run_safety import SUBJECT

ROOT = Path(__file__).resolve().parents[1]
LOW, HIGH = 8, 32
# Sizes, counts and paths only; and stage I's learning rate, raised so that two LoRA steps move the
# UNet far beyond the float32 bound of the LoRA-file check below (at the shipped 1e-4 the merged
# and the unmerged model would agree however the file were read).
SMALL = dict(resolution=LOW, sr_resolution=HIGH, num_class_images=2, class_steps=2, validation_steps=2,
             checkpoint_every=1, log_every=1)


def _train(config: str, **over) -> tuple[Path, str]:
    """`dreambooth-jax train --config configs/<config>.yaml` with ``over``; checks that every other
    shipped setting reached the run unchanged. Returns (output_dir, the log)."""
    from dreambooth_jax.cli import main

    path = ROOT / "configs" / f"{config}.yaml"
    args = ["train", "--config", str(path), *[f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                              for k, v in over.items()]]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    out = Path(over["output_dir"])
    saved = json.loads((out / "config.json").read_text())
    for key, value in yaml.safe_load(path.read_text()).items():
        if key not in over:
            assert saved[key] == value, key
    return out, r.output


@pytest.fixture(scope="module")
def stage_one(if_stages, tmp_path_factory):
    out = tmp_path_factory.mktemp("if") / "stage1"
    return _train("if-stage1", **SMALL, model=str(if_stages["I"][0]), instance_dir=str(SUBJECT), output_dir=str(out),
                  max_train_steps=2, train_batch_size=4, learning_rate=1e-2)


@pytest.fixture(scope="module")
def stage_two(if_stages, stage_one, tmp_path_factory):
    first, _ = stage_one
    out = tmp_path_factory.mktemp("if") / "stage2"
    out.mkdir()
    shutil.copy(first / "t5_embeddings.npz", out / "t5_embeddings.npz")  # as a resumed run finds it
    return _train("if-stage2", **SMALL, model=str(if_stages["I"][0]), sr_model=str(if_stages["II"][0]),
                  instance_dir=str(SUBJECT), output_dir=str(out), class_dir=str(first / "class_images"),
                  sr_max_train_steps=2)


def _unet_out(unet, labels=None, channels=3, size=LOW):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, generator=g)
    ctx = torch.randn(2, 77, unet.config.encoder_hid_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), ctx, class_labels=labels).sample.numpy()


def test_stage_one_trains_lora_and_exports_for_diffusers(stage_one, if_stages):
    from diffusers import IFPipeline

    out, text = stage_one
    assert "encoding 4 prompt(s)" in text and "T5" in text  # instance, class, "", validation: once
    assert sorted(p.name for p in (out / "class_images").glob("*.png")) == ["00000.png", "00001.png"]
    assert json.loads((out / "class_images" / "manifest.json").read_text())["height"] == LOW
    assert (out / "base" / "validation" / "step_000002.png").is_file()
    hist = json.loads((out / "base" / "metrics.json").read_text())
    assert [h["step"] for h in hist] == [1, 2] and all(np.isfinite(h["loss"]) and h["prior_loss"] > 0 for h in hist)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "lora" / "lora_kohya.safetensors").exists()  # A1111 / ComfyUI do not run IF
    assert not (out / "sr").exists()

    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    # The exported folder loads and runs in diffusers; the LoRA file loaded by diffusers into the
    # source pipeline gives the exported (merged) UNet's output. Both sides compute W x + s B A x vs
    # (W + s B A) x in float32: a few ulp of the outputs' scale apart (measured ~1e-7; bound 1e-5).
    tuned = IFPipeline.from_pretrained(out / "model", **none)
    source = IFPipeline.from_pretrained(if_stages["I"][0], **none)
    base_out = _unet_out(source.unet)
    source.load_lora_weights(out / "lora")
    adapted = {n for n, m in source.unet.named_modules() if n.endswith(("add_k_proj", "add_v_proj"))
               and hasattr(m, "lora_A")}
    assert adapted, "the attention preset adapts IF's added-KV projections"
    tuned_out, lora_out = _unet_out(tuned.unet), _unet_out(source.unet)
    assert max_rel_err(tuned_out, base_out) > 1e-3  # training moved it far beyond the bound below
    assert max_rel_err(lora_out, tuned_out) <= 1e-5
    tuned.set_progress_bar_config(disable=True)
    image = tuned("a photo of sks dog", num_inference_steps=2, height=LOW, width=LOW, output_type="np").images
    assert image.shape == (1, LOW, LOW, 3) and np.isfinite(image).all()


def test_export_command_rewrites_the_lora_file_of_an_if_run(stage_one, tmp_path):
    """`dreambooth-jax export` on an IF run folder: the UNet alone is loaded (load_if), the
    checkpoint restored, and the LoRA file written equals the run's own (no kohya file for IF)."""
    from safetensors.numpy import load_file

    from dreambooth_jax.training.export_run import export_run

    run_dir, _ = stage_one
    export_run(run_dir, tmp_path / "x", what="lora", log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "x" / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
    a = load_file(tmp_path / "x" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_stage_two_alone_trains_on_pairs_and_exports_for_diffusers(stage_two, stage_one, if_stages):
    """max_train_steps 0: stage I stays frozen, stage II is fully fine-tuned; stage I's class images
    (same settings) are reused, not drawn again, and so are the T5 embeddings cached in the run
    folder (a resumed run's case: the 4.7 B encoder is not loaded again)."""
    from diffusers import IFSuperResolutionPipeline

    out, text = stage_two
    first, _ = stage_one
    assert "IF stage I is not trained" in text and "generating class images" not in text
    assert "T5 not loaded" in text and "encoding" not in text
    assert not (out / "model").exists() and not (out / "base").exists() and not (out / "sr_lora").exists()
    hist = json.loads((out / "sr" / "metrics.json").read_text())
    assert [h["step"] for h in hist] == [1, 2] and all(np.isfinite(h["loss"]) and h["prior_loss"] > 0 for h in hist)
    # class pairs: the frozen stage II upscaled stage I's class images at the training noise level
    manifest = json.loads((out / "class_images_sr" / "manifest.json").read_text())
    assert manifest["noise_level"] == 100 and manifest["size"] == HIGH
    assert manifest["low_res_manifest"] == json.loads((first / "class_images" / "manifest.json").read_text())

    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    sr = IFSuperResolutionPipeline.from_pretrained(out / "sr_model", **none)
    src = IFSuperResolutionPipeline.from_pretrained(if_stages["II"][0], **none)
    labels = torch.tensor([100, 250])
    assert max_rel_err(_unet_out(sr.unet, labels, 6, HIGH), _unet_out(src.unet, labels, 6, HIGH)) > 1e-5
    sr.set_progress_bar_config(disable=True)
    embeds = torch.from_numpy(np.load(out / "t5_embeddings.npz")["embeds"][:1])
    low = torch.rand(1, 3, LOW, LOW) * 2 - 1
    up = sr(image=low, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds), num_inference_steps=2,
            noise_level=100, height=HIGH, width=HIGH, output_type="np").images
    assert up.shape == (1, HIGH, HIGH, 3) and np.isfinite(up).all()


def test_sample_with_the_lora_file_equals_the_exported_model(stage_one, stage_two, if_stages, tmp_path, monkeypatch):
    """`dreambooth-jax sample` on the source stage I with the run's LoRA file (--lora) draws what it
    draws from the exported (merged) folder, from the same seed, through the fine-tuned stage II:
    both fold the same adapters into the same float32 weights (the merge at export, apply_lora at
    sampling)."""
    from PIL import Image

    from dreambooth_jax.cli import main

    monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(tmp_path / "xla-cache"))
    one, two = stage_one[0], stage_two[0]
    common = ["sample", "--prompt", "a photo of sks dog in the snow", "--steps", "2", "--sr-steps", "2", "--height",
              str(LOW), "--width", str(LOW), "--seed", "1", "--sr-noise-level", "100", "--sr-model",
              str(two / "sr_model")]
    runs = {"lora": ["--model", str(if_stages["I"][0]), "--lora", str(one / "lora" / "pytorch_lora_weights.safetensors")],
            "merged": ["--model", str(one / "model")]}
    images = {}
    for name, args in runs.items():
        r = CliRunner().invoke(main, [*common, *args, "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        images[name] = [np.asarray(Image.open(tmp_path / name / f)).astype(int) for f in ("base_000.png", "sr_000.png")]
    for a, b in zip(images["lora"], images["merged"]):
        assert np.abs(a - b).max() <= 1  # the same weights up to float32 rounding: at most one uint8 step


@pytest.mark.parametrize("change,message", [
    (dict(model="__II__"), "is a DeepFloyd IF stage II"),
    (dict(sr_model="__I__"), "is not a DeepFloyd IF stage II pipeline"),
    (dict(train_text_encoder=True, lora_rank=0), "T5 encoder stays frozen"),
    (dict(resolution=15), "'resolution' (15) must be a multiple of 2"),
    (dict(sr_noise_level=1000), "'sr_noise_level' must be in [0, 999]"),
])
def test_bad_if_settings_fail_before_loading(change, message, if_stages, tmp_path, no_model_load, monkeypatch):
    from dreambooth_jax.training.config import load_config
    from dreambooth_jax.training.run import run

    monkeypatch.setattr("dreambooth_jax.models.if_loading.load_if", lambda *a, **k: pytest.fail("loaded"))
    subs = {"__I__": str(if_stages["I"][0]), "__II__": str(if_stages["II"][0])}
    over = dict(model=str(if_stages["I"][0]), sr_model=str(if_stages["II"][0]), instance_dir=str(SUBJECT),
                output_dir=str(tmp_path / "out"), resolution=LOW, sr_resolution=HIGH, class_dir="")
    over.update({k: subs.get(v, v) for k, v in change.items()})
    with pytest.raises(ConfigError) as info:
        cfg = load_config(ROOT / "configs" / "if-stage2.yaml", [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                                                 for k, v in over.items()])
        run(cfg, log=print)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out" / "config.json").exists()
