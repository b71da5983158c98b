"""The `sample` command: files written, settings recorded, bad input rejected clearly."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dreambooth_jax.cli import main


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "xla-cache"
    monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(d))
    return d


def test_sample_cascade_writes_images_grid_and_settings(pipeline_dirs, tmp_path, cache_dir):
    out = tmp_path / "out"
    args = ["sample", "--model", str(pipeline_dirs("sd1")), "--sr-model", str(pipeline_dirs("upscaler")),
            "--prompt", "a photo of sks dog", "--prompt", "a sks dog in the snow", "--num-images", "2",
            "--steps", "3", "--sr-steps", "2", "--scheduler", "dpmpp_2m_karras", "--height", "32", "--width", "32",
            "--seed", "7", "--out", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir())
    assert names.count("settings.json") == 1 and "base_grid.png" in names and "sr_grid.png" in names
    assert len([n for n in names if n.startswith("base_0")]) == 4 and len([n for n in names if n.startswith("sr_0")]) == 4
    settings = json.loads((out / "settings.json").read_text())
    assert settings["seed"] == 7 and settings["scheduler"] == "dpmpp_2m_karras"
    assert settings["per_image_prompts"][:2] == ["a photo of sks dog"] * 2
    from PIL import Image

    assert Image.open(out / "sr_000.png").size == (128, 128)
    assert any(cache_dir.rglob("*")), "persistent compilation cache was not written"
    # The same folder again: refused, nothing overwritten.
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "not empty" in r.output


@pytest.mark.parametrize("extra,message", [
    (["--height", "30"], "must be a positive multiple of 16"),
    (["--scheduler", "plms"], "unknown scheduler"),
    (["--num-images", "0"], "--num-images must be >= 1"),
])
def test_sample_bad_input(pipeline_dirs, tmp_path, cache_dir, extra, message):
    args = ["sample", "--model", str(pipeline_dirs("sd1")), "--prompt", "x", "--steps", "2", "--height", "32",
            "--width", "32", "--out", str(tmp_path / "o")] + extra
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and message in r.output, r.output
    assert "Traceback" not in r.output


def test_sample_missing_model(tmp_path, cache_dir):
    r = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not exist" in r.output
