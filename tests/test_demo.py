"""The embedded default: the shipped toy prior is a working text-to-image model, and DreamBooth on
it binds the toy subject to "sks box" and renders it in contexts absent from its photos, judged
by the shipped toy evaluator. Thresholds come from measured runs (see issue 5's note), with margin."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from dreambooth_jax.demo import TOY_PRIOR, TOY_SR, DemoConfig, run_demo
from dreambooth_jax.toy import world


def test_shipped_prior_loads_in_diffusers_and_ours():
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionUpscalePipeline

    from dreambooth_jax.models import load_pretrained

    base, sr = load_pretrained(TOY_PRIOR), load_pretrained(TOY_SR)
    assert not base.is_upscaler and sr.is_upscaler and sr.max_noise_level == 350
    assert base.tokenizer.model_max_length == base.text_encoder.config.max_position_embeddings == 16
    p = StableDiffusionPipeline.from_pretrained(str(TOY_PRIOR))  # default dtype: must run
    img = p("a photo of a red ball", height=32, width=32, num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 32, 32, 3)
    up = StableDiffusionUpscalePipeline.from_pretrained(str(TOY_SR))
    hi = up(prompt="a photo of a red ball", image=torch.rand(1, 3, 32, 32) * 2 - 1, num_inference_steps=2,
            output_type="np").images
    assert hi.shape == (1, 128, 128, 3)


def test_shipped_prior_draws_what_it_is_asked(tmp_path):
    """Text conditioning works: the evaluator recognises the prompted class and context."""
    from dreambooth_jax.diffusion.pipeline import BaseSampler
    from dreambooth_jax.evaluation import toy as ev
    from dreambooth_jax.models import load_pretrained

    prompts = [("cup", "beach"), ("ball", "snow"), ("hat", "grass"), ("bottle", "night"), ("box", "city")]
    texts = [f"a photo of a {c} {world.CONTEXTS[ctx]}" for c, ctx in prompts for _ in range(4)]
    sampler = BaseSampler(load_pretrained(TOY_PRIOR), sampler="ddim", steps=25)
    lat = np.concatenate([sampler.initial_latents(1, 32, 32, i) for i in range(len(texts))])
    images = sampler(texts, latents=lat, height=32, width=32, guidance=5.0).images
    out = ev.evaluate(ev.load_evaluator(), images)
    cls = np.mean([ev.class_fidelity({"cls": out["cls"][i:i + 1]}, prompts[i // 4][0]) for i in range(len(texts))])
    ctx = ev.context_fidelity(out, [c for _, c in prompts for _ in range(4)])
    assert cls > 0.6 and ctx > 0.8, (cls, ctx)


@pytest.mark.fidelity
def test_dreambooth_binds_the_toy_subject(tmp_path):
    """A short DreamBooth run (base stage) on the toy subject: 'a sks box <context>' samples show
    the subject far more than the pretrained prior's, in the prompted contexts."""
    cfg = DemoConfig(out=str(tmp_path / "demo"), samples_per_prompt=4,
                     overrides=("sr_model=", "max_train_steps=200", "num_class_images=32"))
    res = run_demo(cfg, log=print)
    before, after = res["metrics"]["pretrained prior"], res["metrics"]["DreamBooth"]
    # Measured (2-core CPU, seed 0): subject fidelity 0.031 -> 0.738, context fidelity 0.962.
    assert after["subject_fidelity"] > max(0.5, before["subject_fidelity"] + 0.4), (before, after)
    assert after["context_fidelity"] > 0.8, after
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["metrics"]["DreamBooth"] == after and "toy evaluator" in saved["encoders"]
    assert (tmp_path / "demo" / "metrics.md").read_text().startswith("Encoders: the toy world's evaluator")
    for f in ("before.png", "after.png", "comparison.png", "subject_photos.png", "metrics.md"):
        assert (tmp_path / "demo" / f).is_file(), f
    # The export runs in diffusers as a user calls it: no dtype argument (issue 9: the fine-tuned
    # UNet used to be float32 beside float16 copies, and the first step failed on mixed dtypes).
    from diffusers import StableDiffusionPipeline

    exported = StableDiffusionPipeline.from_pretrained(str(tmp_path / "demo" / "train" / "model"))
    img = exported("a photo of a sks box on the beach", height=32, width=32, num_inference_steps=2,
                   output_type="np").images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()


def test_demo_refuses_foreign_output_folder(tmp_path):
    from dreambooth_jax.cli import main

    (tmp_path / "mine.txt").write_text("keep me")
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "not empty" in r.output and "choose a new --out" in r.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_demo_option_errors(tmp_path):
    from dreambooth_jax.cli import main

    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "a"), "--evaluator", "clip"])
    assert r.exit_code != 0 and "--evaluator must be auto, toy or none" in r.output
    r = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "b"), "max_train_stepz=3"])
    assert r.exit_code != 0 and "unknown config key 'max_train_stepz'" in r.output
