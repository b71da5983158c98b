"""Placeholder main job until sampling and training land: build a tiny random-weight SD pipeline
with diffusers, load it in Flax, and print the parity report."""

import subprocess
import sys
from pathlib import Path

import click


@click.command()
@click.option("--out", default="out/demo", show_default=True)
def main(out):
    from dreambooth_jax.testing.reference import make_pipeline_folder

    folder = Path(out) / "tiny-sd"
    if not (folder / "model_index.json").exists():
        make_pipeline_folder(folder, "tiny", seed=0)
    subprocess.run([sys.executable, "-m", "dreambooth_jax.cli", "info", str(folder)], check=True)
    subprocess.run([sys.executable, str(Path(__file__).parent / "parity.py"), str(folder)], check=True)


if __name__ == "__main__":
    main()
