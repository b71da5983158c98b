"""The `sample` command: files written, settings recorded, bad input rejected clearly."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli_checks import one_line_error
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


def test_sample_size_not_a_multiple_of_the_model(pipeline_dirs, tmp_path, cache_dir):
    """The multiple needs the model's config: checked after loading, before sampling or the SR model."""
    args = ["sample", "--model", str(pipeline_dirs("sd1")), "--sr-model", str(pipeline_dirs("upscaler")),
            "--prompt", "x", "--steps", "2", "--height", "30", "--width", "32", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "Error: --height/--width: image size 30x32 must be a positive multiple of 16" in r.output
    assert "Traceback" not in r.output and "loading SR model" not in r.output
    assert not (tmp_path / "o").exists()


def test_sample_missing_model(tmp_path, cache_dir):
    r = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "does not exist" in r.output


# ------------------------------------------------------------------ up-front checks (no model loaded)


def sample_args(pipeline_dirs, tmp_path, *extra):
    return ["sample", "--model", str(pipeline_dirs("sd1")), "--prompt", "x", "--steps", "2", "--height", "32",
            "--width", "32", *(["--out", str(tmp_path / "o")] if "--out" not in extra else []), *extra]


def test_sample_out_is_an_existing_file(pipeline_dirs, tmp_path, cache_dir, no_model_load):
    f = tmp_path / "keep.png"
    f.write_bytes(b"user data")
    msg = one_line_error(CliRunner().invoke(main, sample_args(pipeline_dirs, tmp_path, "--out", str(f))))
    assert "--out" in msg and "keep.png" in msg and "is a file" in msg
    assert f.read_bytes() == b"user data"


def test_sample_out_parent_cannot_be_created(pipeline_dirs, tmp_path, cache_dir, no_model_load):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    out = f / "images"  # the would-be parent is a file
    msg = one_line_error(CliRunner().invoke(main, sample_args(pipeline_dirs, tmp_path, "--out", str(out))))
    assert "--out" in msg and "cannot create" in msg and "notes.txt is a file" in msg
    assert f.read_text() == "keep"


@pytest.mark.parametrize("extra,fragments", [
    (["--scheduler", "plms"], ["--scheduler", "plms", "ddim", "dpmpp_2m_karras", "euler_a"]),
    (["--guidance", "-1"], ["--guidance", "-1"]),
    (["--guidance", "nan"], ["--guidance", "nan"]),
    (["--eta", "-0.1"], ["--eta", "-0.1"]),
    (["--eta", "1.5"], ["--eta", "1.5"]),
    (["--eta", "0.5", "--scheduler", "euler"], ["--eta", "only", "ddim", "euler"]),
    (["--steps", "0"], ["--steps", "0"]),
    (["--height", "0"], ["--height", "0"]),
    (["--width", "-32"], ["--width", "-32"]),
    (["--num-images", "0"], ["--num-images", "0"]),
    (["--sr-noise-level", "30"], ["--sr-noise-level", "--sr-model"]),  # SR options without an SR stage
    (["--sr-steps", "10"], ["--sr-steps", "--sr-model"]),
])
def test_sample_bad_options_rejected_before_loading(pipeline_dirs, tmp_path, cache_dir, no_model_load, extra,
                                                    fragments):
    msg = one_line_error(CliRunner().invoke(main, sample_args(pipeline_dirs, tmp_path, *extra)))
    assert all(s in msg for s in fragments), msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra,fragments", [
    (["--sr-noise-level", "351"], ["--sr-noise-level", "351", "350"]),
    (["--sr-noise-level", "-1"], ["--sr-noise-level", "-1"]),
    (["--sr-guidance", "-2"], ["--sr-guidance", "-2"]),
    (["--sr-steps", "0"], ["--sr-steps", "0"]),
])
def test_sample_bad_sr_options_rejected_before_loading(pipeline_dirs, tmp_path, cache_dir, no_model_load, extra,
                                                       fragments):
    args = sample_args(pipeline_dirs, tmp_path, "--sr-model", str(pipeline_dirs("upscaler")), *extra)
    msg = one_line_error(CliRunner().invoke(main, args))
    assert all(s in msg for s in fragments), msg


def test_sample_bad_models_rejected_before_loading(pipeline_dirs, tmp_path, cache_dir, no_model_load):
    # A missing SR model used to be found only after the base stage had been sampled.
    args = sample_args(pipeline_dirs, tmp_path, "--sr-model", str(tmp_path / "no-such-upscaler"))
    msg = one_line_error(CliRunner().invoke(main, args))
    assert "no-such-upscaler" in msg and "does not exist" in msg
    args = sample_args(pipeline_dirs, tmp_path, "--sr-model", str(pipeline_dirs("sd1")))
    msg = one_line_error(CliRunner().invoke(main, args))
    assert "--sr-model" in msg and "not an x4 upscaler" in msg
    args = ["sample", "--model", str(pipeline_dirs("upscaler")), "--prompt", "x", "--out", str(tmp_path / "o")]
    msg = one_line_error(CliRunner().invoke(main, args))
    assert "--model" in msg and "x4 upscaler" in msg and "--sr-model" in msg


def test_sample_help_lists_schedulers_and_ranges():
    r = CliRunner().invoke(main, ["sample", "--help"])
    assert r.exit_code == 0
    from dreambooth_jax.diffusion.samplers import SAMPLERS

    text = " ".join(r.output.split())
    assert all(name in text for name in SAMPLERS) and "dpmpp_2m_karras" in text
    assert "0<=x<=1" in text  # --eta


@pytest.mark.parametrize("change,message", [
    ({"scheduler": "plms"}, "unknown scheduler 'plms'"),
    ({"guidance": -0.5}, "--guidance must be >= 0"),
    ({"guidance": float("inf")}, "--guidance must be a finite number"),
    ({"eta": 1.01}, "--eta must be in [0, 1]"),
    ({"eta": 0.3, "scheduler": "dpmpp_2m"}, "--eta 0.3 only applies to the ddim scheduler"),
    ({"steps": 0}, "--steps must be >= 1"),
    ({"height": -8}, "--height must be >= 1"),
    ({"num_images": 0}, "--num-images must be >= 1"),
    ({"prompts": []}, "at least one --prompt"),
    ({"sr_model": "UP", "sr_noise_level": 400}, "--sr-noise-level must be in [0, 350]"),
    ({"sr_model": "UP", "sr_guidance": -1.0}, "--sr-guidance must be >= 0"),
    ({"sr_model": "UP", "sr_steps": 0}, "--sr-steps must be >= 1"),
    ({"dtype": "float16"}, "--dtype must be one of"),
])
def test_run_checks_config_before_loading(pipeline_dirs, tmp_path, cache_dir, no_model_load, change, message):
    """The library entry point checks what the CLI's option types check, for callers without the CLI."""
    from dreambooth_jax.errors import ConfigError
    from dreambooth_jax.sampling import SampleConfig, run

    if change.get("sr_model") == "UP":
        change = dict(change, sr_model=str(pipeline_dirs("upscaler")))
    cfg = SampleConfig(**{"model": str(pipeline_dirs("sd1")), "prompts": ["x"], "out": str(tmp_path / "o"), **change})
    with pytest.raises(ConfigError) as e:
        run(cfg, progress=lambda m: None)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()
