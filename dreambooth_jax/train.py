"""``python -m dreambooth_jax.train --config configs/tiny.yaml [key=value ...]``

Thin entry point: parse, build the config, call ``dreambooth_jax.training.run.run``.
On a multi-host TPU slice, run the same command on every host: ``jax.distributed`` is
initialized when ``--distributed`` is given (or JAX detects the cluster environment).
"""

from __future__ import annotations

import click

from dreambooth_jax.errors import user_errors


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--config", "config_path", type=click.Path(), default=None, help="YAML config file.")
@click.option("--distributed", is_flag=True, help="Call jax.distributed.initialize() first (multi-host).")
@click.argument("overrides", nargs=-1)
@user_errors
def train(config_path, distributed, overrides):
    """Fine-tune with DreamBooth. OVERRIDES are key=value pairs on top of --config."""
    from dreambooth_jax.training.config import load_config

    cfg = load_config(config_path, list(overrides))
    if distributed:
        import jax

        jax.distributed.initialize()
    from dreambooth_jax.training.run import run

    run(cfg, log=lambda m: click.echo(m, err=True))


if __name__ == "__main__":
    train()
