"""Every shipped config in configs/ runs end to end as shipped: every setting kept (remat, dtype,
fsdp, prior preservation, validation, SR stage), only the model swapped for a tiny one of the
same family, the subject for the shipped photos, and the sizes and step counts made small. Class
images, training, validation sampling and export, through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SUBJECT = ROOT / "dreambooth_jax" / "assets" / "subjects" / "dog"
# config -> (tiny base family, tiny SR family or None)
FAMILY = {
    "sd15-lora": ("sd1", None),
    "sd15-16gb": ("sd1", None),
    "sd21-768-v": ("sd2-v", None),
    "x4-upscaler-sr": ("sd1", "upscaler"),
}
# configs run end to end by another test (as shipped, sizes made small, with more checks): not run twice
COVERED = {
    "tiny": ("test_train_e2e.py", "test_tiny_yaml_end_to_end"),
    # the demo's embedded training config plus the toy paths (test_toy_yaml_is_the_demo_config)
    "toy": ("test_demo.py", "test_dreambooth_binds_the_toy_subject"),
    # sd15.yaml with SD2.1-base's model id (test_same_settings_as_a_config_that_runs); the SD2
    # architecture goes through the trainer in sd21-768-v's run
    "sd21-base": ("test_configs.py", "test_same_settings_as_a_config_that_runs"),
    # sd21-768-v.yaml's settings on SD1.5 at 512 px (test_same_settings_as_a_config_that_runs): the
    # sizes are made small anyway, the SD2 run trains them, and x4-upscaler-sr's base stage trains
    # the SD1 architecture with the same settings (bf16, remat, fsdp 8, batch 8)
    "sd15": ("test_configs.py", "test_same_settings_as_a_config_that_runs"),
    # DeepFloyd IF: run as shipped on tiny IF stages, their exports loaded by diffusers' IF pipelines
    "if-stage1": ("test_train_if.py", "test_stage_one_trains_lora_and_exports_for_diffusers"),
    "if-stage2": ("test_train_if.py", "test_stage_two_alone_trains_on_pairs_and_exports_for_diffusers"),
}
RUN = [p for p in CONFIGS if p.stem not in COVERED]
# Only sizes and counts change; every other key keeps its shipped value.
SMALL = dict(max_train_steps=2, sr_max_train_steps=2, class_steps=2, validation_steps=2, checkpoint_every=1)


def test_toy_yaml_is_the_demo_config():
    """configs/toy.yaml = the demo's training config (run by test_demo) + the toy world's paths."""
    from dreambooth_jax.demo import TOY_PRIOR, TOY_SR, TOY_SUBJECT, TOY_TRAIN

    toy = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    paths = {k: toy.pop(k) for k in ("model", "sr_model", "instance_dir", "instance_prompt", "class_prompt",
                                     "output_dir")}
    assert toy == yaml.safe_load(TOY_TRAIN.read_text())
    for key, path in (("model", TOY_PRIOR), ("sr_model", TOY_SR), ("instance_dir", TOY_SUBJECT)):
        assert (ROOT / paths[key]).resolve() == path.resolve(), key


@pytest.mark.parametrize("config, runs, free", [("sd21-base", "sd15", ()), ("sd15", "sd21-768-v", ("resolution",))])
def test_same_settings_as_a_config_that_runs(config, runs, free):
    """Configs whose settings equal another shipped config's but for the model, the run folder
    and ``free`` (the test's tiny model and small sizes replace them anyway): one end-to-end run
    covers both. ``runs`` is run end to end, or is itself covered this way by a config that is."""
    a, b = (yaml.safe_load((ROOT / "configs" / f"{n}.yaml").read_text()) for n in (config, runs))
    for cfg in (a, b):
        for key in ("model", "output_dir", *free):
            cfg.pop(key)
    assert a == b
    assert runs in FAMILY or runs in COVERED


def test_every_config_is_covered():
    assert sorted(p.stem for p in CONFIGS) == sorted({**FAMILY, **COVERED}), "add the new config to FAMILY"
    for file, test in COVERED.values():
        assert f"def {test}(" in (ROOT / "tests" / file).read_text(), (file, test)


@pytest.fixture(scope="module")
def family_dir(pipeline_dirs, tmp_path_factory):
    def get(name: str) -> Path:
        if name != "sd2-v":
            return pipeline_dirs(name)
        # SD 2.x 768-v: the same architecture with a v-prediction scheduler
        d = tmp_path_factory.mktemp("sd2v") / "pipe"
        if not d.exists():
            shutil.copytree(pipeline_dirs("sd2"), d)
            f = d / "scheduler" / "scheduler_config.json"
            f.write_text(json.dumps(dict(json.loads(f.read_text()), prediction_type="v_prediction")))
        return d
    return get


@pytest.fixture(scope="module")
def class_cache(tmp_path_factory):
    """One class-image folder per (model family, sampler): the first config of a family draws the
    images (and writes the manifest), the others of the same settings reuse them, as a user's
    runs sharing a class_dir do; saves a sampler compile per config."""
    root = tmp_path_factory.mktemp("class_images")
    return lambda family, sampler: root / f"{family}-{sampler}"


@pytest.mark.parametrize("config", RUN, ids=[p.stem for p in RUN])
def test_shipped_config_runs_as_shipped(config, family_dir, class_cache, tmp_path):
    from dreambooth_jax.cli import main
    from dreambooth_jax.models import load_pretrained

    shipped = yaml.safe_load(config.read_text())
    base, sr = FAMILY[config.stem]
    over = dict(SMALL, output_dir=str(tmp_path / "run"))
    if base:
        over.update(model=str(family_dir(base)), instance_dir=str(SUBJECT), resolution=32,
                    class_dir=str(class_cache(base, shipped.get("class_sampler", "ddpm"))))
    if sr:
        over.update(sr_model=str(family_dir(sr)), sr_resolution=64)
    batch = shipped.get("train_batch_size", 1)
    if 2 * batch % jax.device_count():  # a one-device config on the 8 simulated devices: a batch that splits
        batch = over["train_batch_size"] = jax.device_count() // 2
    over["num_class_images"] = max(batch, 4)
    args = ["train", "--config", str(config)] + [f"{k}={json.dumps(v) if not isinstance(v, str) else v}"
                                                for k, v in over.items()]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + (repr(r.exception) if r.exception else "")
    out = tmp_path / "run"
    saved = json.loads((out / "config.json").read_text())
    for key, value in shipped.items():  # nothing but sizes, counts and paths was changed
        if key not in over:
            assert saved[key] == value, key
    class_dir = Path(saved["class_dir"]) if saved["class_dir"] else out / "class_images"
    assert json.loads((class_dir / "manifest.json").read_text())["count"] >= 4, "class images were generated"
    assert json.loads((out / "base" / "metrics.json").read_text())[-1]["step"] == 2
    if saved["validation_prompts"]:
        assert (out / "base" / "validation" / "step_000002.png").is_file()
    load_pretrained(out / "model", components=("unet",))
    if saved["lora_rank"]:
        assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    if saved["sr_model"]:  # the x4-upscaler stage on (low-res, high-res) pairs of the subject
        hist = json.loads((out / "sr" / "metrics.json").read_text())
        assert hist[-1]["step"] == 2 and all(np.isfinite(h["loss"]) and h["prior_loss"] > 0 for h in hist)
        tuned = load_pretrained(out / "sr_model", components=("unet", "scheduler"))
        assert tuned.is_upscaler and tuned.max_noise_level == 350
        orig = load_pretrained(family_dir(sr), components=("unet",))
        assert not np.allclose(np.asarray(orig.unet.conv_in.kernel[...]), np.asarray(tuned.unet.conv_in.kernel[...]))
        # class pairs: the frozen SR model upscaled the generated class images (not a resize of them)
        hi = sorted((out / "class_images_sr").glob("*.png"))
        manifest = json.loads((out / "class_images_sr" / "manifest.json").read_text())
        assert len(hi) == over["num_class_images"] and manifest["noise_level"] == saved["sr_noise_level"]
        from PIL import Image

        assert Image.open(hi[0]).size == (over["sr_resolution"],) * 2
