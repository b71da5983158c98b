"""`dreambooth-jax sample` on a DeepFloyd IF cascade: stage I -> stage II -> the x4 upscaler.

The tiny IF stage folders are tests/test_if_pipeline.py's (``if_stages``: diffusers-saved, tiny T5
and its offline tokenizer; stage II names no text encoder), the x4 upscaler is conftest's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli_checks import one_line_error
from dreambooth_jax.cli import main
from test_if_pipeline import PROMPTS, if_stages  # noqa: F401  (the fixture, used by name)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "xla-cache"
    monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(d))
    return d


@pytest.fixture
def no_load(monkeypatch, no_model_load):
    """Neither a Stable Diffusion nor an IF model may be loaded."""
    def fail(*args, **kwargs):
        raise AssertionError(f"load_if{args} called before the options were checked")

    monkeypatch.setattr("dreambooth_jax.models.if_loading.load_if", fail)


def _pixels(folder, prefix):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob(f"{prefix}_0*.png"))}


def test_if_cascade_writes_every_stage(if_stages, pipeline_dirs, tmp_path, cache_dir):
    one, two = str(if_stages["I"][0]), str(if_stages["II"][0])
    common = ["sample", "--model", one, "--sr-model", two, *[a for p in PROMPTS for a in ("--prompt", p)],
              "--steps", "2", "--sr-steps", "2", "--height", "16", "--width", "16", "--seed", "3"]
    first = tmp_path / "a"
    r = CliRunner().invoke(main, [*common, "--sr2-model", str(pipeline_dirs("upscaler")), "--sr2-steps", "2",
                                  "--out", str(first)])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(["settings.json", "base_grid.png", "sr_grid.png", "sr2_grid.png"]
                           + [f"{s}_{i:03d}.png" for s in ("base", "sr", "sr2") for i in range(2)])
    for stage, size in (("base", 16), ("sr", 64), ("sr2", 256)):
        for name, im in _pixels(first, stage).items():
            assert im.shape == (size, size, 3) and im.dtype == np.uint8, (name, im.shape)
    settings = json.loads((first / "settings.json").read_text())
    # the IF defaults fill what was not given; the given values are kept
    assert settings["family"] == "if" and settings["scheduler"] == "ddpm" and settings["guidance"] == 7.0
    assert settings["sr_guidance"] == 4.0 and settings["sr_noise_level"] == 250 and settings["sr2_noise_level"] == 100
    assert settings["steps"] == 2 and settings["sr_steps"] == 2 and settings["sr2_steps"] == 2
    assert settings["per_image_prompts"] == PROMPTS and settings["files"][0] == "base_000.png"
    assert "encoding 2 prompt(s) with T5" in r.output

    # (The same seed drawing the same images: tests/test_train_if.py samples one seed through two
    # routes to the same weights and compares the pixels.)
    a = _pixels(first, "base")
    assert not np.array_equal(a["base_000.png"], a["base_001.png"])  # two prompts, two images


@pytest.mark.parametrize("case,fragments", [
    ("if2_as_model", ["--model", "IF stage II", "--sr-model"]),
    ("sd_with_if_sr", ["--sr-model", "IF stage II", "Stable Diffusion --model", "x4 upscaler"]),
    ("sd_with_sr2", ["--sr2-model", "IF cascade", "not an IF pipeline"]),
    ("sr2_without_sr", ["--sr2-model", "add --sr-model"]),
    ("upscaler_as_if_sr", ["--sr-model", "Stable Diffusion x4 upscaler", "IF stage II", "--sr2-model"]),
    ("if1_as_sr", ["--sr-model", "IF stage I", "not a DeepFloyd IF stage II"]),
    ("if2_as_sr2", ["--sr2-model", "IF stage II", "x4 upscaler"]),
    ("lora", ["--lora", "x.safetensors"]),  # parsed (here: not a LoRA file) before any model loads
    ("noise_level", ["--sr-noise-level", "[0, 999]", "1000"]),
    ("sr2_option_alone", ["--sr2-steps", "--sr2-model"]),
])
def test_mixed_cascades_rejected_before_loading(if_stages, pipeline_dirs, tmp_path, cache_dir, no_load, case,
                                                fragments):
    one, two = str(if_stages["I"][0]), str(if_stages["II"][0])
    sd, up = str(pipeline_dirs("sd1")), str(pipeline_dirs("upscaler"))
    lora = tmp_path / "x.safetensors"
    lora.write_bytes(b"not read")
    extra = {
        "if2_as_model": ["--model", two],
        "sd_with_if_sr": ["--model", sd, "--sr-model", two],
        "sd_with_sr2": ["--model", sd, "--sr2-model", up],
        "sr2_without_sr": ["--model", one, "--sr2-model", up],
        "upscaler_as_if_sr": ["--model", one, "--sr-model", up],
        "if1_as_sr": ["--model", one, "--sr-model", one],
        "if2_as_sr2": ["--model", one, "--sr-model", two, "--sr2-model", two],
        "lora": ["--model", one, "--lora", str(lora)],
        "noise_level": ["--model", one, "--sr-model", two, "--sr-noise-level", "1000"],
        "sr2_option_alone": ["--model", one, "--sr2-steps", "3"],
    }[case]
    r = CliRunner().invoke(main, ["sample", "--prompt", "a dog", "--out", str(tmp_path / "o"), *extra])
    msg = one_line_error(r)
    assert all(f in msg for f in fragments), msg
    assert not (tmp_path / "o").exists()
