"""Sampling entry point used by the CLI: load, build the compiled stages, write images + settings."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from dreambooth_jax.errors import ConfigError


@dataclasses.dataclass
class SampleConfig:
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


def enable_compilation_cache(path: str | None = None) -> None:
    """JAX's persistent compilation cache, so a second run does not recompile."""
    import jax

    path = path or os.environ.get("DREAMBOOTH_JAX_CACHE", str(Path.home() / ".cache" / "dreambooth_jax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run(cfg: SampleConfig, progress=print) -> dict:
    """Sample ``num_images`` per prompt (base stage, then the SR stage if ``sr_model``)."""
    import jax
    import jax.numpy as jnp
    from PIL import Image

    from dreambooth_jax.data.images import save_image_grid
    from dreambooth_jax.diffusion.pipeline import BaseSampler, UpscaleSampler
    from dreambooth_jax.models import ModelOptions, load_pretrained
    from dreambooth_jax.sharding import make_mesh

    if cfg.num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {cfg.num_images}")
    if not cfg.prompts:
        raise ConfigError("give at least one --prompt")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"output folder {out} is not empty; choose a new one (nothing is overwritten)")
    enable_compilation_cache()
    opts = ModelOptions(dtype=jnp.dtype(cfg.dtype))
    prompts = [p for p in cfg.prompts for _ in range(cfg.num_images)]
    n = len(prompts)
    devices = jax.devices()
    mesh = make_mesh() if len(devices) > 1 and n % len(devices) == 0 else None
    timings = {}
    progress(f"loading {cfg.model}")
    pipe = load_pretrained(cfg.model, opts, allow_pickle=cfg.allow_pickle)
    base = BaseSampler(pipe, sampler=cfg.scheduler, steps=cfg.steps, mesh=mesh)
    progress(f"sampling {n} image(s), {cfg.steps} {cfg.scheduler} steps at {cfg.height}x{cfg.width}")
    t0 = time.perf_counter()
    res = base(prompts, negative_prompts=cfg.negative_prompt, height=cfg.height, width=cfg.width,
               seed=cfg.seed, guidance=cfg.guidance, eta=cfg.eta)
    timings["base_s"] = time.perf_counter() - t0
    stages = {"base": res.images}
    if cfg.sr_model:
        progress(f"loading SR model {cfg.sr_model}")
        sr_pipe = load_pretrained(cfg.sr_model, opts, allow_pickle=cfg.allow_pickle)
        sr = UpscaleSampler(sr_pipe, sampler=cfg.scheduler, steps=cfg.sr_steps, mesh=mesh)
        progress(f"upscaling x4 ({cfg.sr_steps} steps, noise level {cfg.sr_noise_level})")
        t0 = time.perf_counter()
        stages["sr"] = sr(res.images, prompts, negative_prompts=cfg.negative_prompt,
                          noise_level=cfg.sr_noise_level, seed=cfg.seed, guidance=cfg.sr_guidance,
                          eta=cfg.eta).images
        timings["sr_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for stage, images in stages.items():
        for i, im in enumerate(images):
            f = out / f"{stage}_{i:03d}.png"
            Image.fromarray(im).save(f)
            files.append(f.name)
        save_image_grid(images, out / f"{stage}_grid.png", cols=cfg.num_images if len(cfg.prompts) > 1 else None)
    settings = dict(dataclasses.asdict(cfg), per_image_prompts=prompts, timings=timings, files=files,
                    devices=len(devices), backend=jax.default_backend())
    (out / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    progress(f"wrote {len(files)} image(s) and grids to {out}")
    return settings
