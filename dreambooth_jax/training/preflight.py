"""Checks of a training run that need the machine but no model weights: they run before anything
is loaded or compiled (minutes on a real model), so a bad setting fails in a second with one line.

Value ranges are checked when the config is built (``config.check``); here: paths (model folders,
subject photos, class images), what the model folders' configs imply (resolution multiples,
upscaler or not, noise levels), the device count (fsdp, batch split) and whether a checkpoint in
``output_dir`` can be resumed with these settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.hub import resolve_model_path
from dreambooth_jax.training.config import TrainConfig


def preflight(cfg: TrainConfig) -> dict[str, Path]:
    """Raise a ConfigError (or the loader's CheckpointError) for anything that would fail later.
    Returns the resolved model folders {'model': ..., 'sr_model': ...}. ``check_resume`` is the
    part that reads output_dir: call it once the run holds the folder's lock."""
    from dreambooth_jax.data.images import list_images

    if not cfg.model:
        raise ConfigError("config key 'model' is empty: give a diffusers folder or hub id")
    if not cfg.instance_dir:
        raise ConfigError("config key 'instance_dir' is empty: give the folder of subject photos")
    list_images(cfg.instance_dir)  # the subject photos: a folder that holds images (DataError if not)
    if cfg.with_prior_preservation and cfg.class_dir and not cfg.class_dir.startswith("tfds:"):
        if Path(cfg.class_dir).exists() and not Path(cfg.class_dir).is_dir():
            raise ConfigError(f"config key 'class_dir': {cfg.class_dir} is a file, not a folder")
    check_devices(cfg, jax.device_count())
    folders = {"model": resolve_model_path(cfg.model)}
    if _if_kind(folders["model"], "model") is not None:
        return _preflight_if(cfg, folders)
    _check_model(folders["model"], cfg.resolution, "model", "resolution", upscaler=False)
    if cfg.sr_model:
        folders["sr_model"] = resolve_model_path(cfg.sr_model)
        if _if_kind(folders["sr_model"], "sr_model") is not None:
            raise ConfigError(f"config key 'sr_model': {folders['sr_model']} is a DeepFloyd IF pipeline, and model "
                              f"{folders['model']} is not: a Stable Diffusion model takes an x4 upscaler as sr_model")
        index = _check_model(folders["sr_model"], cfg.sr_resolution, "sr_model", "sr_resolution", upscaler=True)
        top = int(index.get("max_noise_level", 350))
        if cfg.sr_noise_level > top:
            raise ConfigError(f"config key 'sr_noise_level' ({cfg.sr_noise_level}) exceeds the upscaler's "
                              f"max_noise_level {top}")
    return folders


def _if_kind(folder: Path, key: str) -> str | None:
    """"I" / "II" for a DeepFloyd IF folder, None for another pipeline."""
    from dreambooth_jax.models.if_loading import if_kind

    index_path = folder / "model_index.json"
    try:
        return if_kind(_read(index_path))
    except ConfigError as e:
        raise ConfigError(f"config key '{key}': {index_path}: {e}") from None


def _preflight_if(cfg: TrainConfig, folders: dict[str, Path]) -> dict[str, Path]:
    """A DeepFloyd IF run: stage I as ``model`` (its T5 encodes the prompts once; it draws the class
    images), stage II as ``sr_model``; pixel-space sizes the UNets' downsampling divides."""
    model = folders["model"]
    if _if_kind(model, "model") == "II":
        raise ConfigError(f"config key 'model': {model} is a DeepFloyd IF stage II (super-resolution) pipeline; "
                          "give the IF stage I folder as model and this one as sr_model")
    if cfg.train_text_encoder or cfg.lora_text_encoder:
        key = "train_text_encoder" if cfg.train_text_encoder else "lora_text_encoder"
        raise ConfigError(f"config key '{key}': DeepFloyd IF's T5 encoder stays frozen (its prompt embeddings are "
                          f"computed once, before training); set {key}: false")
    index = _read(model / "model_index.json")
    for part in ("text_encoder", "tokenizer"):
        if not (isinstance(index.get(part), list) and index[part][0]):
            raise ConfigError(f"config key 'model': {model / 'model_index.json'} names no {part}; the IF stage I "
                              "folder's T5 encodes the prompts")
    _check_if_unet(model, cfg.resolution, "model", "resolution")
    if cfg.sr_model:
        folders["sr_model"] = sr = resolve_model_path(cfg.sr_model)
        if _if_kind(sr, "sr_model") != "II":
            raise ConfigError(f"config key 'sr_model': {sr} is not a DeepFloyd IF stage II pipeline, which an IF "
                              "stage I model takes as its SR stage")
        _check_if_unet(sr, cfg.sr_resolution, "sr_model", "sr_resolution")
        steps = int(_read(sr / "image_noising_scheduler" / "scheduler_config.json").get("num_train_timesteps", 1000))
        if cfg.sr_noise_level >= steps:
            raise ConfigError(f"config key 'sr_noise_level' ({cfg.sr_noise_level}) must be below the IF stage II "
                              f"image_noising_scheduler's {steps} timesteps")
    return folders


def _check_if_unet(folder: Path, size: int, key: str, size_key: str) -> None:
    unet = _read(folder / "unet" / "config.json")
    multiple = 2 ** (len(unet.get("block_out_channels", [0])) - 1)
    if size % multiple:
        raise ConfigError(f"config key '{size_key}' ({size}) must be a multiple of {multiple} for {folder} "
                          "(the UNet's downsampling; DeepFloyd IF trains in pixels: stage I at 64, stage II at 256)")


def check_devices(cfg: TrainConfig, n_devices: int) -> None:
    if n_devices % cfg.fsdp:
        raise ConfigError(f"config key 'fsdp' ({cfg.fsdp}) must divide the number of devices ({n_devices})")
    per_step = cfg.train_batch_size * (2 if cfg.with_prior_preservation else 1)
    if per_step % n_devices:
        raise ConfigError(
            f"config key 'train_batch_size' ({cfg.train_batch_size}): the global batch of {per_step} images "
            f"({'instance + class' if cfg.with_prior_preservation else 'instance'}) does not split over "
            f"{n_devices} devices; use a train_batch_size that makes it a multiple of {n_devices}")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing (is {path.parent.parent} a diffusers pipeline folder?)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not readable JSON: {e}") from e


def _check_model(folder: Path, size: int, key: str, size_key: str, *, upscaler: bool) -> dict:
    """The model folder's configs agree with the run: the right kind of pipeline, and an image
    size that the VAE and the UNet's downsampling divide."""
    index = _read(folder / "model_index.json")
    is_upscaler = "low_res_scheduler" in index
    if upscaler and not is_upscaler:
        raise ConfigError(f"config key '{key}': {folder} is not an x4 upscaler pipeline (no low_res_scheduler)")
    if not upscaler and is_upscaler:
        raise ConfigError(f"config key '{key}': {folder} is an x4 upscaler; give it as sr_model and a "
                          "text-to-image pipeline as model")
    unet, vae = _read(folder / "unet" / "config.json"), _read(folder / "vae" / "config.json")
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    multiple = vae_factor * 2 ** (len(unet.get("block_out_channels", [0])) - 1)
    if size % multiple:
        raise ConfigError(f"config key '{size_key}' ({size}) must be a multiple of {multiple} for {folder}")
    return index


def structural_changes(old: dict, new: dict, stage: str) -> list[str]:
    """Settings whose change makes a checkpoint's state another pytree (or another model)."""
    keys = {"base": ("model",), "sr": ("sr_model",)}[stage]
    out = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if k in old and old[k] != new[k]]
    if stage == "base" and old.get("train_text_encoder", False) != new["train_text_encoder"]:
        out.append(f"train_text_encoder: {old.get('train_text_encoder')} -> {new['train_text_encoder']}")
    for k, default in (("lora_rank", 0), ("lora_targets", "attention"), ("lora_text_encoder", False)):
        if k == "lora_text_encoder" and stage == "sr":
            continue
        if old.get(k, default) != new[k] and (k == "lora_rank" or new["lora_rank"]):
            out.append(f"{k}: {old.get(k, default)!r} -> {new[k]!r} (the adapters are the saved state)")
    if old.get("optimizer", "adamw") != new["optimizer"]:
        out.append(f"optimizer: {old.get('optimizer', 'adamw')} -> {new['optimizer']} (its state is saved)")
    if (old.get("ema_decay") is None) != (new["ema_decay"] is None):
        out.append(f"ema_decay: {old.get('ema_decay')} -> {new['ema_decay']} (EMA weights are part of the state)")
    if (old.get("grad_accum", 1) > 1) != (new["grad_accum"] > 1):
        out.append(f"grad_accum: {old.get('grad_accum', 1)} -> {new['grad_accum']} (the optimizer state "
                   "holds accumulated gradients only when grad_accum > 1)")
    return out


def check_resume(cfg: TrainConfig) -> None:
    """A checkpoint in output_dir that these settings cannot continue is an error now, naming
    the settings that changed, not an Orbax traceback after loading and compiling."""
    from dreambooth_jax.training.checkpoint import Checkpointer
    from dreambooth_jax.training.rundir import config_dict

    new = config_dict(cfg)
    for stage in ("base", "sr") if cfg.sr_model else ("base",):
        folder = Path(cfg.output_dir) / stage / "checkpoints"
        if not folder.is_dir():
            continue
        ckpt = Checkpointer(folder, keep=max(cfg.keep_checkpoints, 1), async_save=False)
        try:
            meta = ckpt.read_meta() or {}
        finally:
            ckpt.close()
        changed = structural_changes(meta.get("config", {}), new, stage)
        if changed:
            raise ConfigError(
                f"output_dir {cfg.output_dir} holds a {stage} checkpoint (step {meta.get('step')}) made with other "
                f"settings that change what is saved: {'; '.join(changed)}. Set them back to resume it, or choose "
                f"a new output_dir to start over (the old run is kept)")
