"""LoRA DreamBooth: adapters at init, training only the adapters, exact resume, export, errors."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner
from flax import nnx

from dreambooth_jax.cli import main
from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models import load_pretrained
from dreambooth_jax.models.convert import read_safetensors
from dreambooth_jax.models.lora import LoRAParam, LoRASpec, add_lora, lora_modules, merge_lora, resolve_targets

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = ROOT / "dreambooth_jax" / "assets" / "subjects" / "dog"


def _inputs(unet, batch=2, size=8):
    rng = np.random.RandomState(0)
    cross = unet.config.cross_attention_dim
    cross = cross if isinstance(cross, int) else cross[0]
    x = jnp.asarray(rng.randn(batch, size, size, unet.config.in_channels), jnp.float32)
    ctx = jnp.asarray(rng.randn(batch, 77, cross), jnp.float32)
    return x, jnp.array([10, 700][:batch]), ctx


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_adapters_at_init_compute_the_base_model_exactly(pipeline_dirs, targets):
    """up starts at zero, so W x + scale * up(down(x)) adds an exact 0.0: bit-identical outputs."""
    pipe = load_pretrained(pipeline_dirs("sd1"), components=("unet", "text_encoder", "tokenizer"))
    x, t, ctx = _inputs(pipe.unet)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 1000, (2, 77)))
    y0, h0 = pipe.unet(x, t, ctx), pipe.text_encoder(ids)[0]
    names = add_lora(pipe.unet, LoRASpec(rank=4, targets=resolve_targets(targets)))
    add_lora(pipe.text_encoder, LoRASpec(rank=2, targets=("q_proj", "k_proj", "v_proj", "out_proj")),
             component="text_encoder")
    assert names and all(n.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for n in names) or targets == "all"
    np.testing.assert_array_equal(np.asarray(pipe.unet(x, t, ctx)), np.asarray(y0))
    np.testing.assert_array_equal(np.asarray(pipe.text_encoder(ids)[0]), np.asarray(h0))


def test_merged_adapters_equal_the_unmerged_model(pipeline_dirs):
    """merge_lora folds scale * down @ up into W in float32; the outputs differ only by the
    reassociation (x W + x d u vs x (W + d u)): a few ulp per dot product of the tiny UNet, far
    below 1e-5 relative."""
    pipe = load_pretrained(pipeline_dirs("sd1"), components=("unet",))
    add_lora(pipe.unet, LoRASpec(rank=4, alpha=8.0, targets=("*",)))
    for i, (_, m) in enumerate(sorted(lora_modules(pipe.unet).items())):
        m.up[...] = 0.05 * jax.random.normal(jax.random.key(i), m.up.shape)
    x, t, ctx = _inputs(pipe.unet)
    y = np.asarray(pipe.unet(x, t, ctx))
    y_base = np.asarray(merge_lora(pipe.unet, scale=0.0)(x, t, ctx))
    merged = np.asarray(merge_lora(pipe.unet)(x, t, ctx))
    assert np.abs(y - y_base).max() > 1e-2 * np.abs(y).max()  # the adapters do something
    assert np.abs(merged - y).max() <= 1e-5 * np.abs(y).max()


def test_lora_targets_matching_nothing_list_the_layer_names(pipeline_dirs):
    pipe = load_pretrained(pipeline_dirs("sd1"), components=("unet",))
    with pytest.raises(ConfigError, match=r"lora_targets to_qq match no layer of the unet \(layer names end in: .*to_q"):
        add_lora(pipe.unet, LoRASpec(rank=4, targets=("to_qq",)))


@pytest.mark.parametrize("override,message", [
    ("lora_rank=-1", "'lora_rank' must be >= 0"),
    ("lora_text_encoder=true", "'lora_text_encoder' needs lora_rank > 0"),
    ("lora_dropout=1.0", "'lora_dropout' must be in [0, 1)"),
    ("lora_alpha=0", "'lora_alpha' must be a number > 0"),
])
def test_lora_config_errors(override, message, tmp_path):
    r = CliRunner().invoke(main, ["train", "model=x", f"instance_dir={SUBJECT}", f"output_dir={tmp_path}", override])
    assert r.exit_code != 0 and message in r.output, r.output


def _train(pipeline_dirs, out, *extra, steps=6, model="sd1"):
    args = ["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"model={pipeline_dirs(model)}",
            f"instance_dir={SUBJECT}", f"output_dir={out}", f"max_train_steps={steps}", "resolution=32",
            "num_class_images=4", "class_steps=2", "log_every=2", "train_batch_size=4", "lora_rank=4",
            "learning_rate=1e-2", "checkpoint_every=3", "validation_prompts=[]", *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    return r.output


def _tensors(path):
    f = read_safetensors(path)
    return {k: np.asarray(f[k]) for k in f}


def test_lora_run_trains_only_adapters_exports_and_resumes_exactly(pipeline_dirs, tmp_path):
    out = _train(pipeline_dirs, tmp_path / "a", "lora_text_encoder=true", "lora_dropout=0.1", "lora_alpha=8")
    assert "LoRA rank 4, alpha 8 on" in out and "text-encoder layers" in out
    lora = _tensors(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("unet.") for k in lora) and any(k.startswith("text_encoder.") for k in lora)
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if "lora_B" in k)  # up moved off zero
    kohya = _tensors(tmp_path / "a" / "lora" / "lora_kohya.safetensors")
    assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in kohya)
    # The checkpoint holds the adapters (and their AdamW moments) only, not the base weights.
    import orbax.checkpoint as ocp

    base_n = sum(x.size for x in jax.tree.leaves(nnx.state(
        load_pretrained(pipeline_dirs("sd1"), components=("unet",)).unet, nnx.Param)))
    meta = ocp.PyTreeCheckpointer().metadata(tmp_path / "a" / "base" / "checkpoints" / "6" / "state")
    leaves = [x for x in jax.tree.leaves(meta.item_metadata.tree) if hasattr(x, "shape")]
    names = [x.name for x in leaves]
    assert any(n.startswith("params.") for n in names), names
    assert all("lora" in n for n in names if n.startswith("params.")), names
    assert sum(int(np.prod(x.shape)) for x in leaves) < 0.2 * base_n
    # The exported folder is the base with the adapters merged; its other weights are the base's.
    base = load_pretrained(pipeline_dirs("sd1"), components=("unet", "text_encoder"))
    merged = load_pretrained(tmp_path / "a" / "model", components=("unet", "text_encoder"))
    flat = lambda model: {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    b, m = flat(base.unet), flat(merged.unet)
    changed = {k for k in b if not np.array_equal(b[k], m[k])}
    assert changed and all(any(t in c for t in ("to_q", "to_k", "to_v", "to_out")) for c in changed), changed
    # `dreambooth-jax export` of the run's checkpoint writes the same adapters; a step not kept is named.
    r = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "--out", str(tmp_path / "exp")])
    assert r.exit_code == 0, r.output
    exported = _tensors(tmp_path / "exp" / "lora" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == lora.keys() and all(np.array_equal(exported[k], lora[k]) for k in lora)
    assert (tmp_path / "exp" / "model" / "unet").is_dir()
    r = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "--out", str(tmp_path / "exp"), "--step", "4",
                                  "--overwrite"])
    assert r.exit_code != 0 and "no checkpoint of step 4 (kept: 3, 6)" in r.output, r.output
    r = CliRunner().invoke(main, ["export", str(tmp_path / "a"), "--out", str(tmp_path / "exp")])
    assert r.exit_code != 0 and "pass --overwrite" in r.output, r.output
    # Interrupted at step 3 (a checkpoint) and resumed == straight through: bit-identical adapters.
    _train(pipeline_dirs, tmp_path / "b", "lora_text_encoder=true", "lora_dropout=0.1", "lora_alpha=8", steps=3)
    out = _train(pipeline_dirs, tmp_path / "b", "lora_text_encoder=true", "lora_dropout=0.1", "lora_alpha=8")
    assert "resumed from step 3" in out
    # A changed rank would not fit the saved adapters: refused up front, naming the setting.
    r = CliRunner().invoke(main, ["train", "--config", str(ROOT / "configs" / "tiny.yaml"),
                                  f"model={pipeline_dirs('sd1')}", f"instance_dir={SUBJECT}",
                                  f"output_dir={tmp_path / 'b'}", "lora_rank=8"])
    assert r.exit_code != 0 and "lora_rank: 4 -> 8" in r.output, r.output
    resumed = _tensors(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == lora.keys()
    for k in lora:
        np.testing.assert_array_equal(resumed[k], lora[k], err_msg=k)


def test_lora_state_is_adapters_only(pipeline_dirs):
    """The train loop's trainable pytree (and so AdamW's moments) is the adapters: the base UNet
    is a frozen argument in the compute dtype."""
    pipe = load_pretrained(pipeline_dirs("sd1"), components=("unet",))
    add_lora(pipe.unet, LoRASpec(rank=4))
    _, adapters, rest = nnx.split(pipe.unet, LoRAParam, ...)
    n_lora = sum(x.size for x in jax.tree.leaves(adapters))
    n_base = sum(x.size for x in jax.tree.leaves(rest))
    assert 0 < n_lora < 0.2 * n_base


@pytest.mark.slow  # make test-all: the base stage's LoRA path (above) on the SR step (the x4 config's run)
def test_sr_stage_lora(pipeline_dirs, tmp_path):
    """LoRA on the SR stage: the x4 upscaler's adapters (every linear and conv) are trained on the
    subject's (low-res, high-res) pairs and exported beside the merged SR folder (the stage alone,
    without prior preservation, to keep it short; the base stage is the code path tested above)."""
    from dreambooth_jax.models import ModelOptions
    from dreambooth_jax.training.config import TrainConfig
    from dreambooth_jax.training.run import run_sr_stage

    up = pipeline_dirs("upscaler")
    cfg = TrainConfig(model=str(pipeline_dirs("sd1")), sr_model=str(up), instance_dir=str(SUBJECT),
                      output_dir=str(tmp_path), sr_max_train_steps=2, sr_resolution=64, train_batch_size=8,
                      with_prior_preservation=False, lora_rank=4, lora_targets="all", sr_learning_rate=1e-2,
                      checkpoint_every=2, validation_prompts=[])
    logs = []
    run_sr_stage(cfg, ModelOptions(), tmp_path, logs.append, folder=up)
    assert any("LoRA rank 4" in m for m in logs), logs
    sr = _tensors(tmp_path / "sr_lora" / "pytorch_lora_weights.safetensors")
    assert sr and all(k.startswith("unet.") for k in sr)
    assert any(np.abs(v).max() > 0 for k, v in sr.items() if "lora_B" in k)
    assert load_pretrained(tmp_path / "sr_model", components=("unet", "scheduler")).is_upscaler
