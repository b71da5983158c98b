"""``python -m dreambooth_jax.train --config configs/tiny.yaml [key=value ...]``

Thin entry point: parse, build the config, call ``dreambooth_jax.training.run.run``.
On a multi-host TPU slice, run the same command on every host: ``jax.distributed`` is
initialized when ``--distributed`` is given (or JAX detects the cluster environment).
"""

from __future__ import annotations

import click

from dreambooth_jax.errors import user_errors
from dreambooth_jax.training.config import describe_keys


def _epilog() -> str:
    # \b keeps click from re-wrapping each section's lines
    sections = describe_keys().split("\n\n")
    return "Config keys (key = default  -- what it does):\n\n" + "\n\n".join("\b\n" + s for s in sections)


@click.command(context_settings={"ignore_unknown_options": True, "max_content_width": 120}, epilog=_epilog())
@click.option("--config", "config_path", type=click.Path(), default=None, help="YAML config file.")
@click.option("--distributed", is_flag=True, help="Call jax.distributed.initialize() first (multi-host).")
@click.option("--print-config", is_flag=True,
              help="Print the complete config (--config and OVERRIDES applied, every key commented) as YAML "
                   "and exit: the file to start your own from.")
@click.argument("overrides", nargs=-1)
@user_errors
def train(config_path, distributed, print_config, overrides):
    """Fine-tune with DreamBooth. OVERRIDES are key=value pairs on top of --config (keys below)."""
    from dreambooth_jax.training.config import load_config, to_yaml

    cfg = load_config(config_path, list(overrides))
    if print_config:
        click.echo(to_yaml(cfg), nl=False)
        return
    if distributed:
        import jax

        jax.distributed.initialize()
    from dreambooth_jax.training.run import run

    run(cfg, log=lambda m: click.echo(m, err=True))


if __name__ == "__main__":
    train()
