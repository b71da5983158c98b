"""The DINO / CLIP metric encoders and their preprocessing vs transformers (PyTorch): tiny random
checkpoints saved by transformers, real subject photos, and the errors for wrong folders."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image
from safetensors.torch import save_file
from test_data_images import subject_photos

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.evaluation.preprocess import PUBLISHED, load_preprocessor
from dreambooth_jax.models.clip_vision import CLIPConfig, load_clip
from dreambooth_jax.models.vit import load_vit
from dreambooth_jax.testing.reference import max_rel_err

# Largest error relative to the output's scale (max |ref|) between two float32 forwards. Both
# sides round every operation to float32 (unit roundoff u = 2**-24 ~ 6e-8) but sum in different
# orders (XLA's and torch's blocked, vectorised kernels), so each length-K dot product differs by
# rounding noise of ~sqrt(K) u relative to its terms' magnitude (a random walk of K roundings;
# K u is the adversarial worst case, not reached by sums of unrelated products). The longest sums
# here are the 32x32x3 patch convolution (K = 3072: sqrt(K) u ~ 3.3e-6); the ~20 further stages
# (layer norms, K <= 50 matmuls, softmax, GELU, the L2 norm) add ~sqrt(50) u ~ 4e-7 each. The
# stages' errors are independent and add in quadrature, ~3.8e-6 in all (with O(1) activations
# no stage amplifies them: no cancellation, no layer norm of a near-constant input). 1e-5 is ~3x
# that (measured: 2.1e-6 at most, ViT's last_hidden_state), while a real mistake errs by far more
# (measured on the ViT: GELU's tanh variant 1.5e-4, one MLP bias dropped 0.1).
FP32_REL_TOL = 1e-5
SIZE, PATCH = 224, 32  # the metrics' input size; 7x7 patches keep the models tiny
nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(1) activations everywhere: transformers' 0.02-scale init leaves attention nearly uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "embedding" not in name:  # linear and conv kernels: unit-variance outputs
                p.copy_(noise / p[0].numel() ** 0.5)
            else:  # norms, biases, class / position / token embeddings, logit_scale
                p.add_(0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(folder, torch ViTModel): a DINO-like tiny ViT, saved with its pooler (which we skip)."""
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                 image_size=SIZE, patch_size=PATCH)
    model = _randomize(transformers.ViTModel(cfg, add_pooling_layer=True), 0)
    folder = tmp_path_factory.mktemp("vit") / "dino"
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(folder, torch CLIPModel): a tiny CLIPModel saved in shards (with their index)."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=97, eos_token_id=98),
        vision_config=dict(hidden_size=48, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SIZE, patch_size=PATCH),
        projection_dim=24)
    model = _randomize(transformers.CLIPModel(cfg), 1)
    folder = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder, model


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Three real subject photos (square), one cut wide and one cut tall."""
    paths = subject_photos(tmp_path_factory.mktemp("photos"))[:3]
    ims = [Image.open(p).convert("RGB") for p in paths]
    w, h = ims[1].size
    return [ims[0], ims[1].crop((0, h // 5, w, h - h // 4)), ims[2].crop((w // 5, 0, w - w // 3, h))]


def _reference_processor(folder, config: dict):
    folder.mkdir(exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return transformers.AutoImageProcessor.from_pretrained(folder, backend="pil")


@pytest.mark.parametrize("kind, variant", [("vit", "published"), ("clip", "published"), ("clip", "padded")])
def test_preprocessing_equals_transformers_pil_processors(kind, variant, photos, tmp_path):
    config = PUBLISHED[kind]
    images = list(photos)
    if kind == "clip":  # CLIP converts to RGB: grey and transparent images too
        alpha = Image.linear_gradient("L").resize(photos[1].size)
        images += [photos[0].convert("L"), Image.merge("RGBA", (*photos[1].split(), alpha))]
    if variant == "padded":  # resized below the crop size: the zero-padding path, bilinear
        config = dict(config, size={"shortest_edge": 200}, crop_size=[224, 230], resample=2)
    ref = _reference_processor(tmp_path / "proc", config)
    assert type(ref).__name__ == {"vit": "ViTImageProcessorPil", "clip": "CLIPImageProcessorPil"}[kind]
    ours = load_preprocessor(tmp_path / "proc", kind)(images)
    expected = np.stack(ref(images, return_tensors="np").pixel_values)
    assert ours.dtype == np.float32 and ours.shape[-1] == 3
    np.testing.assert_array_equal(nchw(ours), expected)  # same PIL resize, same float32 arithmetic
    if variant == "published":  # no preprocessor_config.json: the published one
        np.testing.assert_array_equal(load_preprocessor(tmp_path / "absent", kind)(images), ours)


def test_vit_cls_embedding_matches_transformers(vit, photos):
    folder, ref_model = vit
    pixels = load_preprocessor(None, "vit")(photos)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(nchw(pixels))).last_hidden_state.numpy()
    model = load_vit(folder)
    hidden = model(jnp.asarray(pixels))
    errs = {"last_hidden_state": max_rel_err(hidden, ref),
            "cls": max_rel_err(model.cls_embedding(jnp.asarray(pixels)), ref[:, 0])}
    print(errs)
    assert all(e <= FP32_REL_TOL for e in errs.values()), errs
    # the same weights under transformers 5's module names (a state_dict saved as is) load alike
    renamed = folder.parent / "renamed"
    renamed.mkdir(exist_ok=True)
    shutil.copy(folder / "config.json", renamed)
    save_file({k: v.contiguous() for k, v in ref_model.state_dict().items()}, renamed / "model.safetensors")
    assert any(k.startswith("layers.0.attention.q_proj") for k in ref_model.state_dict())
    same = jax.tree.map(np.array_equal, nnx.state(load_vit(renamed)), nnx.state(model))
    assert all(jax.tree.leaves(same))


def test_clip_embeddings_match_transformers(clip, photos):
    folder, ref_model = clip
    pixels = load_preprocessor(None, "clip")(photos)
    rng = np.random.RandomState(0)
    ids = rng.randint(2, 97, (3, 16))
    eos = np.array([5, 15, 9])  # the pooled token: the first EOS, then padding
    ids[np.arange(3), eos] = 98
    mask = (np.arange(16)[None] <= eos[:, None]).astype(np.int64)
    ids[mask == 0] = 1
    with torch.no_grad():
        t_ids, t_mask, t_pix = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(nchw(pixels))
        out = ref_model(input_ids=t_ids, attention_mask=t_mask, pixel_values=t_pix)
        img_feat = ref_model.get_image_features(pixel_values=t_pix).pooler_output.numpy()
        txt_feat = ref_model.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output.numpy()
    model = load_clip(folder)
    px, jids, jmask = jnp.asarray(pixels), jnp.asarray(ids), jnp.asarray(mask)
    errs = {"image_embeds": max_rel_err(model.image_embeds(px), out.image_embeds.numpy()),
            "text_embeds": max_rel_err(model.text_embeds(jids, jmask), out.text_embeds.numpy()),
            "image_features": max_rel_err(model.image_embeds(px, normalize=False), img_feat),
            "text_features": max_rel_err(model.text_embeds(jids, jmask, normalize=False), txt_feat),
            "logit_scale": max_rel_err(model.logit_scale[...], ref_model.logit_scale.detach().numpy())}
    print(errs)
    assert all(e <= FP32_REL_TOL for e in errs.values()), errs


def test_legacy_clip_config_parses_as_transformers_does():
    """openai/clip-vit-large-patch14's layout (transformers 4): every generic key written, nulls,
    and *_config_dict keys that transformers rebuilds the sub-configs from (over the defaults:
    eos_token_id 2 becomes 49407 there)."""
    generic = {"architectures": None, "bad_words_ids": None, "chunk_size_feed_forward": 0, "do_sample": False,
               "id2label": {"0": "LABEL_0"}, "is_decoder": False, "torch_dtype": None, "return_dict": True,
               "transformers_version": "4.16.0.dev0", "dropout": 0.0, "attention_dropout": 0.0}
    raw = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPModel"], "model_type": "clip",
           "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "projection_dim": 768,
           "text_config": {**generic, "model_type": "clip_text_model", "bos_token_id": 0, "eos_token_id": 2,
                           "pad_token_id": 1, "hidden_size": 768, "intermediate_size": 3072,
                           "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
           "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                "num_hidden_layers": 12, "projection_dim": 768},
           "vision_config": {**generic, "model_type": "clip_vision_model", "bos_token_id": None, "eos_token_id": None,
                             "hidden_size": 1024, "patch_size": 14, "num_hidden_layers": 24},
           "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                  "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}
    ours = CLIPConfig.from_transformers(raw)
    ref = transformers.CLIPConfig.from_dict(raw)
    assert ours.projection_dim == ref.projection_dim == 768
    for mine, theirs in ((ours.text, ref.text_config), (ours.vision, ref.vision_config)):
        fields = [k for k in mine.__dataclass_fields__ if k != "raw"]
        assert {k: getattr(mine, k) for k in fields} == {k: getattr(theirs, k) for k in fields}
    assert ours.text.eos_token_id == 49407 and ours.vision.patch_size == 14


def _folder_with_config(path, config: dict):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_wrong_folders_are_config_errors(vit, clip, tmp_path):
    vit_dir, clip_dir = vit[0], clip[0]
    unet = _folder_with_config(tmp_path / "unet", {"_class_name": "UNet2DConditionModel", "sample_size": 64})
    (tmp_path / "empty").mkdir()
    cases = [(load_vit, tmp_path / "empty", "does not exist"), (load_clip, tmp_path / "empty", "does not exist"),
             (load_vit, clip_dir, "model_type 'clip'"), (load_clip, vit_dir, "model_type 'vit'"),
             (load_vit, unet, "diffusers UNet2DConditionModel"), (load_clip, unet, "diffusers UNet2DConditionModel")]
    for load, folder, why in cases:
        with pytest.raises(ConfigError, match=why) as e:
            load(folder)
        assert str(folder / "config.json") in str(e.value), e.value
    vit_config = json.loads((vit_dir / "config.json").read_text())
    for key, value in (("qkv_bias", False), ("use_mask_token", True), ("patch_size", [16, 8])):
        bad = _folder_with_config(tmp_path / f"bad_{key}", dict(vit_config, **{key: value}))
        with pytest.raises(ConfigError, match=f"'{key}'"):
            load_vit(bad)


def test_bad_inputs(vit, photos, tmp_path):
    model = load_vit(vit[0])
    with pytest.raises(ValueError, match=f"takes {SIZE}x{SIZE}"):
        model(jnp.zeros((1, 160, 160, 3)))
    clip_proc = tmp_path / "clip_proc"
    clip_proc.mkdir()
    shutil.copy(vit[0] / "config.json", clip_proc)
    (clip_proc / "preprocessor_config.json").write_text(json.dumps(dict(PUBLISHED["clip"])))
    with pytest.raises(ConfigError, match="feature_extractor_type"):
        load_preprocessor(clip_proc, "vit")
    (clip_proc / "preprocessor_config.json").write_text(json.dumps(dict(PUBLISHED["clip"], do_pad=True)))
    with pytest.raises(ConfigError, match="'do_pad'"):
        load_preprocessor(clip_proc, "clip")
    with pytest.raises(ValueError, match="convert"):  # DINO's processor does not convert to RGB, like transformers'
        load_preprocessor(None, "vit")([photos[0].convert("L")])
