"""``dreambooth-jax export``: a run folder's checkpoint (any step kept) -> a diffusers folder, the
LoRA files, or both; without retraining and while or after the run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.errors import ConfigError, DreamboothError
from dreambooth_jax.training.config import TrainConfig

WHAT = ("all", "model", "lora")


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run folder: it has no config.json (written by `dreambooth-jax train`)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in raw.items() if k in known})


def export_run(run_dir: str | Path, out: str | Path, *, stage: str = "base", step: int | None = None,
               what: str = "all", merge_lora: bool = True, overwrite: bool = False,
               log: Callable[[str], None] = print) -> Path:
    """Restore the checkpoint of ``stage`` ('base' or 'sr') at ``step`` (default: the newest) of the
    run in ``run_dir`` and write into ``out``: ``model/`` (a full diffusers folder; a LoRA run's
    adapters merged into the base, or the base without them when ``merge_lora`` is false) and, for
    a LoRA run, ``lora/pytorch_lora_weights.safetensors`` (diffusers) + ``lora/lora_kohya.safetensors``
    (not for DeepFloyd IF runs, which only diffusers runs).
    EMA weights when the run keeps them."""
    from dreambooth_jax.models import ModelOptions, export_pipeline, load_pretrained
    from dreambooth_jax.models.lora import has_lora, merge_lora as merge, strip_lora
    from dreambooth_jax.training.checkpoint import Checkpointer
    from dreambooth_jax.models.hub import resolve_model_path
    from dreambooth_jax.training.run import add_adapters, is_if_folder, optimizer_for, split_trainable
    from dreambooth_jax.training.state import init_state

    run_dir, out = Path(run_dir), Path(out)
    if what not in WHAT:
        raise ConfigError(f"--what must be one of {', '.join(WHAT)}, got {what!r}")
    if stage not in ("base", "sr"):
        raise ConfigError(f"--stage must be base or sr, got {stage!r}")
    cfg = read_run_config(run_dir)
    if what == "lora" and not cfg.lora_rank:
        raise ConfigError(f"{run_dir} is a full fine-tuning run (lora_rank 0): it has no LoRA adapters to export; "
                          "use --what model")
    if stage == "sr" and not cfg.sr_model:
        raise ConfigError(f"{run_dir} has no SR stage (sr_model is empty)")
    ckpt_dir = run_dir / stage / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"{run_dir} has no {stage} checkpoints ({ckpt_dir} does not exist)")
    targets = [out / "model"] if what in ("all", "model") else []
    if cfg.lora_rank and what in ("all", "lora"):
        targets.append(out / "lora")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(existing)} exist(s); pass --overwrite to replace, or choose another --out")
    ckpt = Checkpointer(ckpt_dir, keep=cfg.keep_checkpoints, async_save=False)
    try:
        steps = ckpt.all_steps()
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise ConfigError(f"{ckpt_dir} holds no finished checkpoint")
        if step not in steps:
            raise ConfigError(f"{ckpt_dir} has no checkpoint of step {step} (kept: {', '.join(map(str, steps))})")
        source = resolve_model_path(cfg.model if stage == "base" else cfg.sr_model)
        is_if = is_if_folder(source)
        if is_if:  # DeepFloyd IF: the UNet alone (the 4.7 B T5 is copied, never loaded)
            from dreambooth_jax.models.if_loading import load_if

            pipe = load_if(source, ModelOptions(dtype=jnp.float32), components=("unet",))
        else:
            pipe = load_pretrained(source, ModelOptions(dtype=jnp.float32))
        add_adapters(cfg, pipe, log, text_encoder=stage == "base")
        models = {"unet": pipe.unet}
        if stage == "base" and (cfg.train_text_encoder or cfg.lora_text_encoder):
            models["text_encoder"] = pipe.text_encoder
        graphdefs, params, _, host_base = split_trainable(models, jnp.float32)
        lr = cfg.learning_rate if stage == "base" else cfg.sr_learning_rate
        steps_total = cfg.max_train_steps if stage == "base" else cfg.sr_max_train_steps
        tx = optimizer_for(cfg, lr, steps_total)
        abstract = jax.eval_shape(lambda p: init_state(p, tx, cfg.ema_decay is not None), params)
        try:
            state, meta = ckpt.restore(abstract, step)
        except Exception as e:
            raise DreamboothError(f"the checkpoint of step {step} in {ckpt_dir} does not fit the run's config.json "
                                  f"(was config.json edited?) [{type(e).__name__}]") from e
    finally:
        ckpt.close()
    final = jax.device_get(state.ema if state.ema is not None else state.params)
    trained = {}
    for name in models:
        parts = [final[name]] + ([host_base[name]] if name in host_base else [])
        trained[name] = nnx.merge(graphdefs[name], *parts)
        trained[name].eval()
    log(f"restored step {meta['step']} of {ckpt_dir}{' (EMA weights)' if state.ema is not None else ''}")
    out.mkdir(parents=True, exist_ok=True)
    if out / "lora" in targets:
        from dreambooth_jax.models.lora_io import save_lora

        (out / "lora").mkdir(exist_ok=True)
        adapted = {k: m for k, m in trained.items() if has_lora(m)}
        save_lora(out / "lora" / "pytorch_lora_weights.safetensors", adapted, format="diffusers", overwrite=True)
        if not is_if:  # A1111 / ComfyUI's layout; they do not run IF
            save_lora(out / "lora" / "lora_kohya.safetensors", adapted, format="kohya", overwrite=True)
        log(f"wrote the LoRA adapters to {out / 'lora'} ({'diffusers file' if is_if else 'diffusers and kohya files'})")
    if out / "model" in targets:
        models_out = {k: (merge(m) if merge_lora else strip_lora(m)) for k, m in trained.items()}
        export_pipeline(source, out / "model", models_out, overwrite=True, dtype=cfg.export_dtype or None)
        note = "" if not cfg.lora_rank else (" (adapters merged)" if merge_lora else " (base without adapters)")
        log(f"wrote the diffusers folder{note} to {out / 'model'}")
    return out
