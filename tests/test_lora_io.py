"""LoRA files: ours load in diffusers (diffusers and kohya formats) and compute what our adapted models
compute; read + apply round trips; other layouts; clear errors; ``sample --lora``."""

from __future__ import annotations

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flax import nnx

from cli_checks import one_line_error
from dreambooth_jax.cli import main
from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models import load_pretrained, tokenize
from dreambooth_jax.models.convert import read_safetensors, write_safetensors
from dreambooth_jax.models.lora import (UNET_ATTENTION, UNET_FEED_FORWARD, LoRASpec, adaptable_modules, add_lora,
                                        lora_modules, merge_lora, strip_lora)
from dreambooth_jax.models.lora_io import apply_lora, read_lora, save_lora
from dreambooth_jax.testing.reference import max_rel_err

# Our float32 outputs vs diffusers' match to ~1e-6 without LoRA (test_model_parity bounds them by 1e-4).
# With a LoRA the two sides also add the delta differently: we compute scale * (x @ down @ up) on a
# separate path (unmerged), peft computes B'(A x) with the scale folded into B' = fl(scale * B) in the
# file; each ordering rounds once more per product (~1e-7 relative in float32 per layer) and the
# differences add up over the ~50 adapted layers of a tiny UNet (measured: <= 3e-6), far below 1e-4.
# The LoRA itself changes the outputs by ~100% (checked > 1e-2), so a dropped or mis-scaled layer fails.
TOL = 1e-4
PROMPTS = ["a photo of sks dog", "a red cup"]
nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def quick_add_lora(model, spec: LoRASpec, seed: int, component: str = "unet", up_std: float = 0.1) -> None:
    """``add_lora``, then random ``down`` (std 1/rank, as its init) and nonzero random ``up``."""
    names = add_lora(model, spec, seed=seed, component=component)
    rng = np.random.RandomState(seed)
    adapters = lora_modules(model)
    for name in names:
        lora = adapters[name]
        lora.down[...] = jnp.asarray(rng.randn(*lora.down.shape).astype(np.float32) / lora.rank)
        lora.up[...] = jnp.asarray(rng.randn(*lora.up.shape).astype(np.float32) * up_std)


def add_adapters(pipe, seed: int = 0, alpha_rest: float = 6.0):
    """Adapters on every UNet linear/conv (attention + FF: rank 4, alpha 6; the rest: rank 2, alpha
    ``alpha_rest``) and on every text-encoder linear (rank 4, alpha 6).

    One alpha for all layers by default: diffusers' kohya converter names the alphas of attention
    layers wrongly (``_get_alpha_name`` splits on '.lora.', which its converted attention-processor
    names lack), so with mixed alphas those layers fall back to the most common one in diffusers.
    Mixed alphas are tested with our own reader (test_read_apply_round_trip_equals_merge)."""
    unet = pipe.unet
    quick_add_lora(unet, LoRASpec(rank=4, alpha=6.0, targets=UNET_ATTENTION + UNET_FEED_FORWARD), seed)
    rest = tuple(n for n, m in adaptable_modules(unet).items() if m.lora is None)
    quick_add_lora(unet, LoRASpec(rank=2, alpha=alpha_rest, targets=rest), seed + 1)
    quick_add_lora(pipe.text_encoder, LoRASpec(rank=4, alpha=6.0, targets=("*",)), seed + 2, "text_encoder")
    return pipe


def inputs(name: str, cin: int):
    rng = np.random.RandomState(1)
    return dict(x=rng.randn(2, cin, 16, 16).astype(np.float32), t=np.array([3, 777]),
                ctx=rng.randn(2, 7, 32).astype(np.float32), labels=np.array([20, 350]) if name == "upscaler" else None)


def run_unet(unet, r):
    graphdef, state = nnx.split(unet)  # jitted: the eager forward is far slower than one compile
    fn = jax.jit(lambda s, x, t, ctx, labels: nnx.merge(graphdef, s)(x, t, ctx, class_labels=labels))
    return nchw(fn(state, nhwc(r["x"]), jnp.asarray(r["t"]), jnp.asarray(r["ctx"]), r["labels"]))


def run_text(te, ids):
    graphdef, state = nnx.split(te)
    return np.asarray(jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)[0])(state, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def adapted(pipeline_dirs):
    """{name: (pipeline with adapters, inputs, our outputs)}: one compile per family's adapted models."""
    cache = {}

    def get(name):
        if name not in cache:
            pipe = add_adapters(load_pretrained(pipeline_dirs(name)))
            r = inputs(name, pipe.unet.conv_in.kernel.shape[2])
            r["ids"] = tokenize(pipe.tokenizer, PROMPTS)
            ours = dict(eps=run_unet(pipe.unet, r), hidden=run_text(pipe.text_encoder, r["ids"]))
            cache[name] = (pipe, r, ours)
        return cache[name]

    return get


def torch_outputs(tp, r):
    with torch.no_grad():
        hidden = tp.text_encoder(torch.from_numpy(r["ids"]).long()).last_hidden_state.numpy()
        labels = None if r["labels"] is None else torch.from_numpy(r["labels"])
        eps = tp.unet(torch.from_numpy(r["x"]), torch.from_numpy(r["t"]), torch.from_numpy(r["ctx"]),
                      class_labels=labels).sample.numpy()
    return dict(eps=eps, hidden=hidden)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
@pytest.mark.parametrize("name", ["sd1", "sd2", "upscaler"])
def test_our_lora_file_loads_in_diffusers(name, fmt, pipeline_dirs, adapted, tmp_path):
    """Save ours, load it with diffusers' ``load_lora_weights`` (peft), compare UNet and text encoder
    (kohya: diffusers converts the file to peft itself)."""
    from diffusers import DiffusionPipeline

    pipe, r, ours = adapted(name)
    f = save_lora(tmp_path / f"lora_{fmt}.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, fmt)
    tp = DiffusionPipeline.from_pretrained(str(pipeline_dirs(name)))  # a fresh one: load_lora_weights changes it
    base = torch_outputs(tp, r)
    tp.load_lora_weights(str(tmp_path), weight_name=f.name)
    theirs = torch_outputs(tp, r)
    print(name, fmt, {k: (max_rel_err(ours[k], theirs[k]), max_rel_err(base[k], theirs[k])) for k in ours})
    for k in ("eps", "hidden"):
        assert max_rel_err(ours[k], theirs[k]) <= TOL, (k, max_rel_err(ours[k], theirs[k]))
        assert max_rel_err(base[k], theirs[k]) > 1e-2, f"the LoRA barely changes {k}: the test would not see errors"
    if fmt == "diffusers":  # also right for a loader that ignores the metadata (alpha = rank: scale folded)
        write_safetensors(tmp_path / "no_meta.safetensors", dict(read_safetensors(f)))
        tp.unload_lora_weights()
        tp.load_lora_weights(str(tmp_path), weight_name="no_meta.safetensors")
        assert max_rel_err(ours["eps"], torch_outputs(tp, r)["eps"]) <= TOL
        meta = json.loads(read_safetensors(f).metadata["lora_adapter_metadata"])
        ranks = collections.Counter(m.rank for m in lora_modules(pipe.unet).values())
        common = ranks.most_common(1)[0][0]
        assert meta["unet.r"] == meta["unet.lora_alpha"] == common  # scale folded into lora_B: alpha = r
        assert meta["unet.rank_pattern"] == meta["unet.alpha_pattern"] and len(meta["unet.rank_pattern"]) == \
            sum(n for k, n in ranks.items() if k != common)
        assert meta["text_encoder.r"] == meta["text_encoder.lora_alpha"] == 4


def test_read_apply_round_trip_equals_merge(pipeline_dirs, tmp_path):
    """read_lora + apply_lora of our files == merge_lora of the adapted model (alphas 6 and 1)."""
    pipe = add_adapters(load_pretrained(pipeline_dirs("sd1")), seed=3, alpha_rest=1.0)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    for fmt in ("diffusers", "kohya"):
        f = save_lora(tmp_path / f"{fmt}.safetensors", models, fmt)
        adapters = read_lora(f)
        assert set(adapters) == {"unet", "text_encoder"}
        for component, model in models.items():
            merged = nnx.state(merge_lora(model, 0.5), nnx.Param)
            applied = nnx.state(apply_lora(strip_lora(model), adapters[component], 0.5, source=f,
                                           component=component), nnx.Param)
            for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(applied)):
                if fmt == "kohya":  # the same numbers in the same order: bit-identical
                    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
                else:  # scale folded into lora_B first: one more rounding, ~1e-7 relative
                    assert max_rel_err(b, a) <= 1e-6
    # several files, one after another: two halves make the whole
    once = apply_lora(strip_lora(pipe.unet), adapters["unet"], 1.0)
    twice = apply_lora(apply_lora(strip_lora(pipe.unet), adapters["unet"], 0.5), adapters["unet"], 0.5)
    for a, b in zip(jax.tree.leaves(nnx.state(once, nnx.Param)), jax.tree.leaves(nnx.state(twice, nnx.Param))):
        assert max_rel_err(b, a) <= 1e-6
    assert lora_modules(pipe.unet), "apply_lora must not change its input"


def test_other_layouts_read_the_same(adapted, tmp_path):
    """peft (``base_model.model.`` + adapter_config.json), old diffusers attention processors, no prefix."""
    pipe, _, _ = adapted("sd1")
    f = save_lora(tmp_path / "d.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    ref = read_lora(f)
    tensors = dict(read_safetensors(f))
    # peft: lora_B unscaled by alpha / r from adapter_config.json (alpha 6, and 5 by alpha_pattern for rank 2)
    (tmp_path / "peft").mkdir()
    rank2 = {n for n, m in lora_modules(pipe.unet).items() if m.rank == 2}
    peft = {}
    for k, v in tensors.items():
        if k.startswith("unet."):
            name = k.removeprefix("unet.").rsplit(".lora_", 1)[0]
            scale = 5.0 / 2 if name in rank2 else 6.0 / 4
            peft["base_model.model." + k.removeprefix("unet.")] = v / np.float32(scale) if ".lora_B." in k else v
    write_safetensors(tmp_path / "peft" / "adapter_model.safetensors", peft)
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 6.0, "alpha_pattern": {n: 5.0 for n in rank2}, "rank_pattern": {n: 2 for n in rank2}}))
    got = read_lora(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(got) == {"unet"} and set(got["unet"]) == set(ref["unet"])
    delta = lambda w: w.scale * np.einsum("...ir,ro->...io", w.down, w.up.reshape(w.up.shape[-2:]))
    for n, w in got["unet"].items():
        np.testing.assert_allclose(delta(w), delta(ref["unet"][n]), rtol=1e-5, atol=1e-7)
    # one model's file as diffusers' ModelMixin.save_lora_adapter writes it: no prefix, the config as metadata
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    write_safetensors(tmp_path / "model.safetensors", {k.removeprefix("base_model.model."): v for k, v in peft.items()},
                      {"lora_adapter_metadata": json.dumps(config)})
    got = read_lora(tmp_path / "model.safetensors")
    for n, w in got["unet"].items():
        np.testing.assert_allclose(delta(w), delta(ref["unet"][n]), rtol=1e-5, atol=1e-7)
    # old attention processors (UNet) and the text encoder's old names; no component prefix = UNet
    old = {}
    for k, v in tensors.items():
        k = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        for p in ("to_q", "to_k", "to_v"):
            k = k.replace(f".{p}.lora.", f".processor.{p}_lora.")
        k = k.replace(".to_out.0.lora.", ".processor.to_out_lora.")
        for p, q in (("q_proj", "to_q"), ("k_proj", "to_k"), ("v_proj", "to_v"), ("out_proj", "to_out")):
            k = k.replace(f".self_attn.{p}.lora.", f".self_attn.{q}_lora.")
        old[k.removeprefix("unet.")] = v
    write_safetensors(tmp_path / "old.safetensors", old)
    got = read_lora(tmp_path / "old.safetensors")
    assert {c: set(w) for c, w in got.items()} == {c: set(w) for c, w in ref.items()}
    n = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    np.testing.assert_array_equal(got["unet"][n].up, ref["unet"][n].up)
    # kohya names resolve against module names when given
    k = save_lora(tmp_path / "k.safetensors", {"unet": pipe.unet}, "kohya")
    names = {"unet": adaptable_modules(pipe.unet)}
    assert set(read_lora(k, names)["unet"]) == set(ref["unet"])
    assert "down_blocks_0_attentions_0_proj_in" in read_lora(k)["unet"]


# ------------------------------------------------------------------ bad input


def test_errors_name_the_key_and_shapes(adapted, pipeline_dirs, tmp_path):
    pipe, _, _ = adapted("sd1")
    f = save_lora(tmp_path / "d.safetensors", {"unet": pipe.unet})
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_lora(f, {"unet": pipe.unet})
    save_lora(f, {"unet": pipe.unet}, "kohya", overwrite=True)
    with pytest.raises(ConfigError, match="no LoRA adapters"):
        save_lora(tmp_path / "none.safetensors", {"unet": strip_lora(pipe.unet)})
    tensors = dict(read_safetensors(f))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight"
    # shape mismatch: a LoRA made for a model with another width
    bad = dict(tensors, **{key: np.zeros((tensors[key].shape[0], 48), np.float32)})
    write_safetensors(tmp_path / "shape.safetensors", bad)
    with pytest.raises(CheckpointError) as e:
        apply_lora(strip_lora(pipe.unet), read_lora(tmp_path / "shape.safetensors")["unet"], source="shape.safetensors",
                   component="unet")
    msg = str(e.value)
    assert key in msg and f"({tensors[key].shape[0]}, 48)" in msg and f"({tensors[key].shape[0]}, 32)" in msg, msg
    assert "shape.safetensors" in msg and "\n" not in msg
    # a key matching no layer
    stem = key.split(".")[0]
    renamed = {k.replace(stem, stem.replace("to_k", "to_x")): v for k, v in tensors.items()}
    write_safetensors(tmp_path / "name.safetensors", renamed)
    with pytest.raises(CheckpointError) as e:
        apply_lora(pipe.unet, read_lora(tmp_path / "name.safetensors")["unet"], source="name.safetensors")
    assert stem.replace("to_k", "to_x") in str(e.value) and "matches no" in str(e.value)
    # up without down
    write_safetensors(tmp_path / "half.safetensors", {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(CheckpointError, match="no matching down weight"):
        read_lora(tmp_path / "half.safetensors")
    # not a LoRA file: a model's weights
    weights = pipeline_dirs("sd1") / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError) as e:
        read_lora(weights)
    assert str(weights) in str(e.value) and "not a LoRA file" in str(e.value) and "unknown key '" in str(e.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------ sample --lora


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "xla-cache"
    monkeypatch.setenv("DREAMBOOTH_JAX_CACHE", str(d))
    return d


def _sample(model, out, *extra):
    args = ["sample", "--model", str(model), "--prompt", "a photo of sks dog", "--steps", "2", "--height", "32",
            "--width", "32", "--seed", "3", "--out", str(out), *extra]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    from PIL import Image

    return np.asarray(Image.open(out / "base_000.png")), r.output


def test_sample_with_lora_equals_merged_model(pipeline_dirs, tmp_path, cache_dir):
    """--lora FILE samples exactly what the merged model (exported as a pipeline) samples."""
    from dreambooth_jax.models import export_pipeline

    src = pipeline_dirs("sd1")
    pipe = load_pretrained(src)
    for component in ("unet", "text_encoder"):  # scale alpha/rank = 2: folding it into lora_B is exact
        quick_add_lora(getattr(pipe, component), LoRASpec(rank=2, alpha=4.0, targets=("*",)), 5, component, 0.05)
    f = save_lora(tmp_path / "lora.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    merged = export_pipeline(src, tmp_path / "merged", {"unet": merge_lora(pipe.unet),
                                                       "text_encoder": merge_lora(pipe.text_encoder)})
    plain, _ = _sample(src, tmp_path / "plain")
    with_lora, log = _sample(src, tmp_path / "lora", "--lora", str(f))
    assert "applying LoRA" in log
    from_merged, _ = _sample(merged, tmp_path / "m")
    assert not np.array_equal(plain, with_lora)
    np.testing.assert_array_equal(with_lora, from_merged)
    settings = json.loads((tmp_path / "lora" / "settings.json").read_text())
    assert settings["lora"] == [str(f)] and settings["lora_scale"] == []


def test_sample_lora_options_checked_before_loading(pipeline_dirs, tmp_path, cache_dir, no_model_load):
    base = ["sample", "--model", str(pipeline_dirs("sd1")), "--prompt", "x", "--out", str(tmp_path / "o")]
    lora = tmp_path / "l.safetensors"
    write_safetensors(lora, {"unet.conv_in.lora_A.weight": np.zeros((1, 4, 3, 3), np.float32),
                             "unet.conv_in.lora_B.weight": np.zeros((32, 1, 1, 1), np.float32)})
    cases = [
        (["--lora", str(tmp_path / "nope.safetensors")], ["--lora", "nope.safetensors", "no such file"]),
        (["--lora", str(tmp_path)], ["--lora", "is a folder"]),
        (["--lora", str(lora), "--lora-scale", "1", "--lora-scale", "2", "--lora", str(lora), "--lora",
          str(lora)], ["--lora-scale", "once per --lora", "2 scales for 3 files"]),
        (["--lora-scale", "0.5"], ["--lora-scale", "without --lora"]),
        (["--lora", str(lora), "--lora-scale", "nan"], ["--lora-scale", "nan"]),
        (["--sr-lora", str(lora)], ["--sr-lora", "--sr-model"]),
        (["--lora", str(pipeline_dirs("sd1") / "vae" / "diffusion_pytorch_model.safetensors")],
         ["--lora", "not a LoRA file", "diffusion_pytorch_model.safetensors"]),
    ]
    for extra, fragments in cases:
        msg = one_line_error(CliRunner().invoke(main, base + extra))
        assert all(s in msg for s in fragments), (extra, msg)
    assert not (tmp_path / "o").exists()
