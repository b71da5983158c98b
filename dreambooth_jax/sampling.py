"""Sampling entry point used by the CLI: check, load, build the compiled stages, write images + settings.

Everything that can be checked without the models is checked first (:func:`check_sample_config`,
the output folder, that both model folders exist and are of the right kind), so a typo costs
seconds, not a model load.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from dreambooth_jax.errors import ConfigError, DreamboothError

#: ``--dtype`` values.
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
#: The SD x4 upscaler's ``max_noise_level`` (used when a pipeline's model_index.json omits it).
DEFAULT_MAX_NOISE_LEVEL: int = 350


@dataclasses.dataclass
class SampleConfig:
    """What ``dreambooth-jax sample`` does; field names follow the CLI options.

    ``model`` is a Stable Diffusion pipeline (``sr_model``: an optional x4 upscaler) or a DeepFloyd
    IF stage I folder (``sr_model``: an optional IF stage II folder, ``sr2_model``: an optional x4
    upscaler after stage II, as IF's cascade uses it; 256 -> 1024 px with the real models).

    Fields left None take the model family's default (:data:`FAMILY_DEFAULTS`; the manifest
    records the values used): Stable Diffusion 50 ddim steps, guidance 7.5, 512 px, SR 50 steps,
    guidance 9, noise level 20; IF stage I 100 ddpm steps, guidance 7, 64 px, stage II 50 steps,
    guidance 4, noise level 250 (4x stage I's size), x4 upscaler 50 steps, guidance 9, noise level
    100 (as diffusers' IF docs use it).

    ``sr_*`` are only used (and checked) with ``sr_model``, ``sr2_*`` with ``sr2_model``. ``lora``
    files are folded into the base model's UNet / text encoder in order, ``lora_scale`` times their
    own alpha/rank (see :func:`lora_scales`); ``sr_lora`` into the SR model's (for IF: stage I's and
    stage II's UNet; text-encoder adapters are refused, T5 takes none). ``eta`` only applies to the ``ddim`` scheduler: a
    non-zero eta with another scheduler is an error, not silently ignored. The scheduler is used
    by every stage.
    """

    model: str
    prompts: list[str]
    out: str
    negative_prompt: str = ""
    sr_model: str = ""
    num_images: int = 1  # per prompt
    steps: int | None = None
    sr_steps: int | None = None
    scheduler: str | None = None
    guidance: float | None = None
    sr_guidance: float | None = None
    sr_noise_level: int | None = None
    eta: float = 0.0
    seed: int = 0
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    allow_pickle: bool = False
    lora: list[str] = dataclasses.field(default_factory=list)  # LoRA files folded into the base model
    lora_scale: list[float] = dataclasses.field(default_factory=list)  # none: 1; one: all files; else per file
    sr_lora: list[str] = dataclasses.field(default_factory=list)  # the same for the SR model
    sr_lora_scale: list[float] = dataclasses.field(default_factory=list)
    sr2_model: str = ""  # IF only: the x4 upscaler after stage II
    sr2_steps: int | None = None
    sr2_guidance: float | None = None
    sr2_noise_level: int | None = None


#: What a None field of :class:`SampleConfig` becomes, per model family ("sd": Stable Diffusion,
#: "if": DeepFloyd IF; diffusers' IFPipeline / IFSuperResolutionPipeline defaults, and for the x4
#: upscaler after IF stage II the noise level 100 of diffusers' IF docs).
FAMILY_DEFAULTS: dict[str, dict] = {
    "sd": dict(steps=50, scheduler="ddim", guidance=7.5, height=512, width=512, sr_steps=50, sr_guidance=9.0,
               sr_noise_level=20, sr2_steps=None, sr2_guidance=None, sr2_noise_level=None),
    "if": dict(steps=100, scheduler="ddpm", guidance=7.0, height=64, width=64, sr_steps=50, sr_guidance=4.0,
               sr_noise_level=250, sr2_steps=50, sr2_guidance=9.0, sr2_noise_level=100),
}


def with_family_defaults(cfg: SampleConfig, family: str) -> SampleConfig:
    """``cfg`` with its None fields set to ``family``'s defaults (:data:`FAMILY_DEFAULTS`); the options of
    an SR stage that is not run (no ``sr_model`` / ``sr2_model``) stay None."""
    unused = tuple(f"{stage}_" for stage in ("sr", "sr2") if not getattr(cfg, f"{stage}_model"))
    return dataclasses.replace(cfg, **{k: v for k, v in FAMILY_DEFAULTS[family].items()
                                       if getattr(cfg, k) is None and not k.startswith(unused)})


def scheduler_names() -> tuple[str, ...]:
    """The valid ``--scheduler`` (and class-image ``--sampler``) names: ``samplers.SAMPLER_NAMES``
    (every sampler, plus ``<name>_karras`` for those that take Karras sigmas). Imports JAX."""
    from dreambooth_jax.diffusion.samplers import SAMPLER_NAMES

    return tuple(SAMPLER_NAMES)


def check_scheduler(name: object, option: str = "--scheduler") -> None:
    """Raise ConfigError (listing the valid names) unless ``name`` is in :func:`scheduler_names`."""
    names = scheduler_names()
    if name not in names:
        raise ConfigError(f"{option}: unknown scheduler {name!r}; choose one of {', '.join(names)}")


def check_count(value: object, option: str) -> None:
    """Raise ConfigError unless ``value`` is an int >= 1 (steps, sizes, image counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{option} must be a whole number >= 1, got {value!r}")
    if value < 1:
        raise ConfigError(f"{option} must be >= 1, got {value}")


def check_guidance(value: object, option: str = "--guidance") -> None:
    """Raise ConfigError unless ``value`` is a finite number >= 0.

    The guided prediction is ``uncond + g * (cond - uncond)``: 0 ignores the prompt, 1 is the
    plain conditional model, Stable Diffusion is usually sampled at 5-10. Values in [0, 1) are
    legal (see :func:`guidance_note`); negative ones push away from the prompt, which is almost
    always a typo, so they are refused.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{option} must be a number >= 0, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number >= 0, got {value}")
    if value < 0:
        raise ConfigError(f"{option} must be >= 0, got {value} (0 ignores the prompt, 1 is no guidance, "
                          "5-10 is usual for Stable Diffusion)")


def guidance_note(value: float, option: str = "--guidance") -> str | None:
    """A one-line note for a legal but unusual guidance scale (below 1), else None."""
    if value < 1:
        return (f"note: {option} {value} is below 1, which weakens the prompt (0 ignores it, 1 is the plain "
                "conditional model; 5-10 is usual)")
    return None


def check_eta(eta: object, scheduler: str) -> None:
    """Raise ConfigError unless ``eta`` is in [0, 1], and 0 for a scheduler other than ddim.

    eta scales DDIM's noise: 0 is deterministic DDIM, 1 gives DDPM's posterior variance (as in
    diffusers' DDIMScheduler). Above 1 the DDIM update takes the square root of a negative
    number at some steps (NaN images), below 0 is meaningless. The other schedulers have no eta
    (ddpm and euler_a are always fully ancestral), so a non-zero value would be silently ignored:
    that is refused too.
    """
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)) \
            or not math.isfinite(eta) or not 0 <= eta <= 1:
        raise ConfigError(f"--eta must be in [0, 1], got {eta!r} (0: deterministic DDIM, 1: DDPM-like noise)")
    if eta != 0 and scheduler != "ddim":
        raise ConfigError(f"--eta {eta} only applies to the ddim scheduler ({scheduler} has no eta); use "
                          "--scheduler ddim or drop --eta")


def check_noise_level(level: object, max_level: int | None = DEFAULT_MAX_NOISE_LEVEL, model: str = "",
                      option: str = "--sr-noise-level", what: str = "max_noise_level") -> None:
    """Raise ConfigError (naming ``option``) unless ``level`` is an int in [0, ``max_level``]
    (None: any int >= 0; ``what`` names where the maximum comes from in ``model``)."""
    where = f" ({what} of {model})" if model else ""
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
        raise ConfigError(f"{option} must be a whole number >= 0, got {level!r}")
    if max_level is not None and level > max_level:
        raise ConfigError(f"{option} must be in [0, {max_level}]{where}, got {level!r}")


def lora_scales(files: list[str], scales: list[float], option: str = "--lora") -> list[float]:
    """One scale per LoRA file: none given -> 1.0 each, one -> that one for all, else one per file in
    order. Raises ConfigError (naming ``option``) for another count or a non-finite scale."""
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float, np.integer, np.floating)) or not math.isfinite(s):
            raise ConfigError(f"{option}-scale must be a finite number, got {s!r}")
    if scales and not files:
        raise ConfigError(f"{option}-scale is given without {option}")
    if len(scales) not in (0, 1, len(files)):
        raise ConfigError(f"give {option}-scale once (for all files) or once per {option} file: got {len(scales)} "
                          f"scales for {len(files)} files")
    if len(scales) <= 1:
        return [float(scales[0]) if scales else 1.0] * len(files)
    return [float(s) for s in scales]


def check_lora_files(files: object, option: str = "--lora") -> None:
    """Raise ConfigError (naming ``option`` and the path) unless ``files`` is a list of existing files."""
    if isinstance(files, (str, Path)) or not isinstance(files, (list, tuple)):
        raise ConfigError(f"{option} must be a list of LoRA file paths, got {files!r}")
    for f in files:
        path = Path(f).expanduser()
        if path.is_dir():
            raise ConfigError(f"{option} {f} is a folder; give the LoRA .safetensors file")
        if not path.is_file():
            raise ConfigError(f"{option} {f}: no such file")


def check_sample_config(cfg: SampleConfig) -> None:
    """Check every option that does not need the models; raise ConfigError naming the option.

    None fields (the model family's default, see :class:`SampleConfig`) are not checked: :func:`run`
    checks the config again once they are filled in. The size's multiple (VAE factor x UNet
    downsampling) and the noise levels' maxima (the upscaler's max_noise_level, IF stage II's
    image_noising_scheduler) need the model folders: :func:`run` checks them before any weights
    are loaded or compiled.
    """
    if isinstance(cfg.prompts, str) or not cfg.prompts or not all(isinstance(p, str) for p in cfg.prompts):
        raise ConfigError("give at least one --prompt (a list of strings)")
    for option, value in (("--num-images", cfg.num_images), ("--steps", cfg.steps), ("--height", cfg.height),
                          ("--width", cfg.width)):
        if value is not None:
            check_count(value, option)
    if cfg.scheduler is not None:
        check_scheduler(cfg.scheduler)
    if cfg.guidance is not None:
        check_guidance(cfg.guidance, "--guidance")
    check_eta(cfg.eta, "ddim" if cfg.scheduler is None else cfg.scheduler)  # again once the default is known
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, (int, np.integer)):
        raise ConfigError(f"--seed must be a whole number, got {cfg.seed!r}")
    for prefix, model in (("--sr", cfg.sr_model), ("--sr2", cfg.sr2_model)):
        attr = prefix[2:]
        steps, guidance, level = (getattr(cfg, f"{attr}_{k}") for k in ("steps", "guidance", "noise_level"))
        if model:
            if steps is not None:
                check_count(steps, f"{prefix}-steps")
            if guidance is not None:
                check_guidance(guidance, f"{prefix}-guidance")
            if level is not None:
                check_noise_level(level, None, option=f"{prefix}-noise-level")  # the maximum: in run()
        else:
            given = [f"{prefix}-{k.replace('_', '-')}" for k, v in (("steps", steps), ("guidance", guidance),
                                                                      ("noise_level", level)) if v is not None]
            if attr == "sr" and (cfg.sr_lora or cfg.sr_lora_scale):
                given.append("--sr-lora" if cfg.sr_lora else "--sr-lora-scale")
            if given:
                stage = "x4 upscaling stage" if attr == "sr" else "third (x4 upscaler) stage of an IF cascade"
                raise ConfigError(f"{given[0]} is only used by the {stage}; add {prefix}-model or drop {given[0]}")
    for option, files, scales in (("--lora", cfg.lora, cfg.lora_scale), ("--sr-lora", cfg.sr_lora, cfg.sr_lora_scale)):
        check_lora_files(files, option)
        lora_scales(list(files), list(scales), option)


def check_output_folder(path: str | Path, what: str = "--out") -> Path:
    """``path`` as a Path if it is a folder we may write in, or one that can be created there.

    Creates nothing. Raises ConfigError (naming ``what``) if ``path`` is a file or a dangling
    symlink, or if a would-be parent is a file or not writable. Whether an existing folder may
    be used (empty, or holding a matching manifest) is the caller's rule.
    """
    out = Path(path).expanduser()
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {out}: no permission to write in this folder")
        return out
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"{what} {out} is a dangling symlink; give a new or empty folder")
    if out.exists():
        raise ConfigError(f"{what} {out} is a file, not a folder; give a new or empty folder (files are "
                          "never overwritten)")
    ancestor = out.absolute().parent
    while not ancestor.exists() and not ancestor.is_symlink() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        kind = "a dangling symlink" if ancestor.is_symlink() and not ancestor.exists() else "a file"
        raise ConfigError(f"cannot create {what} {out}: {ancestor} is {kind}, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create {what} {out}: no permission to write in {ancestor}")
    return out


def _model_index(model: str, option: str) -> tuple[Path, dict]:
    """The resolved folder of ``model`` and its model_index.json (read without loading weights)."""
    from dreambooth_jax.models.loading import resolve_model_path

    try:
        root = resolve_model_path(model)
    except DreamboothError as e:
        raise type(e)(f"{option}: {e}") from None
    path = root / "model_index.json"
    if not path.is_file():
        raise ConfigError(f"{option} {model}: no model_index.json in {root} (expected a diffusers pipeline folder)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{option} {model}: cannot read {path}: {e}") from None
    if not isinstance(index, dict):
        raise ConfigError(f"{option} {model}: {path} does not hold a JSON object")
    return root, index


def read_lora_files(files: list[str], scales: list[float], option: str) -> list[tuple[str, dict, float]]:
    """[(file, read_lora(file), scale)]: each file parsed (not yet matched to a model), before any model loads."""
    if not files:
        return []
    from dreambooth_jax.models.lora_io import COMPONENTS, read_lora

    out = []
    for f, scale in zip(files, lora_scales(list(files), list(scales), option)):
        try:
            adapters = read_lora(Path(f).expanduser())
        except DreamboothError as e:
            raise type(e)(f"{option}: {e}") from None
        other = sorted(set(adapters) - set(COMPONENTS))
        if other:
            raise ConfigError(f"{option} {f} holds adapters for {', '.join(other)}, which a Stable Diffusion "
                              f"pipeline does not have (a LoRA for another model family?)")
        out.append((str(f), adapters, scale))
    return out


def apply_lora_files(pipe, loras: list[tuple[str, dict, float]], option: str, progress=print) -> None:
    """Fold each LoRA into ``pipe``'s UNet / text encoder in place (the pipeline's models are replaced)."""
    from dreambooth_jax.models.lora_io import apply_lora

    for f, adapters, scale in loras:
        layers = ", ".join(f"{len(w)} {c} layers" for c, w in adapters.items())
        progress(f"applying LoRA {f} (scale {scale:g}; {layers})")
        for component, weights in adapters.items():
            try:
                model = apply_lora(getattr(pipe, component), weights, scale, source=f, component=component)
            except DreamboothError as e:
                raise type(e)(f"{option}: {e}") from None
            setattr(pipe, component, model)


def enable_compilation_cache(path: str | None = None) -> None:
    """JAX's persistent compilation cache, so a second run does not recompile."""
    import jax

    from jax.experimental.compilation_cache import compilation_cache

    path = path or os.environ.get("DREAMBOOTH_JAX_CACHE", str(Path.home() / ".cache" / "dreambooth_jax" / "xla"))
    if jax.config.jax_compilation_cache_dir not in (None, path):
        compilation_cache.reset_cache()  # a cache opened on another folder (library use) is reopened here
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _index_kind(model: str, option: str) -> tuple[Path, dict, str]:
    """(folder, model_index.json, kind): kind is "I" / "II" (DeepFloyd IF stages), "upscaler" (an SD x4
    upscaler: has a low_res_scheduler) or "sd" (another diffusers pipeline: text-to-image)."""
    root, index = _model_index(model, option)
    from dreambooth_jax.models.if_loading import if_kind

    try:
        kind = if_kind(index)
    except ConfigError as e:
        raise ConfigError(f"{option} {model}: {e}") from None
    return root, index, kind or ("upscaler" if "low_res_scheduler" in index else "sd")


def _max_noise_level(model: str, index: dict, option: str) -> int:
    """An x4 upscaler's max_noise_level (model_index.json, else :data:`DEFAULT_MAX_NOISE_LEVEL`)."""
    try:
        return int(index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))
    except (TypeError, ValueError):
        raise ConfigError(f"{option} {model}: max_noise_level in model_index.json is not a number: "
                          f"{index.get('max_noise_level')!r}") from None


def _check_out_empty(out: Path) -> None:
    try:
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"output folder {out} is not empty; choose a new one (nothing is overwritten)")
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot read the folder: {e}") from None


def _guidance_notes(cfg: SampleConfig, progress) -> None:
    """The notes on unusual guidance scales, for each stage that runs."""
    notes = [guidance_note(cfg.guidance, "--guidance")]
    if cfg.sr_model:
        notes.append(guidance_note(cfg.sr_guidance, "--sr-guidance"))
    if cfg.sr2_model:
        notes.append(guidance_note(cfg.sr2_guidance, "--sr2-guidance"))
    for note in filter(None, notes):
        progress(note)


def _prepare(cfg: SampleConfig):
    """(model options, the prompt of each image, their count, the mesh that splits them or None)."""
    import jax.numpy as jnp

    from dreambooth_jax.models import ModelOptions

    enable_compilation_cache()
    prompts = [p for p in cfg.prompts for _ in range(cfg.num_images)]
    return ModelOptions(dtype=jnp.dtype(cfg.dtype)), prompts, len(prompts), _mesh(len(prompts))


def run(cfg: SampleConfig, progress=print) -> dict:
    """Sample ``num_images`` per prompt: a Stable Diffusion base stage, then the x4 SR stage if
    ``sr_model``; or a DeepFloyd IF cascade (stage I, stage II if ``sr_model``, the x4 upscaler if
    ``sr2_model``; see :func:`_run_if`).

    Order: options (:func:`check_sample_config`), the output folder, the model folders (that
    they exist and their kinds form a cascade: ``model`` text-to-image, ``sr_model`` an x4 upscaler
    for Stable Diffusion or IF stage II for IF stage I; the noise levels within the models'
    maxima), the model family's defaults for the options left None (checked again), the LoRA
    files (that they are LoRA files), then the models are loaded, the LoRAs folded in (their layers
    and shapes checked) and the image size is checked against the models' multiples, and only then
    is anything sampled or the output folder created. Errors are :class:`ConfigError` /
    :class:`DreamboothError` with one-line messages.
    """
    check_sample_config(cfg)
    out = check_output_folder(cfg.out, "--out")
    _check_out_empty(out)
    base_root, index, kind = _index_kind(cfg.model, "--model")
    if kind == "upscaler":
        raise ConfigError(f"--model {cfg.model} is an x4 upscaler pipeline; give a text-to-image model as --model "
                          "and the upscaler as --sr-model")
    if kind == "II":
        raise ConfigError(f"--model {cfg.model} is a DeepFloyd IF stage II (super-resolution) pipeline; give the IF "
                          "stage I folder as --model and this one as --sr-model")
    if kind == "I":
        return _run_if(with_family_defaults(cfg, "if"), out, base_root, index, progress)
    if cfg.sr2_model:
        raise ConfigError(f"--sr2-model is the third stage of a DeepFloyd IF cascade (--model: IF stage I, --sr-model: "
                          f"IF stage II), and --model {cfg.model} is not an IF pipeline; with Stable Diffusion give "
                          "the x4 upscaler as --sr-model")
    cfg = with_family_defaults(cfg, "sd")
    check_sample_config(cfg)
    sr_root = None
    if cfg.sr_model:
        sr_root, sr_index, sr_kind = _index_kind(cfg.sr_model, "--sr-model")
        if sr_kind in ("I", "II"):
            raise ConfigError(f"--sr-model {cfg.sr_model} is a DeepFloyd IF stage {sr_kind} pipeline, and --model "
                              f"{cfg.model} is not an IF pipeline: a Stable Diffusion --model takes an x4 upscaler "
                              "as --sr-model (IF stage II follows an IF stage I --model)")
        if sr_kind != "upscaler":
            raise ConfigError(f"--sr-model {cfg.sr_model} is not an x4 upscaler pipeline (its model_index.json has "
                              "no low_res_scheduler)")
        check_noise_level(cfg.sr_noise_level, _max_noise_level(cfg.sr_model, sr_index, "--sr-model"), cfg.sr_model)
    loras = read_lora_files(cfg.lora, cfg.lora_scale, "--lora")
    sr_loras = read_lora_files(cfg.sr_lora, cfg.sr_lora_scale, "--sr-lora")
    _guidance_notes(cfg, progress)
    from dreambooth_jax.diffusion.pipeline import BaseSampler, UpscaleSampler
    from dreambooth_jax.models import load_pretrained

    opts, prompts, n, mesh = _prepare(cfg)
    timings = {}
    progress(f"loading {cfg.model}")
    pipe = load_pretrained(str(base_root), opts, allow_pickle=cfg.allow_pickle)
    apply_lora_files(pipe, loras, "--lora", progress)
    base = BaseSampler(pipe, sampler=cfg.scheduler, steps=cfg.steps, mesh=mesh)
    try:  # the size's multiple depends on the model: checked before the SR model is loaded
        latents = base.initial_latents(n, cfg.height, cfg.width, cfg.seed)  # what base() would draw
    except ConfigError as e:
        raise ConfigError(f"--height/--width: {e}") from None
    sr = None
    if cfg.sr_model:  # loaded before sampling: a bad SR model must not cost a base-stage run
        progress(f"loading SR model {cfg.sr_model}")
        sr_pipe = load_pretrained(str(sr_root), opts, allow_pickle=cfg.allow_pickle)
        apply_lora_files(sr_pipe, sr_loras, "--sr-lora", progress)
        sr = UpscaleSampler(sr_pipe, sampler=cfg.scheduler, steps=cfg.sr_steps, mesh=mesh)
    _mkdir(out)
    progress(f"sampling {n} image(s), {cfg.steps} {cfg.scheduler} steps at {cfg.height}x{cfg.width}")
    t0 = time.perf_counter()
    res = base(prompts, negative_prompts=cfg.negative_prompt, height=cfg.height, width=cfg.width,
               seed=cfg.seed, guidance=cfg.guidance, eta=cfg.eta, latents=latents)
    timings["base_s"] = time.perf_counter() - t0
    stages = {"base": res.images}
    if sr is not None:
        progress(f"upscaling x4 ({cfg.sr_steps} steps, noise level {cfg.sr_noise_level})")
        t0 = time.perf_counter()
        stages["sr"] = sr(res.images, prompts, negative_prompts=cfg.negative_prompt,
                          noise_level=cfg.sr_noise_level, seed=cfg.seed, guidance=cfg.sr_guidance,
                          eta=cfg.eta).images
        timings["sr_s"] = time.perf_counter() - t0
    return _write_outputs(cfg, "sd", out, stages, prompts, timings, progress)


def _mesh(n: int):
    """A mesh over all devices when the batch splits evenly over more than one, else None."""
    import jax

    from dreambooth_jax.sharding import make_mesh

    devices = jax.devices()
    return make_mesh() if len(devices) > 1 and n % len(devices) == 0 else None


def _mkdir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out}: {e}") from None


def _write_outputs(cfg: SampleConfig, family: str, out: Path, stages: dict, prompts: list[str], timings: dict,
                   progress) -> dict:
    """One PNG per image per stage (``<stage>_NNN.png``), a grid per stage, settings.json (the config
    with the family's defaults filled in, the per-image prompts, timings, files, devices)."""
    import jax
    from PIL import Image

    from dreambooth_jax.data.images import save_image_grid

    files = []
    try:
        for stage, images in stages.items():
            for i, im in enumerate(images):
                f = out / f"{stage}_{i:03d}.png"
                Image.fromarray(im).save(f)
                files.append(f.name)
            save_image_grid(images, out / f"{stage}_grid.png",
                            cols=cfg.num_images if len(cfg.prompts) > 1 else None)
        settings = dict(dataclasses.asdict(cfg), family=family, per_image_prompts=prompts, timings=timings,
                        files=files, devices=len(jax.devices()), backend=jax.default_backend())
        (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    except OSError as e:
        raise DreamboothError(f"cannot write the images to --out {out}: {e}") from None
    progress(f"wrote {len(files)} image(s) and grids to {out}")
    return settings


def _if_noising_max(model: str, root: Path, option: str) -> int:
    """The largest noise level IF stage II's image_noising_scheduler takes (num_train_timesteps - 1)."""
    path = root / "image_noising_scheduler" / "scheduler_config.json"
    try:
        n_train = int(json.loads(path.read_text()).get("num_train_timesteps", 1000))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{option} {model}: cannot read num_train_timesteps from {path}: {e}") from None
    return n_train - 1


def _run_if(cfg: SampleConfig, out: Path, root: Path, index: dict, progress) -> dict:
    """The DeepFloyd IF cascade: stage I (text -> ``height`` x ``width`` px), stage II (``sr_model``:
    4x that, conditioned on stage I's float samples), the x4 upscaler (``sr2_model``: 4x again,
    conditioned on stage II's float samples, with the upscaler's own CLIP text encoder).

    The prompts (and the negative prompt) are encoded once by stage I's T5 and reused by stage II
    (IF-II folders usually have no text encoder). Images: ``base_NNN.png`` (stage I),
    ``sr_NNN.png`` (stage II), ``sr2_NNN.png`` (upscaler), a grid each, settings.json.
    """
    check_sample_config(cfg)
    loras = read_lora_files(cfg.lora, cfg.lora_scale, "--lora")  # parsed before any model loads
    sr_loras = read_lora_files(cfg.sr_lora, cfg.sr_lora_scale, "--sr-lora")
    for option, parsed in (("--lora", loras), ("--sr-lora", sr_loras)):
        for f, adapters, _ in parsed:
            if set(adapters) - {"unet"}:
                raise ConfigError(f"{option} {f} holds text-encoder adapters; DeepFloyd IF's T5 takes none (the IF "
                                  "stages' LoRA files adapt the UNet only)")
    if index.get("text_encoder") is None or all(v is None for v in index.get("text_encoder") or [None]):
        raise ConfigError(f"--model {cfg.model}: this IF stage I folder names no text_encoder in its "
                          "model_index.json; sampling needs its T5 encoder to encode the prompts")
    sr_root = sr2_root = None
    if cfg.sr_model:
        sr_root, _, sr_kind = _index_kind(cfg.sr_model, "--sr-model")
        if sr_kind == "upscaler":
            raise ConfigError(f"--sr-model {cfg.sr_model} is a Stable Diffusion x4 upscaler, but an IF cascade's "
                              "--sr-model is the IF stage II folder; give the x4 upscaler as --sr2-model (after "
                              "stage II)")
        if sr_kind != "II":
            what = "IF stage I" if sr_kind == "I" else "text-to-image"
            raise ConfigError(f"--sr-model {cfg.sr_model} is a {what} pipeline, not a DeepFloyd IF stage II "
                              "(super-resolution) pipeline, which an IF --model needs as --sr-model")
        check_noise_level(cfg.sr_noise_level, _if_noising_max(cfg.sr_model, sr_root, "--sr-model"), cfg.sr_model,
                          what="image_noising_scheduler's last timestep")
    if cfg.sr2_model:
        if not cfg.sr_model:
            raise ConfigError("--sr2-model (the x4 upscaler) follows IF stage II: add --sr-model with the IF "
                              "stage II folder")
        sr2_root, sr2_index, sr2_kind = _index_kind(cfg.sr2_model, "--sr2-model")
        if sr2_kind != "upscaler":
            what = f"a DeepFloyd IF stage {sr2_kind}" if sr2_kind in ("I", "II") else "not an x4 upscaler"
            raise ConfigError(f"--sr2-model {cfg.sr2_model} is {what} pipeline; the IF cascade's third stage is "
                              "the Stable Diffusion x4 upscaler (a pipeline with a low_res_scheduler)")
        check_noise_level(cfg.sr2_noise_level, _max_noise_level(cfg.sr2_model, sr2_index, "--sr2-model"),
                          cfg.sr2_model, option="--sr2-noise-level")
    _guidance_notes(cfg, progress)
    from dreambooth_jax.diffusion.if_pipeline import IFStageI, IFStageII, encode
    from dreambooth_jax.diffusion.pipeline import UpscaleSampler
    from dreambooth_jax.models import load_pretrained
    from dreambooth_jax.models.if_loading import load_if

    opts, prompts, n, mesh = _prepare(cfg)
    timings = {}
    progress(f"loading {cfg.model} (DeepFloyd IF stage I)")
    pipe = load_if(root, opts, allow_pickle=cfg.allow_pickle)
    if pipe.tokenizer is None:
        raise ConfigError(f"--model {cfg.model}: this IF stage I folder names no tokenizer in its model_index.json")
    apply_lora_files(pipe, loras, "--lora", progress)
    stage1 = IFStageI(pipe, sampler=cfg.scheduler, steps=cfg.steps, mesh=mesh)
    try:  # the size's multiple depends on the model: checked before stage II is loaded
        stage1._check_size(cfg.height, cfg.width)
    except ConfigError as e:
        raise ConfigError(f"--height/--width: {e}") from None
    stage2 = stage3 = None
    if cfg.sr_model:  # loaded before sampling: a bad stage must not cost a stage I run
        progress(f"loading SR model {cfg.sr_model} (DeepFloyd IF stage II)")
        pipe2 = load_if(sr_root, opts, components=("unet", "scheduler"), allow_pickle=cfg.allow_pickle)
        apply_lora_files(pipe2, sr_loras, "--sr-lora", progress)
        d_t5, d_unet = pipe.text_encoder.config.d_model, pipe2.unet.config.encoder_hid_dim
        if d_unet is not None and d_unet != d_t5:
            raise ConfigError(f"--sr-model {cfg.sr_model}: its UNet takes {d_unet}-wide text embeddings, the T5 "
                              f"encoder of --model {cfg.model} gives {d_t5} (stages of different IF releases?)")
        stage2 = IFStageII(pipe2, sampler=cfg.scheduler, steps=cfg.sr_steps, mesh=mesh)
        try:
            stage2._check_size(4 * cfg.height, 4 * cfg.width)
        except ConfigError as e:
            raise ConfigError(f"--height/--width: stage II makes {4 * cfg.height}x{4 * cfg.width} px: {e}") from None
    if cfg.sr2_model:
        progress(f"loading SR2 model {cfg.sr2_model} (x4 upscaler)")
        stage3 = UpscaleSampler(load_pretrained(str(sr2_root), opts, allow_pickle=cfg.allow_pickle),
                                sampler=cfg.scheduler, steps=cfg.sr2_steps, mesh=mesh)
    _mkdir(out)
    progress(f"encoding {n} prompt(s) with T5")
    embeds, _ = encode(pipe, prompts)
    negative, _ = encode(pipe, [cfg.negative_prompt] * n)
    progress(f"sampling {n} image(s), IF stage I, {cfg.steps} {cfg.scheduler} steps at {cfg.height}x{cfg.width}")
    t0 = time.perf_counter()
    res = stage1(embeds, negative, height=cfg.height, width=cfg.width, seed=cfg.seed, guidance=cfg.guidance,
                 eta=cfg.eta)
    timings["base_s"] = time.perf_counter() - t0
    stages = {"base": res.images}
    if stage2 is not None:
        progress(f"IF stage II: x4 to {4 * cfg.height}x{4 * cfg.width} ({cfg.sr_steps} steps, noise level "
                 f"{cfg.sr_noise_level})")
        t0 = time.perf_counter()
        res = stage2(res.x0, embeds, negative, noise_level=cfg.sr_noise_level, height=4 * cfg.height,
                     width=4 * cfg.width, seed=cfg.seed, guidance=cfg.sr_guidance, eta=cfg.eta)
        timings["sr_s"] = time.perf_counter() - t0
        stages["sr"] = res.images
    if stage3 is not None:
        progress(f"x4 upscaler: to {16 * cfg.height}x{16 * cfg.width} ({cfg.sr2_steps} steps, noise level "
                 f"{cfg.sr2_noise_level})")
        t0 = time.perf_counter()
        stages["sr2"] = stage3(res.x0, prompts, negative_prompts=cfg.negative_prompt,
                               noise_level=cfg.sr2_noise_level, seed=cfg.seed, guidance=cfg.sr2_guidance,
                               eta=cfg.eta).images
        timings["sr2_s"] = time.perf_counter() - t0
    return _write_outputs(cfg, "if", out, stages, prompts, timings, progress)
