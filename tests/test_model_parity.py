"""Our Flax models vs diffusers/transformers on the same tiny checkpoints (fp32 and bf16)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dreambooth_jax.models import ModelOptions, load_pretrained, tokenize
from dreambooth_jax.testing.reference import max_rel_err

FP32_TOL = 1e-4  # max abs error relative to the output's scale
BF16_TOL = 5e-2  # bf16 matmuls/convs (8-bit mantissa), fp32 norms and softmax
PROMPTS = ["a photo of sks dog", "a red cup on the beach at night"]

nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)
nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _reference_outputs(tp, name):
    ids = tokenize(tp.tokenizer, PROMPTS)
    rng = np.random.RandomState(0)
    cin = tp.unet.config.in_channels
    x = rng.randn(2, cin, 16, 16).astype(np.float32)
    t = np.array([3, 777])
    labels = np.array([20, 350]) if name == "upscaler" else None
    img = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        te = tp.text_encoder(torch.from_numpy(ids).long())
        ctx = te.last_hidden_state
        eps = tp.unet(torch.from_numpy(x), torch.from_numpy(t), ctx,
                      class_labels=None if labels is None else torch.from_numpy(labels)).sample
        post = tp.vae.encode(torch.from_numpy(img)).latent_dist
        dec = tp.vae.decode(post.mean).sample
    return dict(ids=ids, x=x, t=t, labels=labels, img=img, hidden=te.last_hidden_state.numpy(),
                pooled=te.pooler_output.numpy(), eps=eps.numpy(), mean=post.mean.numpy(),
                logvar=post.logvar.numpy(), dec=dec.numpy())


@pytest.fixture(scope="module")
def reference(torch_pipelines):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _reference_outputs(torch_pipelines(name), name)
        return cache[name]

    return get


def _ours(pipe, r):
    hidden, pooled = pipe.text_encoder(jnp.asarray(r["ids"]))
    eps = pipe.unet(nhwc(r["x"]), jnp.asarray(r["t"]), jnp.asarray(r["hidden"]), class_labels=r["labels"])
    mean, logvar = pipe.vae.encode(nhwc(r["img"]))
    dec = pipe.vae.decode(nhwc(r["mean"]))
    return dict(hidden=hidden, pooled=pooled, eps=nchw(eps), mean=nchw(mean), logvar=nchw(logvar), dec=nchw(dec))


@pytest.mark.parametrize("name", ["sd1", "sd2", "upscaler"])
def test_fp32_parity(name, pipeline_dirs, reference):
    r = reference(name)
    pipe = load_pretrained(pipeline_dirs(name))
    ours = _ours(pipe, r)
    errs = {k: max_rel_err(ours[k], r[k]) for k in ours}
    print(name, errs)
    assert all(e <= FP32_TOL for e in errs.values()), errs


@pytest.mark.parametrize("name", ["sd1", "upscaler"])
def test_bf16_compute_stays_close(name, pipeline_dirs, reference):
    r = reference(name)
    pipe = load_pretrained(pipeline_dirs(name), ModelOptions(dtype=jnp.bfloat16))
    ours = _ours(pipe, r)
    assert pipe.unet(nhwc(r["x"]), jnp.asarray(r["t"]), jnp.asarray(r["hidden"]),
                     class_labels=r["labels"]).dtype == jnp.bfloat16
    errs = {k: max_rel_err(ours[k], r[k]) for k in ours}
    print(name, errs)
    assert all(e <= BF16_TOL for e in errs.values()), errs
    assert all(np.isfinite(np.asarray(v, np.float32)).all() for v in ours.values())


def test_configs_of_real_checkpoints_parse():
    """Config files as they ship in the SD 1.5, SD 2.1 and x4-upscaler folders."""
    from dreambooth_jax.models import CLIPTextConfig, UNetConfig, VAEConfig

    sd15_text = {"_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
                 "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
                 "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
                 "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                 "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
                 "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
                 "transformers_version": "4.22.0.dev0", "vocab_size": 49408}
    assert CLIPTextConfig.from_transformers(sd15_text).eos_token_id == 2
    sd21_unet = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
                 "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
                 "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
                 "cross_attention_dim": 1024,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True,
                 "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
                 "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
                 "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
                 "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 "upcast_attention": True, "use_linear_projection": True}
    cfg = UNetConfig.from_diffusers(sd21_unet)
    assert cfg.heads == (5, 10, 20, 20) and cfg.use_linear_projection
    upscaler_unet = dict(sd21_unet, attention_head_dim=8, block_out_channels=[256, 512, 512, 1024],
                         down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
                         up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], in_channels=7,
                         num_class_embeds=1000, only_cross_attention=[True, True, True, False],
                         upcast_attention=False, class_embed_type=None, sample_size=128)
    assert UNetConfig.from_diffusers(upscaler_unet).only_cross_attention == (True, True, True, False)
    upscaler_vae = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.8.0", "act_fn": "silu",
                    "block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3,
                    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "out_channels": 3,
                    "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 3, "scaling_factor": 0.08333}
    vcfg = VAEConfig.from_diffusers(upscaler_vae)
    assert vcfg.downscale == 4 and vcfg.scaling_factor == 0.08333


def test_remat_gives_the_same_gradients(pipeline_dirs):
    import jax
    from flax import nnx

    rng = np.random.RandomState(0)
    x, ctx = jnp.asarray(rng.randn(1, 16, 16, 4), jnp.float32), jnp.asarray(rng.randn(1, 77, 32), jnp.float32)
    grads = []
    for opts in (ModelOptions(), ModelOptions(remat=True)):
        g, s = nnx.split(load_pretrained(pipeline_dirs("sd2"), opts, components=("unet",)).unet)
        grads.append(jax.jit(jax.grad(lambda s: nnx.merge(g, s)(x, 10, ctx).sum()))(s))
    # Recomputation lets XLA fuse differently: equal up to float32 rounding (some tensors'
    # gradients are near zero by cancellation, so compare to the largest gradient).
    a = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(grads[0])])
    b = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(grads[1])])
    assert max_rel_err(b, a) <= 1e-5, max_rel_err(b, a)
