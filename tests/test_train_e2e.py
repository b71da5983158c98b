"""`train` end to end on a tiny pipeline and the shipped real subject photos; config errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flax import nnx

from dreambooth_jax.cli import main
from dreambooth_jax.models import load_pretrained
from dreambooth_jax.testing.reference import max_rel_err

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "dreambooth_jax" / "assets" / "subjects" / "dog"


def test_tiny_yaml_end_to_end(pipeline_dirs, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"model={pipeline_dirs('sd1')}",
            f"instance_dir={SUBJECT}", f"output_dir={out}", "max_train_steps=30", "resolution=32",
            "num_class_images=4", "class_steps=3", "log_every=3", "fsdp=2", "train_batch_size=4"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    hist = json.loads((out / "base" / "metrics.json").read_text())
    first, last = np.mean([h["loss"] for h in hist[:3]]), np.mean([h["loss"] for h in hist[-3:]])
    assert last < 0.7 * first, (first, last)  # the subject is being fit
    assert all(h["prior_loss"] > 0 for h in hist)
    manifest = json.loads((out / "class_images" / "manifest.json").read_text())
    assert manifest["prompt"] == "a photo of dog" and manifest["count"] == 4
    assert sorted(p.name for p in (out / "base" / "validation").iterdir()) == ["step_000020.png", "step_000030.png"]
    from tensorboardX.event_file_writer import EventFileWriter  # noqa: F401  (the writer we log with)

    events = list((out / "base" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and sum(e.stat().st_size for e in events) > 1000  # scalars and validation images
    # The export is a complete diffusers folder; its UNet equals ours in PyTorch.
    from diffusers import DiffusionPipeline

    tp = DiffusionPipeline.from_pretrained(str(out / "model"))
    ours = load_pretrained(out / "model")
    x = np.random.RandomState(0).randn(1, 8, 8, 4).astype(np.float32)
    ctx = np.random.RandomState(1).randn(1, 77, 32).astype(np.float32)
    with torch.no_grad():
        ref = tp.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), 300, torch.from_numpy(ctx)).sample.numpy()
    assert max_rel_err(np.asarray(ours.unet(jnp.asarray(x), 300, jnp.asarray(ctx))).transpose(0, 3, 1, 2), ref) <= 1e-4
    orig = load_pretrained(pipeline_dirs("sd1"), components=("unet",))
    assert not np.allclose(np.asarray(orig.unet.conv_in.kernel.value), np.asarray(ours.unet.conv_in.kernel.value))
    # Rerunning the finished command resumes at the end and re-exports, without retraining.
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "resumed from step 30" in r.output, r.output


@pytest.mark.parametrize("override,message", [
    ("learnig_rate=1e-4", "unknown config key 'learnig_rate' (did you mean learning_rate"),
    ("max_train_steps=many", "config key 'max_train_steps': expected int"),
    ("dtype=float16", "'dtype': 'float16' is not float32 or bfloat16"),
])
def test_config_typos(override, message, tmp_path):
    r = CliRunner().invoke(main, ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), override])
    assert r.exit_code == 1 and message in r.output, r.output
    assert "Traceback" not in r.output


def test_bad_inputs(pipeline_dirs, tmp_path):
    base = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"model={pipeline_dirs('sd1')}",
            f"output_dir={tmp_path / 'o'}"]
    r = CliRunner().invoke(main, base + [f"instance_dir={tmp_path / 'missing'}"])
    assert r.exit_code == 1 and "does not exist" in r.output and "missing" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(main, base + [f"instance_dir={empty}"])
    assert r.exit_code == 1 and "no images in" in r.output
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = CliRunner().invoke(main, base + [f"instance_dir={SUBJECT}", "resolution=36", "train_batch_size=4"])
    assert r.exit_code == 1 and "'resolution' (36) must be a multiple of 16" in r.output


def test_train_text_encoder(pipeline_dirs, tmp_path):
    """train_text_encoder=true: the step runs the text encoder on token ids with gradients; both
    the UNet and the text encoder change and are exported."""
    out = tmp_path / "te"
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"model={pipeline_dirs('sd1')}",
            f"instance_dir={SUBJECT}", f"output_dir={out}", "max_train_steps=4", "resolution=32",
            "num_class_images=4", "class_steps=2", "log_every=2", "train_batch_size=4", "train_text_encoder=true",
            "validation_prompts=[]"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    orig, ours = load_pretrained(pipeline_dirs("sd1")), load_pretrained(out / "model")
    for name in ("unet", "text_encoder"):
        a = [np.asarray(x) for x in jax.tree.leaves(nnx.state(getattr(orig, name), nnx.Param))]
        b = [np.asarray(x) for x in jax.tree.leaves(nnx.state(getattr(ours, name), nnx.Param))]
        assert any(not np.allclose(x, y) for x, y in zip(a, b)), name
