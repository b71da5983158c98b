"""``dreambooth-jax evaluate`` end to end on the toy prior with tiny random encoders (DINO ViT,
CLIP, LPIPS): the numbers mean nothing here; the files, shapes, prompt count, determinism with a
seed and the bad-input errors are what is checked. The encoders' parity is in test_eval_encoders.py
and test_lpips.py, the metric formulas in test_eval_metrics.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner
from PIL import Image

from dreambooth_jax.cli import main
from dreambooth_jax.demo import TOY_PRIOR, TOY_SR, TOY_SUBJECT
from dreambooth_jax.errors import ConfigError
from dreambooth_jax.evaluation.paper import EvalConfig, check_config
from dreambooth_jax.models.convert import write_safetensors
from dreambooth_jax.models.lpips import META_NET, META_VERSION, VERSION, checkpoint_shapes


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Folders of a tiny random DINO ViT and CLIPModel (transformers) and an LPIPS alex file."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64, image_size=224, patch_size=32),
                                add_pooling_layer=False)
    vit.save_pretrained(root / "dino", safe_serialization=True)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32), projection_dim=16))
    clip.save_pretrained(root / "clip", safe_serialization=True)
    rng = np.random.default_rng(0)
    tensors = {k: (np.abs if k.startswith("lin") else np.asarray)(rng.normal(0, 0.1, s)).astype(np.float32)
               for k, s in checkpoint_shapes("alex").items()}
    write_safetensors(root / "lpips.safetensors", tensors, metadata={META_NET: "alex", META_VERSION: VERSION})
    return {"dino": str(root / "dino"), "clip": str(root / "clip"), "lpips": str(root / "lpips.safetensors")}


def args(enc, out, **kw):
    base = dict(model=str(TOY_PRIOR), sr_model=str(TOY_SR), instance_dir=str(TOY_SUBJECT), class_noun="box",
                prompts="", num_images=2, class_images=2, steps=2, sr_steps=2, size=32, batch=8, seed=3, out=str(out),
                **enc)
    base.update(kw)
    return [f"--{k.replace('_', '-')}={v}" for k, v in base.items() if v != ""]


def test_evaluate_end_to_end(encoders, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} on the beach\na red [V] [class]\n")
    out = tmp_path / "report"
    # --before with the same model: the same seeds must give the same images (determinism) and numbers
    res = CliRunner().invoke(main, ["evaluate", *args(encoders, out, prompts=prompts, before=str(TOY_PRIOR))])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "metrics.json").read_text())
    assert result["prompts"] == ["a sks box on the beach", "a red sks box"]
    assert result["clip_t_texts"] == ["a box on the beach", "a red box"] and result["class_prompt"] == "a box"
    after, before = result["models"]["fine-tuned"], result["models"]["before (frozen prior)"]
    assert set(after["overall"]) == {"DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"} and len(after["per_prompt"]) == 2
    assert after == before
    assert all(np.isfinite(v) and -1 <= v <= 1 for k, v in after["overall"].items() if k != "DIV")
    assert after["overall"]["DIV"] >= 0 and set(result["real"]) == {"DINO", "CLIP-I"}
    for tag in ("fine-tuned", "before"):
        a = np.asarray(Image.open(out / "images" / tag / "p01" / "01.png"))
        assert a.shape == (128, 128, 3)  # 32 px base -> x4 SR stage
        assert len(list((out / "images" / tag / "class").glob("*.png"))) == 2
        assert Image.open(out / f"contact_sheet_{tag}.png").size == (2 * 128, 2 * 128)  # a row per prompt
    assert np.array_equal(np.asarray(Image.open(out / "images" / "fine-tuned" / "p00" / "00.png")),
                          np.asarray(Image.open(out / "images" / "before" / "p00" / "00.png")))
    md = (out / "metrics.md").read_text()
    assert "paper: Table 1, DreamBooth (Stable Diffusion)" in md and encoders["dino"] in md and "LPIPS" in md
    # the images on disk score the same without the sampler (--images)
    res = CliRunner().invoke(main, ["evaluate", *args(encoders, tmp_path / "again", prompts=prompts, model="",
                                                     sr_model="", images=str(out / "images" / "fine-tuned"))])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["models"]["given images"]
    assert again == after
    # never over an earlier report
    res = CliRunner().invoke(main, ["evaluate", *args(encoders, out, prompts=prompts)])
    assert res.exit_code != 0 and "not empty" in res.output and "Traceback" not in res.output


def test_default_prompts_and_bad_input(encoders, tmp_path):
    cfg = EvalConfig(instance_dir=str(TOY_SUBJECT), class_noun="dog", out=str(tmp_path / "o"), model="m", **encoders)
    assert len(cfg.templates()) == 25 and "wearing a red hat" in cfg.templates()[10]
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "a.png")
    cases = [
        (dict(instance_dir=str(tmp_path / "nope")), "no such folder"),
        (dict(instance_dir=str(one)), "1 photo"),
        (dict(model=""), "either --model"),
        (dict(num_images=1), "--num-images must be >= 2"),
        (dict(prompts=str(tmp_path / "missing.txt")), "no such file"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_config(EvalConfig(**{**cfg.__dict__, **change}))
    # encoders: a missing folder, and a folder of the wrong kind (the CLIP folder given as --dino)
    for change, message in ((dict(dino=str(tmp_path / "nodino")), "--dino"),
                            (dict(dino=encoders["clip"]), "--dino"),
                            (dict(lpips=encoders["dino"]), "--lpips")):
        res = CliRunner().invoke(main, ["evaluate", *args({**encoders, **change}, tmp_path / "bad", prompts="")])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, res.output
