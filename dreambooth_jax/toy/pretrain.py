"""Pretraining of the toy prior: a small Stable-Diffusion-family pipeline (VAE, CLIP text
encoder with the real CLIP BPE tokenizer, base UNet at 32 px) and an x4-upscaler-family SR
pipeline (32 -> 128 px), trained from scratch on the toy world by the project's own trainer
(``training.run.train_loop``; the VAE by its own reconstruction loop), written in the diffusers
folder layout and loaded back through ``load_pretrained`` like any real checkpoint.

``scripts/pretrain_toy.py`` runs the stages (each resumable, seeded) and reports CPU time.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dreambooth_jax.toy import world

BASE_SIZE = 32  # base-stage image size (8x8x4 latents)
SR_SIZE = 128  # SR-stage output size (x4)
MAX_TOKENS = 16  # toy captions are short: text encoder positions and tokenizer max length

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 64], layers_per_block=1,
           down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
           act_fn="silu", norm_num_groups=8, sample_size=BASE_SIZE, scaling_factor=1.0,
           mid_block_add_attention=False)
TEXT = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu", layer_norm_eps=1e-5,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=64)
UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
            down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            attention_head_dim=2, cross_attention_dim=64, norm_num_groups=8)
SR_UNET = dict(sample_size=32, in_channels=7, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
               down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
               up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], only_cross_attention=[False, True],
               attention_head_dim=2, use_linear_projection=True, cross_attention_dim=64, norm_num_groups=8,
               num_class_embeds=1000)
SCHEDULER = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1)
SR_SCHEDULER = dict(_class_name="DDIMScheduler", beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                    num_train_timesteps=1000, prediction_type="v_prediction", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)
SR_LOW_RES_SCHEDULER = dict(_class_name="DDPMScheduler", beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                            num_train_timesteps=1000, variance_type="fixed_small", clip_sample=False)
MAX_NOISE_LEVEL = 350


def build(kind: str, config: dict, seed: int):
    """A freshly initialised model of ``kind`` (unet | vae | text_encoder) from a config dict."""
    from dreambooth_jax.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
    from dreambooth_jax.models.clip import CLIPTextConfig
    from dreambooth_jax.models.unet import UNetConfig
    from dreambooth_jax.models.vae import VAEConfig

    rngs = nnx.Rngs(seed)
    if kind == "unet":
        return UNet2DConditionModel(UNetConfig.from_diffusers(config), rngs=rngs)
    if kind == "vae":
        return AutoencoderKL(VAEConfig.from_diffusers(config), rngs=rngs)
    if kind == "text_encoder":
        return CLIPTextModel(CLIPTextConfig.from_transformers(config), rngs=rngs)
    raise ValueError(kind)


def tokenizer_files(folder: Path) -> None:
    """The shipped CLIP BPE vocabulary, with the toy model's maximum length."""
    src = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, folder / name)
    cfg = dict(model_max_length=MAX_TOKENS, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
               pad_token="<|endoftext|>", unk_token="<|endoftext|>", do_lower_case=True,
               tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}, indent=2) + "\n")


def write_pipeline(folder: Path, *, unet, vae, text_encoder, upscaler: bool, dtype=np.float16) -> Path:
    """A complete diffusers pipeline folder (StableDiffusionPipeline or StableDiffusionUpscalePipeline)."""
    from dreambooth_jax.models.export import save_component

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_component(unet, folder / "unet", overwrite=True, dtype=dtype)
    save_component(vae, folder / "vae", overwrite=True, dtype=dtype)
    save_component(text_encoder, folder / "text_encoder", overwrite=True, dtype=dtype)
    tokenizer_files(folder / "tokenizer")
    sched = SR_SCHEDULER if upscaler else SCHEDULER
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    index = {"_diffusers_version": "0.42.1", "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}
    if upscaler:
        index.update(_class_name="StableDiffusionUpscalePipeline", max_noise_level=MAX_NOISE_LEVEL,
                     low_res_scheduler=["diffusers", "DDPMScheduler"])
        (folder / "low_res_scheduler").mkdir(exist_ok=True)
        (folder / "low_res_scheduler" / "scheduler_config.json").write_text(
            json.dumps(SR_LOW_RES_SCHEDULER, indent=2) + "\n")
    else:
        index.update(_class_name="StableDiffusionPipeline", safety_checker=[None, None],
                     feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# ----------------------------------------------------------------------------- data
def to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 127.5 - 1.0


def render_dataset(n: int, seed: int, size: int) -> tuple[np.ndarray, list[str]]:
    images, _, captions = world.sample_dataset(n, seed, size)
    return images, captions


# ----------------------------------------------------------------------------- VAE
def train_vae(out_dir: Path, *, steps: int = 4000, batch: int = 16, lr: float = 1.5e-3, kl_weight: float = 1e-6,
              seed: int = 0, n_images: int = 6000, log: Callable = print):
    """Reconstruction (L1 + L2) with a small KL term, on 32 px photos and 32 px crops of 128 px
    photos (so one VAE serves both stages: it is fully convolutional), of the toy world and of
    generic random patterns (so it encodes colors and patterns the world lacks). Resumable."""
    from tqdm.auto import tqdm

    from dreambooth_jax.training.checkpoint import Checkpointer, abstract_like

    toy_hi, _ = render_dataset(n_images // 2, seed + 100, SR_SIZE)
    toy_lo = world.downsample(np.concatenate([toy_hi, render_dataset(n_images // 2, seed + 101, SR_SIZE)[0]]), BASE_SIZE)
    pat_hi = world.random_patterns(n_images // 4, seed + 102, SR_SIZE)
    # 32 px images, and 32 px crops of 128 px ones (the SR stage's latents); toy photos and generic patterns.
    small = to_float(np.concatenate([toy_lo, world.downsample(pat_hi, BASE_SIZE)]))
    hi = to_float(np.concatenate([toy_hi, pat_hi]))

    def batch_at(step):
        r = np.random.default_rng((seed, step))
        half = batch // 2
        a = small[r.integers(len(small), size=half)]
        idx = r.integers(len(hi), size=batch - half)
        ys, xs = r.integers(0, SR_SIZE - BASE_SIZE + 1, size=(2, batch - half))
        b = np.stack([hi[i, y:y + BASE_SIZE, x:x + BASE_SIZE] for i, y, x in zip(idx, ys, xs)])
        x = np.concatenate([a, b])
        flip = r.random(len(x)) < 0.5
        x[flip] = x[flip, :, ::-1]
        return x

    vae = build("vae", VAE, seed)
    graphdef, params = nnx.split(vae, nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0, lr, min(100, steps // 2), max(steps, 2), lr * 0.05), weight_decay=0.0))
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def loss_fn(p, x, key):
        m = nnx.merge(graphdef, p)
        mean, logvar = m.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        y = m.decode(z)
        rec = jnp.abs(y - x).mean() + jnp.square(y - x).mean()
        kl = 0.5 * jnp.mean(jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
        return rec + kl_weight * kl, (rec, kl)

    @jax.jit
    def step_fn(state, x):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        (loss, (rec, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], x, key)
        upd, opt = tx.update(g, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], upd), "opt": opt, "step": state["step"] + 1}, rec, kl

    ckpt = Checkpointer(out_dir / "checkpoints", keep=1)
    start = 0
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_like(state))
        start = int(meta["step"])
        log(f"vae: resumed from step {start}")
    bar = tqdm(total=steps, initial=start, desc="vae", unit="step")
    try:
        for step in range(start, steps):
            state, rec, kl = step_fn(state, batch_at(step))
            if (step + 1) % 50 == 0:
                bar.set_postfix(rec=f"{float(rec):.4f}", kl=f"{float(kl):.1f}")
            if (step + 1) % 500 == 0 or step + 1 == steps:
                ckpt.save(step + 1, state, {"step": step + 1})
            bar.update(1)
    finally:
        bar.close()
        ckpt.close()
    vae = nnx.merge(graphdef, jax.device_get(state["params"]))
    # SD's recipe: scale latents to unit variance (scaling_factor = 1 / std of the latents).
    mean, _ = jax.jit(lambda x: vae.encode(x))(small[:512])
    std = float(np.std(np.asarray(mean)))
    factor = round(1.0 / std, 5)
    vae.config = dataclasses.replace(vae.config, scaling_factor=factor, raw=dict(vae.config.raw, scaling_factor=factor))
    log(f"vae: latent std {std:.4f} -> scaling_factor {1.0 / std:.5f}; final rec loss {float(rec):.4f}")
    return vae


# ----------------------------------------------------------------------------- diffusion stages
def _train_config(**kw):
    from dreambooth_jax.training.config import TrainConfig

    base = dict(with_prior_preservation=False, lr_schedule="cosine", lr_warmup_steps=300, weight_decay=0.0,
                checkpoint_every=1000, keep_checkpoints=1, log_every=100, validation_prompts=[])
    return TrainConfig(**(base | kw))


def _caption_ids(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the captions and of the empty prompt (classifier-free guidance's unconditional)."""
    from dreambooth_jax.models.loading import default_tokenizer, tokenize

    tok = default_tokenizer()
    return tokenize(tok, captions, MAX_TOKENS), tokenize(tok, [""], MAX_TOKENS)[0]


def _drop_captions(ids: np.ndarray, empty: np.ndarray, idx: np.ndarray, r: np.random.Generator, p: float):
    """ids[idx] with a fraction ``p`` replaced by the empty prompt (so the model learns both)."""
    out = ids[idx].copy()
    out[r.random(len(idx)) < p] = empty
    return out


def train_base(out_dir: Path, vae, images: np.ndarray, captions: list[str], *, steps: int = 15000,
               batch: int = 32, lr: float = 1e-3, caption_dropout: float = 0.1, seed: int = 0,
               log: Callable = print):
    """The base UNet and the CLIP text encoder, jointly from scratch (the text encoder is trained
    here because no pretrained CLIP exists offline; "sks" never occurs in the captions, so its
    embedding stays the rare, untrained token the paper relies on). EMA weights are returned."""
    from dreambooth_jax.diffusion.schedules import schedule_from_config
    from dreambooth_jax.training.run import encode_images, train_loop
    from dreambooth_jax.training.step import StepConfig

    ids, empty = _caption_ids(captions)
    mean, logvar = encode_images(vae, to_float(images), batch=256)
    log(f"base: {len(images)} photos encoded to latents {mean.shape[1:]}")

    def batch_fn(step):
        r = np.random.default_rng((seed, 7, step))
        idx = r.integers(len(ids), size=batch)
        return dict(latent_mean=mean[idx], latent_logvar=logvar[idx], is_class=np.zeros(batch, bool),
                    input_ids=_drop_captions(ids, empty, idx, r, caption_dropout))

    cfg = _train_config(train_batch_size=batch, learning_rate=lr, max_train_steps=steps, seed=seed)
    step_cfg = StepConfig(prior_loss_weight=0.0, min_snr_gamma=5.0, ema_decay=0.999,
                          latent_scale=vae.config.scaling_factor)
    models = {"unet": build("unet", UNET, seed + 1), "text_encoder": build("text_encoder", TEXT, seed + 2)}
    trained, history = train_loop(models, schedule_from_config(SCHEDULER), batch_fn, cfg, step_cfg, lr=lr,
                                  steps=steps, out_dir=out_dir, log=log)
    return trained["unet"], trained["text_encoder"], history


def train_sr(out_dir: Path, vae, images: np.ndarray, captions: list[str], *, steps: int = 5000, batch: int = 32,
             crop: int = 8, lr: float = 1e-3, caption_dropout: float = 0.1, seed: int = 0, min_snr_gamma=None,
             init: dict | None = None, log: Callable = print):
    """The x4-upscaler-style SR UNet (and its own text encoder, as the real upscaler has its own)
    on (32 px, 128 px) pairs: random aligned crops of ``crop`` latents (the low-res image has the
    latents' size), noise augmentation level drawn uniformly in [0, MAX_NOISE_LEVEL] per example.
    ``init``: models to continue from (a second phase on larger crops)."""
    from dreambooth_jax.diffusion.schedules import schedule_from_config
    from dreambooth_jax.training.run import encode_images, train_loop
    from dreambooth_jax.training.step import StepConfig

    ids, empty = _caption_ids(captions)
    low = to_float(world.downsample(images, SR_SIZE // 4))
    mean, logvar = encode_images(vae, to_float(images), batch=32)
    log(f"sr: {len(images)} pairs, latents {mean.shape[1:]}, low-res {low.shape[1:]}")
    h = mean.shape[1]

    def batch_fn(step):
        r = np.random.default_rng((seed, 11, step))
        idx = r.integers(len(ids), size=batch)
        ys, xs = r.integers(0, h - crop + 1, size=(2, batch))
        cut = lambda a: np.stack([a[i, y:y + crop, x:x + crop] for i, y, x in zip(idx, ys, xs)])  # noqa: E731
        return dict(latent_mean=cut(mean), latent_logvar=cut(logvar), low_res=cut(low),
                    is_class=np.zeros(batch, bool), input_ids=_drop_captions(ids, empty, idx, r, caption_dropout))

    cfg = _train_config(train_batch_size=batch, learning_rate=lr, max_train_steps=steps, seed=seed)
    step_cfg = StepConfig(prior_loss_weight=0.0, ema_decay=0.999, sr_noise_level=MAX_NOISE_LEVEL,
                          sr_noise_random=True, latent_scale=vae.config.scaling_factor, min_snr_gamma=min_snr_gamma)
    models = init or {"unet": build("unet", SR_UNET, seed + 3), "text_encoder": build("text_encoder", TEXT, seed + 4)}
    trained, history = train_loop(models, schedule_from_config(SR_SCHEDULER), batch_fn, cfg, step_cfg, lr=lr,
                                  steps=steps, out_dir=out_dir, low_res_schedule=schedule_from_config(SR_LOW_RES_SCHEDULER),
                                  log=log)
    return trained["unet"], trained["text_encoder"], history
