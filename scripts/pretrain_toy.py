"""Reproduce the shipped toy prior (dreambooth_jax/assets/toy/prior and .../sr) from scratch.

    python scripts/pretrain_toy.py --work runs/toy_pretrain --out dreambooth_jax/assets/toy

Stages (each seeded and resumable: rerun the same command after an interruption): the VAE, the
x4-upscaler-style SR UNet with its text encoder, the base UNet with its CLIP text encoder.
Writes both diffusers folders (fp16 weights) and pretrain_report.json (CPU time per stage, final
losses). On a 2-core CPU: about 5 min (VAE) + 8 min (SR) + 30 min (base).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import numpy as np


@click.command()
@click.option("--work", default="runs/toy_pretrain", show_default=True, help="checkpoints and intermediate files")
@click.option("--out", default="dreambooth_jax/assets/toy", show_default=True, help="where prior/ and sr/ are written")
@click.option("--n-images", default=20000, show_default=True, help="toy photos for the base stage")
@click.option("--n-sr", default=4000, show_default=True, help="toy photos (128 px) for the SR stage")
@click.option("--vae-steps", default=4000, show_default=True)
@click.option("--base-steps", default=15000, show_default=True)
@click.option("--sr-steps", default=5000, show_default=True)
@click.option("--sr2-steps", default=3000, show_default=True, help="SR phase 2 (16-latent crops)")
@click.option("--seed", default=0, show_default=True)
def main(work, out, n_images, n_sr, vae_steps, base_steps, sr_steps, sr2_steps, seed):
    from dreambooth_jax.models import ModelOptions
    from dreambooth_jax.models.export import save_component
    from dreambooth_jax.models.loading import load_vae
    from dreambooth_jax.toy import pretrain as P
    from dreambooth_jax.toy import world

    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    report_path = work / "pretrain_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        report[name] = dict(report.get(name, {}), wall_s=round(time.perf_counter() - t0, 1),
                            cpu_s=round(time.process_time() - c0, 1))
        report_path.write_text(json.dumps(report, indent=1) + "\n")
        return result

    vae_dir = work / "vae_final"
    if not (vae_dir / "config.json").exists():
        vae = timed("vae", lambda: P.train_vae(work / "vae", steps=vae_steps, seed=seed))
        save_component(vae, vae_dir, overwrite=True)
    vae = load_vae(vae_dir, ModelOptions())

    t0 = time.perf_counter()
    hi, scenes, captions = world.sample_dataset(n_images, seed + 1, P.SR_SIZE)
    lo = world.downsample(hi, P.BASE_SIZE)
    print(f"rendered {n_images} toy photos in {time.perf_counter() - t0:.0f}s")

    sr_unet, sr_text, sr_hist = timed("sr", lambda: P.train_sr(work / "sr", vae, hi[:n_sr], captions[:n_sr],
                                                                steps=sr_steps, seed=seed))
    report["sr"]["final_loss"] = sr_hist[-1]["loss"]
    # Phase 2: larger crops (more context), min-SNR weighting, lower lr, from phase 1's EMA weights.
    sr_unet, sr_text, sr_hist = timed("sr2", lambda: P.train_sr(
        work / "sr2", vae, hi[:n_sr], captions[:n_sr], steps=sr2_steps, batch=16, crop=16, lr=5e-4, seed=seed + 1,
        min_snr_gamma=5.0, init={"unet": sr_unet, "text_encoder": sr_text}))
    report["sr2"]["final_loss"] = sr_hist[-1]["loss"]
    del hi
    unet, text, hist = timed("base", lambda: P.train_base(work / "base", vae, lo, captions, steps=base_steps,
                                                          seed=seed))
    report["base"]["final_loss"] = hist[-1]["loss"]
    P.write_pipeline(out / "prior", unet=unet, vae=vae, text_encoder=text, upscaler=False)
    P.write_pipeline(out / "sr", unet=sr_unet, vae=vae, text_encoder=sr_text, upscaler=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    (out / "pretrain_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
