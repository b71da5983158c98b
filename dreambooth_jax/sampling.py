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

    ``sr_steps``, ``sr_guidance`` and ``sr_noise_level`` are only used (and checked) with
    ``sr_model``. ``lora`` files are folded into the base model's UNet / text encoder in order,
    ``lora_scale`` times their own alpha/rank (see :func:`lora_scales`); ``sr_lora`` into the SR
    model's. ``eta`` only applies to the ``ddim`` scheduler: a non-zero eta with another
    scheduler is an error, not silently ignored.
    """

    model: str
    prompts: list[str]
    out: str
    negative_prompt: str = ""
    sr_model: str = ""
    num_images: int = 1  # per prompt
    steps: int = 50
    sr_steps: int = 50
    scheduler: str = "ddim"
    guidance: float = 7.5
    sr_guidance: float = 9.0
    sr_noise_level: int = 20
    eta: float = 0.0
    seed: int = 0
    height: int = 512
    width: int = 512
    dtype: str = "float32"
    allow_pickle: bool = False
    lora: list[str] = dataclasses.field(default_factory=list)  # LoRA files folded into the base model
    lora_scale: list[float] = dataclasses.field(default_factory=list)  # none: 1; one: all files; else per file
    sr_lora: list[str] = dataclasses.field(default_factory=list)  # the same for the SR model
    sr_lora_scale: list[float] = dataclasses.field(default_factory=list)


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


def check_noise_level(level: object, max_level: int = DEFAULT_MAX_NOISE_LEVEL, model: str = "") -> None:
    """Raise ConfigError unless ``level`` is an int in [0, ``max_level``]."""
    where = f" (max_noise_level of {model})" if model else ""
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level <= max_level:
        raise ConfigError(f"--sr-noise-level must be in [0, {max_level}]{where}, got {level!r}")


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

    The size's multiple (VAE factor x UNet downsampling) and the upscaler's own max_noise_level
    need the model folders: :func:`run` checks them before any weights are loaded or compiled.
    """
    if isinstance(cfg.prompts, str) or not cfg.prompts or not all(isinstance(p, str) for p in cfg.prompts):
        raise ConfigError("give at least one --prompt (a list of strings)")
    for option, value in (("--num-images", cfg.num_images), ("--steps", cfg.steps), ("--height", cfg.height),
                          ("--width", cfg.width)):
        check_count(value, option)
    check_scheduler(cfg.scheduler)
    check_guidance(cfg.guidance, "--guidance")
    check_eta(cfg.eta, cfg.scheduler)
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, (int, np.integer)):
        raise ConfigError(f"--seed must be a whole number, got {cfg.seed!r}")
    if cfg.sr_model:
        check_count(cfg.sr_steps, "--sr-steps")
        check_guidance(cfg.sr_guidance, "--sr-guidance")
        check_noise_level(cfg.sr_noise_level)  # the model's own maximum is checked in run()
    elif cfg.sr_lora or cfg.sr_lora_scale:
        option = "--sr-lora" if cfg.sr_lora else "--sr-lora-scale"
        raise ConfigError(f"{option} is only used by the x4 upscaling stage; add --sr-model or drop {option}")
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


def run(cfg: SampleConfig, progress=print) -> dict:
    """Sample ``num_images`` per prompt (base stage, then the SR stage if ``sr_model``).

    Order: options (:func:`check_sample_config`), the output folder, the model folders (that
    they exist; ``model`` is text-to-image, ``sr_model`` an x4 upscaler, ``sr_noise_level``
    within its max_noise_level) and the LoRA files (that they are LoRA files), then both models
    are loaded, the LoRAs folded in (their layers and shapes checked) and the image size is
    checked against the base model's multiple, and only then is anything sampled or the output
    folder created. Errors are :class:`ConfigError` / :class:`DreamboothError` with one-line messages.
    """
    check_sample_config(cfg)
    out = check_output_folder(cfg.out, "--out")
    try:
        if out.is_dir() and any(out.iterdir()):
            raise ConfigError(f"output folder {out} is not empty; choose a new one (nothing is overwritten)")
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot read the folder: {e}") from None
    base_root, index = _model_index(cfg.model, "--model")
    if "low_res_scheduler" in index:
        raise ConfigError(f"--model {cfg.model} is an x4 upscaler pipeline; give a text-to-image model as --model "
                          "and the upscaler as --sr-model")
    sr_root = None
    if cfg.sr_model:
        sr_root, sr_index = _model_index(cfg.sr_model, "--sr-model")
        if "low_res_scheduler" not in sr_index:
            raise ConfigError(f"--sr-model {cfg.sr_model} is not an x4 upscaler pipeline (its model_index.json has "
                              "no low_res_scheduler)")
        try:
            max_level = int(sr_index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL))
        except (TypeError, ValueError):
            raise ConfigError(f"--sr-model {cfg.sr_model}: max_noise_level in model_index.json is not a number: "
                              f"{sr_index.get('max_noise_level')!r}") from None
        check_noise_level(cfg.sr_noise_level, max_level, cfg.sr_model)
    loras = read_lora_files(cfg.lora, cfg.lora_scale, "--lora")
    sr_loras = read_lora_files(cfg.sr_lora, cfg.sr_lora_scale, "--sr-lora")
    notes = [guidance_note(cfg.guidance, "--guidance")]
    if cfg.sr_model:
        notes.append(guidance_note(cfg.sr_guidance, "--sr-guidance"))
    for note in filter(None, notes):
        progress(note)

    import jax
    import jax.numpy as jnp
    from PIL import Image

    from dreambooth_jax.data.images import save_image_grid
    from dreambooth_jax.diffusion.pipeline import BaseSampler, UpscaleSampler
    from dreambooth_jax.models import ModelOptions, load_pretrained
    from dreambooth_jax.sharding import make_mesh

    enable_compilation_cache()
    opts = ModelOptions(dtype=jnp.dtype(cfg.dtype))
    prompts = [p for p in cfg.prompts for _ in range(cfg.num_images)]
    n = len(prompts)
    devices = jax.devices()
    mesh = make_mesh() if len(devices) > 1 and n % len(devices) == 0 else None
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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out {out}: {e}") from None
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
    files = []
    try:
        for stage, images in stages.items():
            for i, im in enumerate(images):
                f = out / f"{stage}_{i:03d}.png"
                Image.fromarray(im).save(f)
                files.append(f.name)
            save_image_grid(images, out / f"{stage}_grid.png",
                            cols=cfg.num_images if len(cfg.prompts) > 1 else None)
        settings = dict(dataclasses.asdict(cfg), per_image_prompts=prompts, timings=timings, files=files,
                        devices=len(devices), backend=jax.default_backend())
        (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    except OSError as e:
        raise DreamboothError(f"cannot write the images to --out {out}: {e}") from None
    progress(f"wrote {len(files)} image(s) and grids to {out}")
    return settings
