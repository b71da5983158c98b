"""Sampler benchmark: our jitted pipelines vs diffusers' PyTorch pipelines, same checkpoints.

    python scripts/bench_sampler.py [--configs tiny,small] [--repeats 3] [--sr]

Work (shared/BENCHMARKS.md): 2 prompts, classifier-free guidance 7.5, 25 DDIM steps, VAE decode.
Both sides load the same random-weight diffusers folder (seed 0); torch runs with 2 threads.
Prints compile (first call) time, steady median per call, images/s and the ratio ours/theirs.
--sr adds the x4-upscaler stage (tiny upscaler config) on the base images.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import checkpoint, peak_rss_gb, timed  # noqa: E402

PROMPTS = ["a photo of sks dog in the snow", "a red sks teapot on a wooden floor"]
SIZES = {"tiny": 64, "small": 256, "upscaler": 32}


def bench_ours(folder, size, steps, repeats, sr_folder=None):
    from dreambooth_jax.diffusion.pipeline import BaseSampler, UpscaleSampler
    from dreambooth_jax.models import load_pretrained

    base = BaseSampler(load_pretrained(folder), sampler="ddim", steps=steps)
    r = timed(lambda: base(PROMPTS, height=size, width=size, guidance=7.5, seed=0).images, repeats)
    if sr_folder:
        low = base(PROMPTS, height=size, width=size, seed=0).images
        sr = UpscaleSampler(load_pretrained(sr_folder), sampler="ddim", steps=steps)
        r["sr"] = timed(lambda: sr(low, PROMPTS, noise_level=20, guidance=9.0).images, repeats)
    return r


def bench_torch(folder, size, steps, repeats, sr_folder=None):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionUpscalePipeline

    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        run = lambda: pipe(PROMPTS, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                           generator=g, output_type="np").images
        r = timed(run, repeats)
        if sr_folder:
            low = torch.from_numpy(run()).permute(0, 3, 1, 2) * 2 - 1
            up = StableDiffusionUpscalePipeline.from_pretrained(str(sr_folder))
            up.set_progress_bar_config(disable=True)
            r["sr"] = timed(lambda: up(PROMPTS, image=low, num_inference_steps=steps, guidance_scale=9.0,
                                       noise_level=20, output_type="np").images, repeats)
    return r


@click.command()
@click.option("--configs", default="tiny,small", show_default=True)
@click.option("--steps", default=25, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--sr", is_flag=True, help="Also time the x4-upscaler stage (tiny upscaler config).")
@click.option("--side", type=click.Choice(["both", "ours", "torch"]), default="both", hidden=True)
def main(configs, steps, repeats, sr, side):
    import jax

    rows = []
    sr_folder = checkpoint("upscaler") if sr else None
    for name in configs.split(","):
        folder, size = checkpoint(name), SIZES[name]
        ours = bench_ours(folder, size, steps, repeats, sr_folder) if side != "torch" else None
        rss_ours = peak_rss_gb()
        theirs = bench_torch(folder, size, steps, repeats, sr_folder) if side != "ours" else None
        rows.append((name, size, ours, theirs, rss_ours))
    n = len(PROMPTS)
    print(f"\nsampling: {n} prompts, CFG 7.5, {steps} DDIM steps + VAE decode; jax {jax.__version__} on "
          f"{jax.default_backend()} ({jax.device_count()} device(s)); torch 2 threads")
    print(f"{'config':8s} {'stage':5s} {'ours first':>10s} {'ours call':>10s} {'ours img/s':>10s} "
          f"{'torch call':>10s} {'torch img/s':>11s} {'speedup':>8s}")
    for name, size, ours, theirs, rss in rows:
        for stage in ("base", "sr") if sr else ("base",):
            o = ours if stage == "base" or ours is None else ours["sr"]
            t = theirs if stage == "base" or theirs is None else theirs["sr"]
            oc = f"{o['median_s']:10.3f}" if o else f"{'-':>10s}"
            tc = f"{t['median_s']:10.3f}" if t else f"{'-':>10s}"
            sp = f"{t['median_s'] / o['median_s']:7.2f}x" if o and t else "-"
            print(f"{name:8s} {stage:5s} {(o['first_s'] if o else float('nan')):10.1f} {oc} "
                  f"{(n / o['median_s'] if o else float('nan')):10.2f} {tc} "
                  f"{(n / t['median_s'] if t else float('nan')):11.2f} {sp:>8s}")
    print(f"peak RSS of this process: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
    main()
