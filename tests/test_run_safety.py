"""Bad settings fail before anything is loaded; the run folder is locked, its history and earlier
config kept; resumes that would change the state are refused up front; remat never reaches the
samplers. (Kills, SIGTERM and a full disk: tests/test_faults.py.)"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from dreambooth_jax.errors import ConfigError, DreamboothError
from dreambooth_jax.training.config import TrainConfig, load_config
from dreambooth_jax.training.rundir import RunFolderError, RunLock, read_metrics

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "dreambooth_jax" / "assets" / "subjects" / "dog"


def tiny_cfg(model, out: Path, **kw) -> TrainConfig:
    base = dict(model=str(model), instance_dir=str(SUBJECT), output_dir=str(out), resolution=32,
                num_class_images=4, class_sampler="ddim", class_steps=2, max_train_steps=4, train_batch_size=4,
                checkpoint_every=2, log_every=1, learning_rate=1e-3, validation_prompts=[])
    return TrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("override,message", [
    ("keep_checkpoints=0", "'keep_checkpoints' must be >= 1"),
    ("learning_rate=-1e-4", "'learning_rate' must be a finite number > 0"),
    ("learning_rate=0", "'learning_rate' must be a finite number > 0"),
    ("sr_learning_rate=-1", "'sr_learning_rate' must be a finite number > 0"),
    ("prior_loss_weight=-1", "'prior_loss_weight' must be a finite number >= 0"),
    ("checkpoint_every=0", "'checkpoint_every' must be >= 1"),
    ("log_every=0", "'log_every' must be >= 1"),
    ("validation_steps=0", "'validation_steps' must be >= 1"),
    ("attention=flash9", "'attention': 'flash9' is not one of auto"),
    ("class_sampler=ddpm_karras", "'class_sampler': 'ddpm_karras' is not one of"),
    ("sr_noise_level=-1", "'sr_noise_level' must be >= 0"),
    ("sr_noise_level=1000", "'sr_noise_level' must be in [0, 999]"),
    ("sr_resolution=130", "'sr_resolution' (130) must be a multiple of 4"),
    ("adam_b2=1.0", "'adam_b2' must be in [0, 1)"),
    ("max_grad_norm=0", "'max_grad_norm' must be a finite number > 0"),
    ("min_snr_gamma=-5", "'min_snr_gamma' must be > 0"),
    ("class_guidance=-2", "'class_guidance' must be a finite number >= 0"),
    ("num_class_images=0", "'num_class_images' must be >= 1 with prior preservation"),
    ("validation_prompts=[3]", "'validation_prompts' must be a list of non-empty strings"),
    ("lr_warmup_steps=-1", "'lr_warmup_steps' must be >= 0"),
])
def test_nonsense_values_are_config_errors(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "tiny.yaml", [override])
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("change,message", [
    (dict(fsdp=3), "'fsdp' (3) must divide the number of devices (8)"),
    (dict(fsdp=16), "'fsdp' (16) must divide the number of devices (8)"),
    (dict(train_batch_size=3), "global batch of 6 images (instance + class) does not split over 8 devices"),
    (dict(resolution=40), "'resolution' (40) must be a multiple of 16"),
    (dict(instance_dir="/nonexistent/photos"), "does not exist"),
    (dict(model="/nonexistent/model"), "does not exist"),
    (dict(sr_model="__UNET_AS_SR__"), "is not an x4 upscaler pipeline"),
    (dict(sr_model="__UPSCALER__", sr_resolution=68), "'sr_resolution' (68) must be a multiple of"),
    (dict(sr_model="__UPSCALER__", sr_noise_level=351), "exceeds the upscaler's max_noise_level 350"),
])
def test_settings_checked_before_any_model_is_loaded(change, message, pipeline_dirs, tmp_path, no_model_load):
    import jax

    from dreambooth_jax.training.run import run

    assert jax.device_count() == 8, "the suite runs with 8 simulated devices (Makefile: XLA_FLAGS)"
    subs = {"__UNET_AS_SR__": str(pipeline_dirs("sd1")), "__UPSCALER__": str(pipeline_dirs("upscaler"))}
    change = {k: subs.get(v, v) for k, v in change.items()}
    cfg = dataclasses.replace(tiny_cfg(pipeline_dirs("sd1"), tmp_path / "out"), **change)
    with pytest.raises(DreamboothError) as info:
        run(cfg, log=lambda m: None)
    assert message in str(info.value), str(info.value)
    assert not (tmp_path / "out" / "config.json").exists()  # nothing written for a run that never started


def test_output_dir_that_is_a_file(pipeline_dirs, tmp_path, no_model_load):
    from dreambooth_jax.training.run import run

    f = tmp_path / "taken"
    f.write_text("the user's notes")
    for out in (f, f / "sub"):
        with pytest.raises(RunFolderError, match="is a file, not a folder"):
            run(tiny_cfg(pipeline_dirs("sd1"), out), log=lambda m: None)
    assert f.read_text() == "the user's notes"


def test_cli_prints_one_line(pipeline_dirs, tmp_path):
    from click.testing import CliRunner

    from dreambooth_jax.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    r = CliRunner().invoke(main, ["train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                                  f"model={pipeline_dirs('sd1')}", f"instance_dir={SUBJECT}", f"output_dir={f}",
                                  "train_batch_size=4"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().count("\n") == 0 and "is a file, not a folder" in r.output, r.output


# ----------------------------------------------------------------------------- the run folder
def test_run_folder_lock_history_config_and_resume(pipeline_dirs, tmp_path, no_model_load, monkeypatch):
    """One tiny run, then everything that may happen to its folder afterwards."""
    import dreambooth_jax.models as models
    from dreambooth_jax.models import loading
    from dreambooth_jax.training.run import run

    out = tmp_path / "run"
    cfg = tiny_cfg(pipeline_dirs("sd1"), out)
    # 1. a second run while the folder is held says who holds it, and touches nothing
    out.mkdir()
    with RunLock(out):
        with pytest.raises(RunFolderError, match=r"in use by another run \(pid \d+ on .*started"):
            run(cfg, log=lambda m: None)
    assert not (out / "config.json").exists()
    monkeypatch.setattr(models, "load_pretrained", loading.load_pretrained)  # now it may load
    run(cfg, log=lambda m: None)
    hist = read_metrics(out / "base" / "metrics.jsonl")
    assert [m["step"] for m in hist] == [1, 2, 3, 4]
    assert [m["step"] for m in json.loads((out / "base" / "metrics.json").read_text())] == [1, 2, 3, 4]
    # 2. rerunning the finished command keeps the history (it used to write [])
    logs = []
    run(cfg, log=logs.append)
    assert "resumed from step 4" in logs
    assert [m["step"] for m in json.loads((out / "base" / "metrics.json").read_text())] == [1, 2, 3, 4]
    # 3. a longer run resumes and appends: each step once
    run(dataclasses.replace(cfg, max_train_steps=6), log=lambda m: None)
    steps = [m["step"] for m in json.loads((out / "base" / "metrics.json").read_text())]
    assert steps == [1, 2, 3, 4, 5, 6]
    # 4. settings that change the state's structure: refused up front, naming the setting
    monkeypatch.setattr(models, "load_pretrained", lambda *a, **k: pytest.fail("loaded before refusing"))
    for change, name in ((dict(ema_decay=0.999), "ema_decay"), (dict(grad_accum=2), "grad_accum"),
                         (dict(train_text_encoder=True), "train_text_encoder")):
        with pytest.raises(ConfigError, match=rf"other settings that change what is saved: {name}"):
            run(dataclasses.replace(cfg, max_train_steps=8, **change), log=lambda m: None)
    # 5. the config of the run in the folder is never lost: a failed start leaves it alone; a
    #    new run with other settings keeps the old one beside its own
    before = (out / "config.json").read_text()
    with pytest.raises(DreamboothError):
        run(dataclasses.replace(cfg, learning_rate=5e-4, instance_dir=str(tmp_path / "nope")), log=lambda m: None)
    assert (out / "config.json").read_text() == before
    monkeypatch.setattr(models, "load_pretrained", loading.load_pretrained)
    run(dataclasses.replace(cfg, learning_rate=5e-4, max_train_steps=6), log=lambda m: None)
    kept = [p.read_text() for p in out.glob("config.previous-*.json")]
    assert before in kept
    assert json.loads((out / "config.json").read_text())["learning_rate"] == 5e-4


def test_keep_checkpoints_never_zero(tmp_path):
    from dreambooth_jax.training.checkpoint import Checkpointer

    with pytest.raises(ValueError, match="keep must be >= 1"):
        Checkpointer(tmp_path / "c", keep=0)


def test_metrics_log_survives_a_cut_line(tmp_path):
    from dreambooth_jax.training.rundir import MetricsLog

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')  # killed mid-write
    log = MetricsLog(p, resume_step=2)
    log.append({"step": 3, "loss": 0.3})
    log.close()
    assert [m["step"] for m in read_metrics(p)] == [1, 2, 3]


# ----------------------------------------------------------------------------- remat
def test_samplers_run_a_remat_model(pipeline_dirs):
    """A model loaded with remat (as the real-model configs train) samples, and samples exactly
    what the same weights sample without remat (remat is off in every sampler)."""
    from dreambooth_jax.diffusion.pipeline import BaseSampler, UpscaleSampler
    from dreambooth_jax.models import ModelOptions, load_pretrained

    for family in ("sd1", "upscaler"):
        out = {}
        for remat in (False, True):
            pipe = load_pretrained(pipeline_dirs(family), ModelOptions(remat=remat))
            if family == "sd1":
                res = BaseSampler(pipe, sampler="ddpm", steps=2)(["a dog"], height=32, width=32, seed=1)
            else:
                low = np.random.RandomState(0).randint(0, 255, (1, 16, 16, 3), np.uint8)
                res = UpscaleSampler(pipe, sampler="ddim", steps=2)(low, ["a dog"], seed=1)
            out[remat] = res.images
            assert pipe.unet.down_blocks[0].remat == remat  # the pipeline's own model is untouched
        np.testing.assert_array_equal(out[True], out[False])  # same weights, same program: same bytes
