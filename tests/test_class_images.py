"""Class-image cache: reuse, top-up, resume after interruption, mismatch reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_checks import one_line_error
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


# ------------------------------------------------------------------ bad input, checked up front


def test_folder_that_is_a_file_or_cannot_be_created(tmp_path):
    f = tmp_path / "classes.png"
    f.write_bytes(b"user data")
    spec = ClassImageSpec(prompt="x", num=2, height=8, width=8)
    with pytest.raises(ClassImagesError, match="classes.png is a file"):
        ensure_class_images(f, spec, "fp", _sampler([]))
    with pytest.raises(ClassImagesError, match="cannot create .*classes.png is a file"):
        ensure_class_images(f / "sub", spec, "fp", _sampler([]))
    assert f.read_bytes() == b"user data"


def test_unreadable_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ClassImagesError, match="cannot read .*manifest.json"):
        ensure_class_images(tmp_path, ClassImageSpec(prompt="x", num=2, height=8, width=8), "fp", _sampler([]))


@pytest.mark.parametrize("change,message", [
    ({"num": 0}, "num must be >= 1"),
    ({"steps": 0}, "steps must be >= 1"),
    ({"height": 0}, "height must be >= 1"),
    ({"guidance": -1.0}, "guidance must be >= 0"),
    ({"guidance": float("nan")}, "guidance must be a finite number"),
    ({"sampler": "plms"}, "unknown scheduler 'plms'; choose one of ddpm, ddim"),
])
def test_bad_spec_rejected_before_anything_is_written(tmp_path, change, message):
    spec = ClassImageSpec(**{**ClassImageSpec(prompt="x", num=2, height=8, width=8).__dict__, **change})
    with pytest.raises(ClassImagesError, match=message):
        ensure_class_images(tmp_path / "cls", spec, "fp", _sampler([]))
    assert not (tmp_path / "cls").exists()


def test_manifest_of_a_run_that_drew_nothing_is_replaced(tmp_path):
    """A first run that failed before its first image (e.g. a size the model refuses) leaves a
    manifest and no image; a corrected rerun must not be refused for 'other settings'."""
    def refuse(prompts, seeds):
        raise ClassImagesError("size refused by the model")

    with pytest.raises(ClassImagesError, match="refused"):
        ensure_class_images(tmp_path, ClassImageSpec(prompt="x", num=2, height=30, width=30), "fp", refuse)
    calls = []
    ensure_class_images(tmp_path, ClassImageSpec(prompt="x", num=2, height=8, width=8), "fp", _sampler(calls))
    assert calls == [[0, 1]] and json.loads((tmp_path / "manifest.json").read_text())["height"] == 8


@pytest.mark.parametrize("extra,fragments", [
    (["--num", "0"], ["--num", "0"]),
    (["--steps", "0"], ["--steps", "0"]),
    (["--size", "0"], ["--size", "0"]),
    (["--size", "-64"], ["--size", "-64"]),
    (["--sampler", "plms"], ["--sampler", "plms", "ddpm", "euler_a"]),
    (["--guidance", "-1"], ["--guidance", "-1"]),
    (["--guidance", "inf"], ["--guidance", "inf"]),
])
def test_class_images_command_bad_options(tmp_path, no_model_load, extra, fragments):
    from click.testing import CliRunner

    from dreambooth_jax.cli import main

    args = ["class-images", "--model", str(tmp_path / "model"), "--class-prompt", "a dog", "--out",
            str(tmp_path / "cls"), *extra]
    msg = one_line_error(CliRunner().invoke(main, args))
    assert all(s in msg for s in fragments), msg
    assert not (tmp_path / "cls").exists()


def test_class_images_command_bad_out(tmp_path, no_model_load):
    from click.testing import CliRunner
    from PIL import Image

    from dreambooth_jax.cli import main

    f = tmp_path / "cls.txt"
    f.write_text("keep")
    base = ["class-images", "--model", str(tmp_path / "model"), "--class-prompt", "a dog", "--out"]
    msg = one_line_error(CliRunner().invoke(main, base + [str(f)]))
    assert "--out" in msg and "cls.txt is a file" in msg and f.read_text() == "keep"
    msg = one_line_error(CliRunner().invoke(main, base + [str(f / "sub")]))
    assert "cannot create --out" in msg
    photos = tmp_path / "photos"  # the user's own images: refused before the model is loaded
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "00000.png")
    msg = one_line_error(CliRunner().invoke(main, base + [str(photos)]))
    assert "no manifest.json" in msg
