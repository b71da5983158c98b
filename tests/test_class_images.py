"""Class-image cache: reuse, top-up, resume after interruption, mismatch reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dreambooth_jax.class_images import ClassImageSpec, ClassImagesError, ensure_class_images


def _sampler(calls):
    def sample(prompts, seeds):
        calls.append(list(seeds))
        return np.stack([np.full((8, 8, 3), s % 256, np.uint8) for s in seeds])
    return sample


def test_reuse_top_up_and_mismatch(tmp_path):
    spec = ClassImageSpec(prompt="a photo of dog", num=5, height=8, width=8, seed=10)
    calls = []
    paths = ensure_class_images(tmp_path, spec, "fp1", _sampler(calls), batch_size=2)
    assert [p.name for p in paths] == [f"{i:05d}.png" for i in range(5)]
    assert sum(len(c) for c in calls) == 5 and calls[0] == [10, 11]
    calls.clear()
    ensure_class_images(tmp_path, spec, "fp1", _sampler(calls), batch_size=2)  # reuse: nothing drawn
    assert calls == []
    ensure_class_images(tmp_path, ClassImageSpec(**{**spec.__dict__, "num": 7}), "fp1", _sampler(calls), batch_size=2)
    assert calls == [[15, 16]]  # top-up draws only the new ones, with their own seeds
    assert json.loads((tmp_path / "manifest.json").read_text())["count"] == 7
    with pytest.raises(ClassImagesError, match="other settings.*prompt"):
        ensure_class_images(tmp_path, ClassImageSpec(**{**spec.__dict__, "prompt": "a cat"}), "fp1", _sampler(calls))
    with pytest.raises(ClassImagesError, match="model: 'fp1' -> 'fp2'"):
        ensure_class_images(tmp_path, spec, "fp2", _sampler(calls))


def test_resume_after_interruption(tmp_path):
    spec = ClassImageSpec(prompt="a photo of dog", num=6, height=8, width=8)
    calls = []

    def flaky(prompts, seeds):
        if len(calls) == 1:
            raise KeyboardInterrupt
        return _sampler(calls)(prompts, seeds)

    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(tmp_path, spec, "fp", flaky, batch_size=2)
    assert len(list(tmp_path.glob("*.png"))) == 2 and not list(tmp_path.glob(".*.tmp"))
    calls.clear()
    ensure_class_images(tmp_path, spec, "fp", _sampler(calls), batch_size=2)
    assert calls == [[2, 3], [4, 5]]


def test_foreign_images_without_manifest(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "00000.png")
    with pytest.raises(ClassImagesError, match="no manifest.json"):
        ensure_class_images(tmp_path, ClassImageSpec(prompt="x", num=2), "fp", _sampler([]))


def test_class_images_command(tmp_path):
    """`dreambooth-jax class-images` samples with the frozen model, writes the manifest, and a
    second call with a larger --num only tops the folder up."""
    from click.testing import CliRunner

    from dreambooth_jax.cli import main
    from dreambooth_jax.demo import TOY_PRIOR

    out = tmp_path / "cls"
    args = ["class-images", "--model", str(TOY_PRIOR), "--class-prompt", "a photo of a box", "--out", str(out),
            "--steps", "3", "--size", "32"]
    r = CliRunner().invoke(main, args + ["--num", "3"])
    assert r.exit_code == 0, r.output
    first = (out / "00000.png").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt"] == "a photo of a box" and manifest["sampler"] == "ddpm" and manifest["count"] == 3
    r = CliRunner().invoke(main, args + ["--num", "5"])
    assert r.exit_code == 0 and "5 class images" in r.output, r.output
    assert (out / "00000.png").read_bytes() == first and (out / "00004.png").exists()
    r = CliRunner().invoke(main, args[:-2] + ["--size", "64", "--num", "5"])  # another setting: refused
    assert r.exit_code != 0 and "made with other settings (height: 32 -> 64" in r.output, r.output
