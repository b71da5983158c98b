"""Every shipped config in configs/ runs end to end as shipped: every setting kept (remat, dtype,
fsdp, prior preservation, validation, SR stage), only the model swapped for a tiny one of the
same family, the subject for the shipped photos, and the sizes and step counts made small. Class
images, training, validation sampling and export, through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SUBJECT = ROOT / "dreambooth_jax" / "assets" / "subjects" / "dog"
# config -> (tiny base family, tiny SR family or None); None: the config's own (shipped) model
FAMILY = {
    "sd15": ("sd1", None),
    "sd21-base": ("sd2", None),
    "sd21-768-v": ("sd2-v", None),
    "x4-upscaler-sr": ("sd1", "upscaler"),
    "tiny": ("sd1", None),
    "toy": (None, None),
}
# Only sizes and counts change; every other key keeps its shipped value.
SMALL = dict(max_train_steps=2, sr_max_train_steps=2, class_steps=2, validation_steps=2, checkpoint_every=1)


def test_every_config_is_covered():
    assert sorted(p.stem for p in CONFIGS) == sorted(FAMILY), "add the new config to FAMILY"


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


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_runs_as_shipped(config, family_dir, tmp_path):
    from dreambooth_jax.cli import main
    from dreambooth_jax.models import load_pretrained

    shipped = yaml.safe_load(config.read_text())
    base, sr = FAMILY[config.stem]
    over = dict(SMALL, output_dir=str(tmp_path / "run"))
    if base:
        over.update(model=str(family_dir(base)), instance_dir=str(SUBJECT), resolution=32)
    if sr:
        over.update(sr_model=str(family_dir(sr)), sr_resolution=64)
    batch = shipped.get("train_batch_size", 1)
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
    assert sorted((out / "class_images").glob("*.png")), "class images were generated"
    assert json.loads((out / "base" / "metrics.json").read_text())[-1]["step"] == 2
    if saved["validation_prompts"]:
        assert (out / "base" / "validation" / "step_000002.png").is_file()
    load_pretrained(out / "model", components=("unet",))
    if saved["sr_model"]:
        assert json.loads((out / "sr" / "metrics.json").read_text())[-1]["step"] == 2
        assert load_pretrained(out / "sr_model", components=("unet", "scheduler")).is_upscaler
