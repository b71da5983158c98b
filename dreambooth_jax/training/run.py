"""The DreamBooth training run: data -> precomputed latents/embeddings -> sharded steps ->
checkpoints -> exported diffusers folder. ``python -m dreambooth_jax.train`` calls ``run``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dreambooth_jax.errors import DreamboothError
from dreambooth_jax.models.lora import LoRAParam, has_lora
from dreambooth_jax.training.checkpoint import Checkpointer, Preempted, StopSignal, abstract_like
from dreambooth_jax.training.config import TrainConfig
from dreambooth_jax.training.rundir import MetricsLog, config_dict
from dreambooth_jax.sharding import global_batch, make_mesh, param_shardings
from dreambooth_jax.training.state import init_state, make_optimizer
from dreambooth_jax.training.step import StepConfig, jit_train_step, make_train_step


class TrainingDiverged(DreamboothError):
    pass


class ResumeError(DreamboothError):
    """The checkpoint in output_dir cannot be resumed with this run's settings."""


def lr_schedule(cfg: TrainConfig, lr: float, steps: int) -> optax.Schedule:
    warm = min(cfg.lr_warmup_steps, steps)
    if cfg.lr_schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.lr_schedule == "warmup_constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)], [warm])
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(steps, warm + 1))


@dataclasses.dataclass
class StageData:
    """Everything the step consumes, precomputed once on the host."""

    latent_mean: np.ndarray  # (N, h, w, C) instance examples first, then class examples
    latent_logvar: np.ndarray | None  # None: pixel space (DeepFloyd IF), the "latents" are the images
    is_class: np.ndarray  # (N,) bool
    context: np.ndarray | None  # (2, L, D): [instance prompt, class prompt] embeddings (frozen text encoder)
    low_res: np.ndarray | None = None  # SR stage: (N, h, w, 3) in [-1, 1]
    input_ids: np.ndarray | None = None  # (2, L): [instance, class] token ids (trained text encoder)


def encode_images(vae, images: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) in [-1, 1] -> latent distribution (mean, logvar), via one jitted encoder."""
    graphdef, params = nnx.split(vae)
    fn = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
    means, logvars = [], []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        pad = batch - len(chunk)
        m, lv = fn(params, np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk)
        means.append(np.asarray(m)[:len(chunk)])
        logvars.append(np.asarray(lv)[:len(chunk)])
    return np.concatenate(means), np.concatenate(logvars)


def encode_prompts(pipe, prompts: list[str]) -> np.ndarray:
    from dreambooth_jax.models.loading import tokenize

    ids = tokenize(pipe.tokenizer, prompts, pipe.text_encoder.config.max_position_embeddings)
    hidden, _ = jax.jit(lambda p, i: nnx.merge(*p)(i))(nnx.split(pipe.text_encoder), ids)
    return np.asarray(hidden)


def _tensorboard(folder: Path, purge_step: int | None = None):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(folder), purge_step=purge_step)


def make_host_batch(data: StageData, n_inst: int, cfg: TrainConfig, step: int, with_prior: bool) -> dict:
    """The global batch of ``step``: train_batch_size instance (+ as many class) examples,
    chosen by a seeded epoch-wise permutation so a resumed run sees the same data."""
    from dreambooth_jax.data.images import batch_indices

    b = cfg.train_batch_size
    idx = list(batch_indices(n_inst, b, step, cfg.seed))
    if with_prior:
        n_cls = len(data.is_class) - n_inst
        idx += [n_inst + j for j in batch_indices(n_cls, b, step, cfg.seed + 1)]
    idx = np.asarray(idx)
    which = data.is_class[idx].astype(int)  # 0: instance prompt, 1: class prompt
    batch = dict(latent_mean=data.latent_mean[idx], is_class=data.is_class[idx])
    if data.latent_logvar is not None:
        batch["latent_logvar"] = data.latent_logvar[idx]
    if data.input_ids is not None:
        batch["input_ids"] = data.input_ids[which]
    else:
        batch["context"] = data.context[which]
    if data.low_res is not None:
        batch["low_res"] = data.low_res[idx]
    return batch


def train_stage(unet, schedule, data: StageData, n_inst: int, cfg: TrainConfig, step_cfg: StepConfig, *,
                lr: float, steps: int, out_dir: Path, low_res_schedule=None, text_encoder=None,
                log: Callable[[str], None] = print, on_step: Callable | None = None, stop: StopSignal | None = None):
    """Train ``unet`` (and ``text_encoder`` if given: ``data.input_ids`` then holds the prompts'
    ids) on the precomputed DreamBooth ``data`` (instance examples first, then class examples)
    for ``steps`` steps with checkpoints in ``out_dir/checkpoints``. Returns the trained UNet
    (or ``{'unet', 'text_encoder'}`` when the text encoder is trained; EMA weights if enabled)
    and the metrics history."""
    with_prior = bool(data.is_class.any())
    models = {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}
    trained, history = train_loop(models, schedule, lambda step: make_host_batch(data, n_inst, cfg, step, with_prior),
                                  cfg, step_cfg, lr=lr, steps=steps, out_dir=out_dir,
                                  low_res_schedule=low_res_schedule, log=log, on_step=on_step, stop=stop)
    return (trained["unet"] if text_encoder is None else trained), history


def split_trainable(models: dict, compute_dtype) -> tuple[dict, dict, dict, dict]:
    """(graphdefs, trained params, frozen step arguments, host base) per model: a model with LoRA
    adapters trains them alone and its base enters the step frozen in the compute dtype (the
    fp32 base is kept as ``host base`` for the export); any other model trains all its params."""
    graphdefs, params, frozen, host_base = {}, {}, {}, {}
    for name, m in models.items():
        if has_lora(m):
            view = nnx.merge(*nnx.split(m))
            view.train()  # LoRA dropout on in the step (the caller's model stays in eval mode)
            graphdefs[name], params[name], host_base[name] = nnx.split(view, LoRAParam, ...)
            frozen[name] = jax.tree.map(lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                                        else a, host_base[name])
        else:
            graphdefs[name], params[name] = nnx.split(m, nnx.Param)
    return graphdefs, params, frozen, host_base


def optimizer_for(cfg: TrainConfig, lr: float, steps: int) -> optax.GradientTransformation:
    return make_optimizer(lr_schedule(cfg, lr, steps), weight_decay=cfg.weight_decay, b1=cfg.adam_b1,
                          b2=cfg.adam_b2, eps=cfg.adam_eps, max_grad_norm=cfg.max_grad_norm, grad_accum=cfg.grad_accum,
                          optimizer=cfg.optimizer)


def train_loop(models: dict, schedule, batch_fn: Callable[[int], dict], cfg: TrainConfig, step_cfg: StepConfig, *,
               lr: float, steps: int, out_dir: Path, low_res_schedule=None,
               log: Callable[[str], None] = print, on_step: Callable | None = None,
               stop: StopSignal | None = None):
    """The training loop: ``models`` ({'unet': UNet} or also 'text_encoder' when it is trained)
    for ``steps`` steps on ``batch_fn(step)`` (a deterministic host batch, so that a resumed run
    sees the same data), checkpoints in ``out_dir/checkpoints``, resume, SIGTERM (``stop``: the
    caller's StopSignal, else one around the loop), NaN stop. The loss history is appended to
    ``out_dir/metrics.jsonl`` as it goes and kept across resumes. Returns the trained models (EMA
    weights if enabled) and the whole metrics history (earlier runs' steps included)."""
    from tqdm.auto import tqdm

    mesh = make_mesh(cfg.fsdp)
    host0 = batch_fn(0)
    global_b = len(host0["is_class"])
    if global_b % mesh.size:
        raise DreamboothError(f"global batch {global_b} does not split over {mesh.size} devices; set "
                              f"train_batch_size so that the batch (doubled with prior preservation) is a "
                              f"multiple of {mesh.size}")
    compute_dtype = jnp.dtype(cfg.dtype)
    graphdefs, params, frozen, host_base = split_trainable(models, compute_dtype)
    tx = optimizer_for(cfg, lr, steps)
    ema = step_cfg.ema_decay is not None
    abstract = jax.eval_shape(lambda p: init_state(p, tx, ema), params)
    shardings = param_shardings(abstract, mesh)
    state = jax.jit(lambda p: init_state(p, tx, ema), out_shardings=shardings)(params)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in host0.items()}
    abstract_frozen = jax.eval_shape(lambda f: f, frozen)
    frozen = jax.device_put(frozen, param_shardings(abstract_frozen, mesh))
    if compute_dtype != jnp.float32:  # cast trained kernels on their shards: fsdp gathers bf16
        step_cfg = dataclasses.replace(step_cfg, cast_params=compute_dtype.name)
    step_fn = make_train_step(graphdefs["unet"], schedule, tx, step_cfg, text_graphdef=graphdefs.get("text_encoder"),
                              low_res_schedule=low_res_schedule)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=cfg.keep_checkpoints)
    start = 0
    if ckpt.latest_step() is not None:
        meta = ckpt.read_meta()
        changed = config_changes(meta.get("config", {}), _config_fingerprint(cfg))
        try:
            state, meta = ckpt.restore(abstract_like(state))
        except Exception as e:  # another model, or a setting that changes the state's structure
            ckpt.close()
            raise ResumeError(f"the checkpoint in {ckpt.directory} (step {meta.get('step')}) does not fit this "
                              f"run's model and settings ({', '.join(changed) or 'same config, other model files?'}); "
                              "restore those settings to resume, or use a new output_dir to start over "
                              f"[{type(e).__name__}]") from e
        start = int(meta["step"])
        if changed:
            log(f"note: resuming with changed settings: {', '.join(changed)}")
        log(f"resumed from step {start}")
    compiled = None
    if start < steps:  # a finished stage (a rerun of its command) needs no step: no compile
        t0 = time.perf_counter()
        try:
            compiled = jit_train_step(step_fn, abstract, abstract_batch, abstract_frozen, mesh)
        except BaseException:
            ckpt.close()
            raise
        log(f"compiled train step in {time.perf_counter() - t0:.1f}s on {mesh.size} device(s) "
            f"(mesh {dict(mesh.shape)}), global batch {global_b}")
    rng = jax.random.key_data(jax.random.key(cfg.seed))
    main = jax.process_index() == 0  # only process 0 writes logs and images
    metrics_log = MetricsLog(out_dir / "metrics.jsonl", resume_step=start, enabled=main)
    # purge_step: TensorBoard drops the events of steps after the checkpoint (about to be redone)
    tb = _tensorboard(out_dir / "tensorboard", purge_step=start or None) if main else None
    bar = tqdm(total=steps, initial=start, desc=out_dir.name, unit="step", dynamic_ncols=True, disable=not main)
    schedule_fn = lr_schedule(cfg, lr, steps)
    try:
        with contextlib.ExitStack() as stack:
            if stop is None:
                stop = stack.enter_context(StopSignal())
            if stop.requested:
                log("stop requested before training started; nothing new to save. Rerun the same command to resume")
                raise Preempted()
            for step in range(start, steps):
                batch = global_batch(batch_fn(step), mesh)
                state, metrics = compiled(state, batch, rng, frozen)
                done = step + 1
                m = None
                saving = done % cfg.checkpoint_every == 0 or done == steps or stop.requested
                if saving or done % cfg.log_every == 0:  # never checkpoint a diverged state
                    m = {k: float(v) for k, v in metrics.items()}
                    if not all(math.isfinite(v) for v in m.values()):
                        raise TrainingDiverged(
                            f"loss became {m['loss']} at step {done}; stopped without saving it. The last good "
                            f"checkpoint is kept in {ckpt.directory}. Lower the learning rate?")
                    m.update(step=done, lr=float(schedule_fn(step)))
                    metrics_log.append(m)
                    if tb is not None:
                        for k, v in m.items():
                            if k != "step":
                                tb.add_scalar(f"train/{k}", v, done)
                        tb.flush()  # a kill -9 keeps what was logged
                    bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                bar.update(1)
                if saving:
                    ckpt.save(done, state, {"step": done, "config": _config_fingerprint(cfg)})
                if stop.requested:
                    ckpt.wait()
                    log(f"stop requested: saved step {done} to {ckpt.directory}; rerun the same command to resume")
                    raise Preempted()
                if on_step:
                    on_step(done, m, state)  # m is None on steps that are not logged
    finally:
        bar.close()
        metrics_log.close()
        if tb is not None:
            tb.close()
        ckpt.close()  # waits for an asynchronous save in flight, whatever ended the loop
    history = metrics_log.history()
    final = state.ema if ema else state.params
    if jax.process_count() > 1:  # fsdp shards live on several hosts: gather them everywhere
        from jax.experimental import multihost_utils

        final = multihost_utils.process_allgather(final, tiled=True)
    final = jax.device_get(final)
    out = {}
    for name in models:
        parts = [final[name]] + ([host_base[name]] if name in host_base else [])
        out[name] = nnx.merge(graphdefs[name], *parts)
        out[name].eval()  # LoRA dropout off
    return out, history


def _config_fingerprint(cfg: TrainConfig) -> dict:
    return config_dict(cfg)


# Settings that are free to change between a run and its resume (paths to the same data, logging,
# validation, the number of steps): the others are reported when they differ.
_RESUME_FREE = frozenset({"output_dir", "max_train_steps", "sr_max_train_steps", "checkpoint_every",
                          "keep_checkpoints", "log_every", "validation_every", "validation_prompts",
                          "validation_steps", "validation_seed", "attention", "remat", "fsdp", "export_dtype"})


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting (other than logging/validation/step counts) that differs."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new
            if k not in _RESUME_FREE and k in old and old.get(k) != new.get(k)]


def _load_instance_images(folder: str, size: int, flip: bool, center_crop: bool, seed: int) -> np.ndarray:
    from dreambooth_jax.data.images import InstanceDataset

    ds = InstanceDataset(folder, size, flip=flip, crop="center" if center_crop else "random", seed=seed)
    return ds.images


def _class_images(cfg: TrainConfig, pipe, out_dir: Path, log, size: int | None = None,
                  stop: StopSignal | None = None, generate: Callable | None = None) -> np.ndarray:
    """The class (prior) images at ``size`` (default: the training resolution): a given folder,
    a TFDS source, or generated by the frozen model (cached with a manifest): by ``generate(cfg,
    pipe, folder, log, stop=stop)``, by default :func:`generate_class_images` (Stable Diffusion)."""
    from dreambooth_jax.data.images import list_images, load_image

    size = size or cfg.resolution
    if cfg.class_dir.startswith("tfds:"):
        from dreambooth_jax.data.tfds_source import open_image_source

        src = open_image_source(cfg.class_dir, cfg.class_data_dir or None)
        n = min(len(src), cfg.num_class_images)
        imgs = [np.asarray(src[i]["image"]) for i in range(n)]
        return np.stack([_resize_uint8(im, size) for im in imgs]).astype(np.float32) / 127.5 - 1.0
    folder = _class_folder(cfg, out_dir)
    manifest = folder / "manifest.json"
    if cfg.class_dir and folder.is_dir() and not manifest.exists() and list(folder.iterdir()):
        paths = list_images(folder)[: cfg.num_class_images]  # the user's own class photos
    else:
        generate = generate or generate_class_images
        _on_process_0(lambda: generate(cfg, pipe, folder, log, stop=stop), "class_images")
        paths = [folder / f"{i:05d}.png" for i in range(cfg.num_class_images)]
    return np.stack([load_image(p, size) for p in paths])


def _class_folder(cfg: TrainConfig, out_dir: Path) -> Path:
    return Path(cfg.class_dir) if cfg.class_dir else out_dir / "class_images"


def _class_images_generated(cfg: TrainConfig, out_dir: Path) -> bool:
    return not cfg.class_dir or (_class_folder(cfg, out_dir) / "manifest.json").exists()


def _on_process_0(fn: Callable, name: str) -> None:
    """Run ``fn`` (which writes files) on process 0 only; the other processes wait for it."""
    if jax.process_index() == 0:
        fn()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _sr_class_images(cfg: TrainConfig, pipe, out_dir: Path, log, stop: StopSignal | None = None,
                     make_upscaler: Callable | None = None, spec_extra: dict | None = None) -> np.ndarray:
    """High-res class images for the SR stage's prior preservation. Class images drawn by the
    frozen base model are upscaled by the frozen SR model (the frozen cascade's own output; a
    resized low-res image would teach the SR model to blur); real class photos are used as they are.
    make_upscaler() -> upscale(low (B, h, w, 3) in [-1, 1], seed) -> uint8 (B, H, W, 3), built when
    images are missing; by default the x4 upscaler's sampler on ``pipe``. spec_extra: its settings
    that the cache's manifest records beside (or instead of) the default ones."""
    from dreambooth_jax.class_images import model_fingerprint
    from dreambooth_jax.data.images import load_image

    if not _class_images_generated(cfg, out_dir):
        return _class_images(cfg, pipe, out_dir, log, size=cfg.sr_resolution)
    low_paths = [_class_folder(cfg, out_dir) / f"{i:05d}.png" for i in range(cfg.num_class_images)]
    cache = out_dir / "class_images_sr"
    spec = {"low_res": [p.name for p in low_paths],
            "low_res_manifest": json.loads((low_paths[0].parent / "manifest.json").read_text()),
            "sr_model": model_fingerprint(pipe.path), "noise_level": cfg.sr_noise_level, "steps": cfg.class_steps,
            "size": cfg.sr_resolution, "guidance": cfg.class_guidance, **(spec_extra or {})}
    paths = [cache / p.name for p in low_paths]

    def generate():
        stamp = cache / "manifest.json"
        if stamp.exists() and json.loads(stamp.read_text()) == spec and all(p.exists() for p in paths):
            return
        from PIL import Image

        log(f"upscaling {len(low_paths)} class images with the frozen SR model into {cache}")
        cache.mkdir(parents=True, exist_ok=True)
        upscale = (make_upscaler or (lambda: _x4_upscaler(cfg, pipe)))()
        low_size = cfg.sr_resolution // 4
        batch = 8
        for i in range(0, len(low_paths), batch):
            chunk = low_paths[i:i + batch]
            low = np.stack([load_image(p, low_size) for p in chunk])
            low = np.concatenate([low, np.repeat(low[-1:], batch - len(chunk), 0)])  # one compiled shape
            for p, im in zip(paths[i:i + batch], upscale(low, cfg.seed + i)):
                tmp = p.with_name(f".{p.name}.tmp")
                Image.fromarray(im).save(tmp, format="PNG")
                tmp.replace(p)  # atomic: a kill leaves no half-written image
            if stop is not None:
                _check_stop(stop, log, "while upscaling class images")
        stamp.write_text(json.dumps(spec, indent=1) + "\n")

    _on_process_0(generate, "class_images_sr")
    return np.stack([load_image(p, cfg.sr_resolution) for p in paths])


def _x4_upscaler(cfg: TrainConfig, pipe) -> Callable:
    from dreambooth_jax.diffusion.pipeline import UpscaleSampler

    sampler = UpscaleSampler(pipe, sampler="ddim", steps=cfg.class_steps)
    return lambda low, seed: sampler(low, [cfg.class_prompt] * len(low), noise_level=cfg.sr_noise_level, seed=seed,
                                     guidance=cfg.class_guidance).images


def _resize_uint8(im: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(im).convert("RGB").resize((size, size), Image.BICUBIC))


def generate_class_images(cfg: TrainConfig, pipe, folder: Path, log, batch_size: int = 4,
                          stop: StopSignal | None = None) -> list[Path]:
    """Sample ``num_class_images`` "a [class]" images with the frozen model (the paper's prior).
    A SIGTERM (``stop``) ends it after the batch in flight; the images written are kept."""
    from tqdm.auto import tqdm

    from dreambooth_jax.class_images import ClassImageSpec, ensure_class_images, model_fingerprint
    from dreambooth_jax.diffusion.pipeline import BaseSampler

    spec = ClassImageSpec(prompt=cfg.class_prompt, num=cfg.num_class_images, sampler=cfg.class_sampler,
                          steps=cfg.class_steps, guidance=cfg.class_guidance, height=cfg.resolution,
                          width=cfg.resolution, seed=cfg.seed)
    sampler = None
    bar = None

    def sample_fn(prompts, seeds):
        nonlocal sampler
        if sampler is None:
            log(f"generating class images '{spec.prompt}' into {folder} ({spec.sampler}, {spec.steps} steps)")
            sampler = BaseSampler(pipe, sampler=spec.sampler, steps=spec.steps)
        k = len(seeds)
        seeds = list(seeds) + [seeds[-1]] * (batch_size - k)  # constant batch: one compilation
        lat = np.concatenate([sampler.initial_latents(1, spec.height, spec.width, s) for s in seeds])
        return sampler(list(prompts) + [prompts[0]] * (batch_size - k), latents=lat, seed=seeds[0],
                       guidance=spec.guidance, height=spec.height, width=spec.width,
                       negative_prompts=spec.negative_prompt).images[:k]

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc="class images", unit="img")
        bar.n = done
        bar.refresh()
        if stop is not None and stop.requested and done < total:
            bar.close()
            _check_stop(stop, log, f"during class-image generation ({done} of {total} new images written)")

    paths = ensure_class_images(folder, spec, model_fingerprint(pipe.path), sample_fn, batch_size=batch_size,
                                progress=progress)
    if bar is not None:
        bar.close()
    return paths


def make_validator(cfg: TrainConfig, pipe, folder: Path, log, build: Callable | None = None,
                   draw: Callable | None = None):
    """A step callback writing a grid of ``validation_prompts`` (fixed seed) every
    ``validation_every`` steps, and at the end (called with ``final``, the trained models).
    build() -> a sampler whose params the trained ones replace (built once, on first use);
    draw(sampler) -> uint8 images. By default Stable Diffusion's BaseSampler (ddim)."""
    def default_build():
        from dreambooth_jax.diffusion.pipeline import BaseSampler

        return BaseSampler(pipe, sampler="ddim", steps=cfg.validation_steps)

    build = build or default_build
    draw = draw or (lambda sampler: sampler(cfg.validation_prompts, height=cfg.resolution, width=cfg.resolution,
                                            seed=cfg.validation_seed, guidance=7.5).images)
    holder = {}

    def validate(step, metrics, state, final=None):
        last = final is not None
        if not cfg.validation_prompts or (not last and (not cfg.validation_every or step % cfg.validation_every)):
            return
        if jax.process_index() != 0:
            return
        if "sampler" not in holder:
            holder["sampler"] = build()
        sampler = holder["sampler"]
        set_trained_params(sampler, {k: nnx.state(m) for k, m in final.items()} if last else state.params)
        write_validation_grid(draw(sampler), folder, step, log)

    return validate


def set_trained_params(sampler, trained: dict) -> None:
    """Put the trained parameters (whole models, or only their LoRA adapters) into ``sampler``'s
    params. A host copy: the sampler's other params live on one device, the trained ones on the mesh."""
    trained = jax.device_get(trained)
    params = dict(sampler.params)
    for name, part in trained.items():
        m = nnx.merge(sampler.graphdefs[name], params[name])
        nnx.update(m, part)
        params[name] = nnx.state(m)
    sampler.params = params


def write_validation_grid(images: np.ndarray, folder: Path, step: int, log) -> None:
    """``folder/step_NNNNNN.png`` (a grid) and the images in TensorBoard."""
    from dreambooth_jax.data.images import save_image_grid

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.png"
    save_image_grid(images, path)
    with _tensorboard(folder.parent / "tensorboard") as tb:
        for i, im in enumerate(images):
            tb.add_image(f"validation/{i}", im, step, dataformats="HWC")
    log(f"validation images: {path}")


def run(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """DreamBooth on ``cfg.model`` (base stage, then the SR stage if ``cfg.sr_model``); returns
    the exported diffusers folder of the base model (the SR model's when ``max_train_steps`` is 0:
    the base stays frozen). Stable Diffusion (+ the x4 upscaler) here, DeepFloyd IF stage I (+ stage
    II) in :mod:`dreambooth_jax.training.run_if`.

    Before anything is loaded: every setting, path and device count is checked (``preflight``),
    ``output_dir`` is locked for this run and checked against its checkpoints; only then is
    ``config.json`` written (an earlier run's is kept). SIGTERM at any point saves what can be
    saved and exits 0; a full disk or read-only folder is one line, and a rerun resumes."""
    from dreambooth_jax.training.preflight import check_resume, preflight
    from dreambooth_jax.training.rundir import RunLock, filesystem_error, prepare_output_dir, write_config

    out_dir = Path(cfg.output_dir)
    main = jax.process_index() == 0
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(StopSignal())
        folders = preflight(cfg)
        if main:  # multi-host: one process owns the (shared) folder
            prepare_output_dir(out_dir)
            stack.enter_context(RunLock(out_dir))
        check_resume(cfg)
        if main:
            write_config(out_dir, config_dict(cfg))
        try:
            return _run(cfg, folders, out_dir, stop, log)
        except (DreamboothError, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:
            err = filesystem_error(e, out_dir)
            if err is None:
                raise
            raise err from e


def _check_stop(stop: StopSignal, log, what: str) -> None:
    if stop.requested:
        log(f"stop requested {what}; what is done is kept (class images, checkpoints). Rerun the same "
            "command to continue")
        raise Preempted()


def _run(cfg: TrainConfig, folders: dict, out_dir: Path, stop: StopSignal, log) -> Path:
    from dreambooth_jax.models import ModelOptions, load_pretrained

    if is_if_folder(folders["model"]):
        from dreambooth_jax.training.run_if import run_if

        return run_if(cfg, folders, out_dir, stop, log)
    opts = ModelOptions(dtype=jnp.dtype(cfg.dtype), remat=cfg.remat, attention=cfg.attention)
    pipe = load_pretrained(folders["model"], opts)
    _check_stop(stop, log, "while loading the model")
    exported = None
    if cfg.max_train_steps:
        exported = _train_base(cfg, pipe, out_dir, stop, log)
    else:
        log("max_train_steps is 0: the base model is not trained (it draws the class images); SR stage only")
        if cfg.with_prior_preservation:  # drawn if missing: the SR stage upscales them
            _class_images(cfg, pipe, out_dir, log, stop=stop)
    if cfg.sr_model:
        _check_stop(stop, log, "after the base stage")
        sr = run_sr_stage(cfg, opts, out_dir, log, stop=stop, folder=folders["sr_model"])
        exported = exported or sr
    return exported


def is_if_folder(folder: Path) -> bool:
    """Whether ``folder`` (a resolved model folder) holds a DeepFloyd IF pipeline."""
    from dreambooth_jax.models.if_loading import if_kind

    return if_kind(json.loads((Path(folder) / "model_index.json").read_text())) is not None


def _train_base(cfg: TrainConfig, pipe, out_dir: Path, stop: StopSignal, log) -> Path:
    """The base stage of a Stable Diffusion run: subject (+ class) images -> latents, prompts ->
    embeddings (or ids when the text encoder trains), training, validation, export."""
    from dreambooth_jax.diffusion.schedules import schedule_from_config

    inst = _load_instance_images(cfg.instance_dir, cfg.resolution, cfg.flip, cfg.center_crop, cfg.seed)
    log(f"{len(inst)} instance image(s){' (with flips)' if cfg.flip else ''} at {cfg.resolution}px")
    vcfg = pipe.vae.config
    add_adapters(cfg, pipe, log)
    text_trained = cfg.train_text_encoder or cfg.lora_text_encoder
    images = [inst]
    if cfg.with_prior_preservation:
        cls = _class_images(cfg, pipe, out_dir, log, stop=stop)
        images.append(cls)
        log(f"{len(cls)} class image(s) for prior preservation (lambda={cfg.prior_loss_weight})")
    all_images = np.concatenate(images).astype(np.float32)
    mean, logvar = encode_images(pipe.vae, all_images)
    is_class = np.arange(len(all_images)) >= len(inst)
    prompts = [cfg.instance_prompt, cfg.class_prompt]
    if text_trained:  # the step runs the text encoder on the ids, with gradients
        from dreambooth_jax.models.loading import tokenize

        data = StageData(mean, logvar, is_class, None,
                         input_ids=tokenize(pipe.tokenizer, prompts, pipe.text_encoder.config.max_position_embeddings))
    else:  # frozen: embeddings computed once
        data = StageData(mean, logvar, is_class, encode_prompts(pipe, prompts))
    schedule = schedule_from_config(pipe.scheduler_config)
    step_cfg = StepConfig(prior_loss_weight=cfg.prior_loss_weight if cfg.with_prior_preservation else 0.0,
                          min_snr_gamma=cfg.min_snr_gamma, offset_noise=cfg.offset_noise,
                          ema_decay=cfg.ema_decay, latent_scale=vcfg.scaling_factor, latent_shift=vcfg.shift_factor)
    validate = make_validator(cfg, pipe, out_dir / "base" / "validation", log)
    trained, history = train_stage(pipe.unet, schedule, data, len(inst), cfg, step_cfg, lr=cfg.learning_rate,
                                   steps=cfg.max_train_steps, out_dir=out_dir / "base", log=log, on_step=validate,
                                   text_encoder=pipe.text_encoder if text_trained else None, stop=stop)
    trained = trained if text_trained else {"unet": trained}
    validate(cfg.max_train_steps, None, None, final=trained)
    exported = out_dir / "model"
    if jax.process_index() == 0:
        _write_json(out_dir / "base" / "metrics.json", history)
        _export(cfg, pipe.path, exported, out_dir / "lora", trained, log)
    return exported


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def run_sr_stage(cfg: TrainConfig, opts, out_dir: Path, log, *, stop: StopSignal | None = None,
                 folder: Path | None = None) -> Path:
    """Fine-tune the x4 upscaler on (low-res, high-res) pairs of the subject photos, with the
    low-res noise augmentation lowered to ``sr_noise_level`` (the paper lowers it so that fine
    subject texture survives), plus class pairs for prior preservation."""
    from dreambooth_jax.models import load_pretrained

    pipe = load_pretrained(folder or cfg.sr_model, opts)
    if not pipe.is_upscaler:
        raise DreamboothError(f"sr_model {cfg.sr_model} is not an x4 upscaler pipeline (no low_res_scheduler)")
    add_adapters(cfg, pipe, log, text_encoder=False)
    hi = _load_instance_images(cfg.instance_dir, cfg.sr_resolution, cfg.flip, cfg.center_crop, cfg.seed)
    images = [hi]
    if cfg.with_prior_preservation:
        images.append(_sr_class_images(cfg, pipe, out_dir, log, stop=stop))
    hi_all = np.concatenate(images).astype(np.float32)
    low = np.asarray(jax.image.resize(hi_all, (len(hi_all), cfg.sr_resolution // 4, cfg.sr_resolution // 4, 3),
                                      "cubic", antialias=True)).clip(-1, 1)
    mean, logvar = encode_images(pipe.vae, hi_all)
    is_class = np.arange(len(hi_all)) >= len(hi)
    context = encode_prompts(pipe, [cfg.instance_prompt, cfg.class_prompt])
    data = StageData(mean, logvar, is_class, context, low_res=low)
    vcfg = pipe.vae.config
    return train_sr_and_export(cfg, pipe, data, len(hi), pipe.low_res_scheduler_config, out_dir, log, stop,
                               latent_scale=vcfg.scaling_factor, latent_shift=vcfg.shift_factor)


def train_sr_and_export(cfg: TrainConfig, pipe, data: StageData, n_inst: int, low_res_scheduler_config: dict,
                        out_dir: Path, log, stop: StopSignal | None, *, latent_scale: float, latent_shift: float,
                        kohya: bool = True) -> Path:
    """The SR stage's training on ``data`` (pairs) and export to ``out_dir/sr_model`` (+ sr_lora):
    the x4 upscaler's and DeepFloyd IF stage II's common part."""
    from dreambooth_jax.diffusion.schedules import schedule_from_config

    step_cfg = StepConfig(prior_loss_weight=cfg.prior_loss_weight if cfg.with_prior_preservation else 0.0,
                          min_snr_gamma=cfg.min_snr_gamma, ema_decay=cfg.ema_decay, sr_noise_level=cfg.sr_noise_level,
                          latent_scale=latent_scale, latent_shift=latent_shift)
    unet, history = train_stage(pipe.unet, schedule_from_config(pipe.scheduler_config), data, n_inst, cfg, step_cfg,
                                lr=cfg.sr_learning_rate, steps=cfg.sr_max_train_steps, out_dir=out_dir / "sr",
                                low_res_schedule=schedule_from_config(low_res_scheduler_config), log=log, stop=stop)
    if jax.process_index() == 0:
        _write_json(out_dir / "sr" / "metrics.json", history)
        _export(cfg, pipe.path, out_dir / "sr_model", out_dir / "sr_lora", {"unet": unet}, log, kohya=kohya)
    return out_dir / "sr_model"


def lora_spec(cfg: TrainConfig, component: str = "unet", model=None):
    """The adapters of ``component`` (``model``: the UNet, whose layers can extend a preset) for
    this config (None: full fine-tuning)."""
    from dreambooth_jax.models.lora import TEXT_ENCODER_ATTENTION, LoRASpec, resolve_targets

    if not cfg.lora_rank:
        return None
    targets = TEXT_ENCODER_ATTENTION if component == "text_encoder" else resolve_targets(cfg.lora_targets, model)
    return LoRASpec(rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=targets, dropout=cfg.lora_dropout,
                    init=cfg.lora_init)


def add_adapters(cfg: TrainConfig, pipe, log, text_encoder: bool = True) -> None:
    """LoRA mode: adapters on the UNet (and the text encoder with lora_text_encoder), in place."""
    from dreambooth_jax.models.lora import add_lora, adapter_count

    spec = lora_spec(cfg, model=pipe.unet)
    if spec is None:
        return
    names = add_lora(pipe.unet, spec, seed=cfg.seed)
    what = f"{len(names)} UNet layers ({cfg.lora_targets})"
    n = adapter_count(pipe.unet)
    if text_encoder and cfg.lora_text_encoder:
        te = add_lora(pipe.text_encoder, lora_spec(cfg, "text_encoder"), seed=cfg.seed + 1, component="text_encoder")
        what += f" and {len(te)} text-encoder layers"
        n += adapter_count(pipe.text_encoder)
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(pipe.unet, nnx.Param)))
    log(f"LoRA rank {spec.rank}, alpha {spec.rank if spec.alpha is None else spec.alpha} on {what}: "
        f"{n / 1e6:.2f} M trainable parameters ({100 * n / max(total, 1):.2f}% of the UNet)")


def _export(cfg: TrainConfig, source: Path, folder: Path, lora_folder: Path, trained: dict, log,
            kohya: bool = True) -> None:
    """The fine-tuned diffusers folder (adapters merged); in LoRA mode also the adapter files:
    diffusers' pytorch_lora_weights.safetensors and (``kohya``) the kohya layout (A1111 / ComfyUI,
    which run Stable Diffusion only)."""
    from dreambooth_jax.models import export_pipeline
    from dreambooth_jax.models.lora import has_lora, merge_lora

    if any(has_lora(m) for m in trained.values()):
        from dreambooth_jax.models.lora_io import save_lora

        lora_folder.mkdir(parents=True, exist_ok=True)
        adapted = {k: m for k, m in trained.items() if has_lora(m)}
        save_lora(lora_folder / "pytorch_lora_weights.safetensors", adapted, format="diffusers", overwrite=True)
        if kohya:
            save_lora(lora_folder / "lora_kohya.safetensors", adapted, format="kohya", overwrite=True)
        log(f"exported the LoRA adapters to {lora_folder} (diffusers: pytorch_lora_weights.safetensors"
            + (", kohya / A1111 / ComfyUI: lora_kohya.safetensors)" if kohya else ")"))
        trained = {k: merge_lora(m) for k, m in trained.items()}
    export_pipeline(source, folder, trained, overwrite=True, dtype=cfg.export_dtype or None)
    log(f"exported the fine-tuned model{' (adapters merged)' if cfg.lora_rank else ''} to {folder}")
