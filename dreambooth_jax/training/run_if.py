"""DreamBooth on DeepFloyd IF, the open Imagen-style cascade the paper's main results correspond to.

``model`` is an IF stage I folder (T5-XXL encoder, 64 px pixel-space UNet), ``sr_model`` an
optional IF stage II folder (64 -> 256 px). The run, as :func:`dreambooth_jax.training.run.run`
for Stable Diffusion, with these differences:

- Prompts are encoded by stage I's T5 ONCE, before any UNet is loaded: the instance and class
  prompts, the empty negative prompt, the validation prompts. The embeddings are cached in
  ``output_dir/t5_embeddings.npz`` (a resumed run never loads the 4.7 B encoder again) and the
  encoder is dropped: it is never in the train step nor beside a UNet in memory. T5 runs in the
  run's ``dtype`` (bfloat16 in configs/if-*.yaml: 9.5 GB instead of 19).
- Stage I trains in pixels (no VAE): the "latents" are the subject photos at ``resolution`` (64),
  class images are drawn by the frozen stage I itself (the paper's prior, IF's own sampler
  settings: ``class_sampler``/``class_steps``/``class_guidance``), the loss is on the epsilon half
  of the UNet's learned-variance output (as diffusers' IF DreamBooth script trains it).
- Stage II trains on (64, 256) pairs: the subject photo at ``sr_resolution`` and the same photo
  downscaled to a quarter, upscaled back bilinearly (as the IF-II pipeline feeds its UNet) and
  noised at the lowered ``sr_noise_level``, which is also the class label; class pairs come from the
  frozen cascade: stage I's class image and its upscaling by the frozen stage II at that level.
- ``max_train_steps: 0`` trains stage II alone (stage I stays frozen: it still encodes the prompts
  and draws the class images), so the stages can be trained in separate runs
  (configs/if-stage1.yaml, configs/if-stage2.yaml).
- Export: each stage's folder is the source folder with the fine-tuned UNet written in (T5,
  tokenizer and schedulers copied), which diffusers' IFPipeline / IFSuperResolutionPipeline load;
  LoRA runs also write ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights``). No kohya
  file: A1111 / ComfyUI do not run IF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.training.checkpoint import StopSignal
from dreambooth_jax.training.config import TrainConfig
from dreambooth_jax.training.run import (StageData, _check_stop, _class_folder, _class_images,
                                         _class_images_generated, _export, _load_instance_images,
                                         _sr_class_images, _write_json, add_adapters, make_validator,
                                         train_sr_and_export, train_stage)
from dreambooth_jax.training.step import StepConfig

#: IF stage II's classifier-free guidance when it upscales class images (IFSuperResolutionPipeline's default).
SR_CLASS_GUIDANCE = 4.0
#: Stage I validation grids: IFPipeline's default guidance.
VALIDATION_GUIDANCE = 7.0
EMBEDDINGS_FILE = "t5_embeddings.npz"


def run_if(cfg: TrainConfig, folders: dict, out_dir: Path, stop: StopSignal, log) -> Path:
    """DreamBooth on IF stage I (``folders['model']``), then stage II (``folders['sr_model']``).
    Returns the exported stage I folder (stage II's when stage I is not trained)."""
    from dreambooth_jax.models import ModelOptions

    opts = ModelOptions(dtype=jnp.dtype(cfg.dtype), remat=cfg.remat, attention=cfg.attention)
    embeds = prompt_embeddings(cfg, folders["model"], out_dir, log)
    _check_stop(stop, log, "after encoding the prompts")
    exported = _stage_one(cfg, folders["model"], opts, embeds, out_dir, stop, log)
    if cfg.sr_model:
        _check_stop(stop, log, "after IF stage I")
        sr = _stage_two(cfg, folders["sr_model"], opts, embeds, out_dir, stop, log)
        exported = exported or sr
    return exported


# ----------------------------------------------------------------------------- prompts
def _prompts(cfg: TrainConfig) -> list[str]:
    """Every prompt the run needs, once each: instance, class, "" (the negative), validation."""
    out = []
    for p in [cfg.instance_prompt, cfg.class_prompt, "", *cfg.validation_prompts]:
        if p not in out:
            out.append(p)
    return out


def prompt_embeddings(cfg: TrainConfig, model: Path, out_dir: Path, log) -> dict[str, np.ndarray]:
    """{prompt: T5 embedding (77, d) float32} for :func:`_prompts`: from the cache in ``out_dir``
    when it holds them all, made by the same encoder in the same dtype; else by loading stage I's T5
    (in the run's dtype), encoding them, and dropping it. The cache keeps what it held before too."""
    from dreambooth_jax.class_images import model_fingerprint

    prompts = _prompts(cfg)
    meta = {"text_encoder": model_fingerprint(model), "dtype": cfg.dtype}
    cache = out_dir / EMBEDDINGS_FILE
    cached = {}
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                stored = json.loads(str(f["meta"]))
                if {k: stored.get(k) for k in meta} == meta:
                    cached = dict(zip(stored["prompts"], np.asarray(f["embeds"])))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable (a kill mid-write cannot leave one: written atomically): encode again
    if all(p in cached for p in prompts):
        log(f"prompt embeddings from {cache} (T5 not loaded)")
        return {p: cached[p] for p in prompts}
    from dreambooth_jax.diffusion.if_pipeline import encode
    from dreambooth_jax.models import ModelOptions
    from dreambooth_jax.models.if_loading import load_if

    log(f"encoding {len(prompts)} prompt(s) with {model}'s T5 ({cfg.dtype}); it is dropped afterwards")
    pipe = load_if(model, components=("text_encoder", "tokenizer"), text_encoder_opts=ModelOptions(
        dtype=jnp.dtype(cfg.dtype)))
    embeds, _ = encode(pipe, prompts)
    del pipe
    fresh = dict(zip(prompts, np.asarray(embeds, np.float32)))
    if jax.process_index() == 0:
        keep = {**cached, **fresh}
        tmp = out_dir / f".{EMBEDDINGS_FILE}.tmp.npz"
        np.savez(tmp, embeds=np.stack(list(keep.values())), meta=np.asarray(json.dumps({**meta, "prompts": list(keep)})))
        tmp.replace(cache)
    return fresh


def _repeat(embeds: dict, prompt: str, n: int) -> np.ndarray:
    return np.repeat(embeds[prompt][None], n, axis=0)


# ----------------------------------------------------------------------------- stage I
def _stage_one(cfg: TrainConfig, model: Path, opts, embeds: dict, out_dir: Path, stop: StopSignal, log
               ) -> Path | None:
    from dreambooth_jax.diffusion.schedules import schedule_from_config
    from dreambooth_jax.models.if_loading import load_if

    pipe = load_if(model, opts, components=("unet", "scheduler"))
    _check_unet_text_dim(pipe, embeds, "model")
    _check_stop(stop, log, "while loading IF stage I")
    generate = _class_image_generator(embeds)
    if not cfg.max_train_steps:
        log("max_train_steps is 0: IF stage I is not trained (it draws the class images); stage II only")
        if cfg.with_prior_preservation:  # drawn if missing: stage II upscales them
            _class_images(cfg, pipe, out_dir, log, stop=stop, generate=generate)
        return None
    add_adapters(cfg, pipe, log, text_encoder=False)
    inst = _load_instance_images(cfg.instance_dir, cfg.resolution, cfg.flip, cfg.center_crop, cfg.seed)
    log(f"{len(inst)} instance image(s){' (with flips)' if cfg.flip else ''} at {cfg.resolution}px (IF stage I)")
    images = [inst]
    if cfg.with_prior_preservation:
        cls = _class_images(cfg, pipe, out_dir, log, stop=stop, generate=generate)
        images.append(cls)
        log(f"{len(cls)} class image(s) for prior preservation (lambda={cfg.prior_loss_weight})")
    pixels = np.concatenate(images).astype(np.float32)
    is_class = np.arange(len(pixels)) >= len(inst)
    context = np.stack([embeds[cfg.instance_prompt], embeds[cfg.class_prompt]])
    data = StageData(pixels, None, is_class, context)
    step_cfg = StepConfig(prior_loss_weight=cfg.prior_loss_weight if cfg.with_prior_preservation else 0.0,
                          min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise, ema_decay=cfg.ema_decay,
                          latent_scale=1.0, latent_shift=0.0)
    validate = _validator(cfg, pipe, embeds, out_dir / "base" / "validation", log)
    unet, history = train_stage(pipe.unet, schedule_from_config(pipe.scheduler_config), data, len(inst), cfg,
                                step_cfg, lr=cfg.learning_rate, steps=cfg.max_train_steps, out_dir=out_dir / "base",
                                log=log, on_step=validate, stop=stop)
    validate(cfg.max_train_steps, None, None, final={"unet": unet})
    exported = out_dir / "model"
    if jax.process_index() == 0:
        _write_json(out_dir / "base" / "metrics.json", history)
        _export(cfg, pipe.path, exported, out_dir / "lora", {"unet": unet}, log, kohya=False)
    return exported


def _check_unet_text_dim(pipe, embeds: dict, key: str) -> None:
    width = next(iter(embeds.values())).shape[-1]
    want = pipe.unet.config.encoder_hid_dim or pipe.unet.config.cross_attention_dim
    if want != width:
        raise ConfigError(f"config key '{key}': the UNet of {pipe.path} reads text embeddings of width {want}, the "
                          f"stage I T5 gives {width} (stages of different IF releases?)")


def _class_image_generator(embeds: dict) -> Callable:
    """generate(cfg, pipe, folder, log, stop=...) for ``_class_images``: "a [class]" images drawn by
    the frozen IF stage I (``pipe``), cached in ``folder`` with a manifest as for Stable Diffusion."""

    def generate(cfg: TrainConfig, pipe, folder: Path, log, stop: StopSignal | None = None, batch_size: int = 4):
        from tqdm.auto import tqdm

        from dreambooth_jax.class_images import ClassImageSpec, ensure_class_images, model_fingerprint
        from dreambooth_jax.diffusion.if_pipeline import IFStageI

        spec = ClassImageSpec(prompt=cfg.class_prompt, num=cfg.num_class_images, sampler=cfg.class_sampler,
                              steps=cfg.class_steps, guidance=cfg.class_guidance, height=cfg.resolution,
                              width=cfg.resolution, seed=cfg.seed)
        holder = {}

        def sample_fn(prompts, seeds):
            if "stage" not in holder:
                log(f"generating class images '{spec.prompt}' with IF stage I into {folder} "
                    f"({spec.sampler}, {spec.steps} steps)")
                holder["stage"] = IFStageI(pipe, sampler=spec.sampler, steps=spec.steps)
            k = len(seeds)
            seeds = list(seeds) + [seeds[-1]] * (batch_size - k)  # constant batch: one compilation
            noise = np.concatenate([np.asarray(jax.random.normal(jax.random.key(s), (1, spec.height, spec.width, 3)))
                                    for s in seeds])  # each image's x_T from its own seed
            return holder["stage"](_repeat(embeds, spec.prompt, batch_size), _repeat(embeds, "", batch_size),
                                   height=spec.height, width=spec.width, seed=seeds[0], guidance=spec.guidance,
                                   noise=noise).images[:k]

        def progress(done, total):
            if "bar" not in holder:
                holder["bar"] = tqdm(total=total, desc="class images", unit="img")
            holder["bar"].n = done
            holder["bar"].refresh()
            if stop is not None and stop.requested and done < total:
                holder["bar"].close()
                _check_stop(stop, log, f"during class-image generation ({done} of {total} new images written)")

        paths = ensure_class_images(folder, spec, model_fingerprint(pipe.path), sample_fn, batch_size=batch_size,
                                    progress=progress)
        if "bar" in holder:
            holder["bar"].close()
        return paths

    return generate


def _validator(cfg: TrainConfig, pipe, embeds: dict, folder: Path, log) -> Callable:
    """run.make_validator with IF stage I (ddim, ``validation_steps``, fixed seed, IFPipeline's
    guidance) on the precomputed embeddings of the validation prompts."""
    def build():
        from dreambooth_jax.diffusion.if_pipeline import IFStageI

        return IFStageI(pipe, sampler="ddim", steps=cfg.validation_steps)

    def draw(stage):
        n = len(cfg.validation_prompts)
        return stage(np.stack([embeds[p] for p in cfg.validation_prompts]), _repeat(embeds, "", n),
                     height=cfg.resolution, width=cfg.resolution, seed=cfg.validation_seed,
                     guidance=VALIDATION_GUIDANCE).images

    return make_validator(cfg, pipe, folder, log, build=build, draw=draw)


# ----------------------------------------------------------------------------- stage II
def _stage_two(cfg: TrainConfig, sr_model: Path, opts, embeds: dict, out_dir: Path, stop: StopSignal, log) -> Path:
    from dreambooth_jax.data.images import load_image
    from dreambooth_jax.diffusion.if_pipeline import upsample_bilinear
    from dreambooth_jax.models.if_loading import load_if

    pipe = load_if(sr_model, opts, components=("unet", "scheduler"))
    _check_unet_text_dim(pipe, embeds, "sr_model")
    add_adapters(cfg, pipe, log, text_encoder=False)
    size, low_size = cfg.sr_resolution, cfg.sr_resolution // 4
    hi = _load_instance_images(cfg.instance_dir, size, cfg.flip, cfg.center_crop, cfg.seed)
    his, lows = [hi], [_downscale(hi, low_size)]
    if cfg.with_prior_preservation:
        hi_cls = _sr_class_images(cfg, pipe, out_dir, log, stop=stop,
                                  make_upscaler=lambda: _upscaler(cfg, pipe, embeds),
                                  spec_extra={"sampler": cfg.class_sampler, "guidance": SR_CLASS_GUIDANCE})
        his.append(hi_cls)
        if _class_images_generated(cfg, out_dir):  # the frozen cascade's pairs: stage I's image, stage II's upscaling
            folder = _class_folder(cfg, out_dir)
            lows.append(np.stack([load_image(folder / f"{i:05d}.png", low_size)
                                  for i in range(cfg.num_class_images)]))
        else:  # class photos: downscaled as the subject's
            lows.append(_downscale(hi_cls, low_size))
        log(f"{len(hi_cls)} class pair(s) for prior preservation (lambda={cfg.prior_loss_weight})")
    hi_all = np.concatenate(his).astype(np.float32)
    low_all = np.concatenate(lows).astype(np.float32)
    upscaled = np.asarray(jax.jit(upsample_bilinear, static_argnums=(1, 2))(low_all, size, size))
    is_class = np.arange(len(hi_all)) >= len(hi)
    context = np.stack([embeds[cfg.instance_prompt], embeds[cfg.class_prompt]])
    data = StageData(hi_all, None, is_class, context, low_res=upscaled)
    log(f"{len(hi)} subject pair(s) ({low_size} -> {size} px), noise level {cfg.sr_noise_level} (IF stage II)")
    return train_sr_and_export(cfg, pipe, data, len(hi), pipe.image_noising_scheduler_config, out_dir, log, stop,
                               latent_scale=1.0, latent_shift=0.0, kohya=False)


def _downscale(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) in [-1, 1] -> (N, size, size, 3): antialiased bicubic, as the pairs' low-res side."""
    return np.asarray(jax.image.resize(images, (len(images), size, size, images.shape[-1]), "cubic",
                                       antialias=True)).clip(-1, 1)


def _upscaler(cfg: TrainConfig, pipe, embeds: dict) -> Callable:
    """upscale(low (B, h, w, 3) in [-1, 1], seed) -> uint8 (B, 4h, 4w, 3) by the frozen IF stage II at
    ``sr_noise_level`` (the level the pairs are trained at)."""
    from dreambooth_jax.diffusion.if_pipeline import IFStageII

    stage = IFStageII(pipe, sampler=cfg.class_sampler, steps=cfg.class_steps)

    def upscale(low: np.ndarray, seed: int) -> np.ndarray:
        n = len(low)
        return stage(low, _repeat(embeds, cfg.class_prompt, n), _repeat(embeds, "", n),
                     noise_level=cfg.sr_noise_level, height=cfg.sr_resolution, width=cfg.sr_resolution, seed=seed,
                     guidance=SR_CLASS_GUIDANCE).images

    return upscale
