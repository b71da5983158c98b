"""The ``dreambooth-jax`` command line. Thin: parse options, build a config, call the library."""

from __future__ import annotations

import sys

import click

from dreambooth_jax.errors import user_errors
from dreambooth_jax.demo import demo
from dreambooth_jax.train import train


@click.group()
@click.version_option(package_name="dreambooth-jax")
def main():
    """DreamBooth fine-tuning and sampling of Stable Diffusion models in JAX/Flax."""


@main.command()
@click.argument("model")
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (trusted files only).")
@user_errors
def info(model, allow_pickle):
    """Load a diffusers-layout pipeline folder (or hub id) and describe its components."""
    import jax
    import numpy as np
    from flax import nnx

    from dreambooth_jax.models import load_pretrained

    pipe = load_pretrained(model, allow_pickle=allow_pickle)
    click.echo(f"{pipe.path}  ({pipe.model_index.get('_class_name', '?')})")
    for name in ("unet", "vae", "text_encoder"):
        m = getattr(pipe, name)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
        click.echo(f"  {name:13s} {n / 1e6:8.2f} M params")
    click.echo(f"  scheduler     {pipe.scheduler_config.get('_class_name')}, "
               f"prediction_type={pipe.scheduler_config.get('prediction_type', 'epsilon')}")
    if pipe.is_upscaler:
        click.echo(f"  upscaler: low_res_scheduler {pipe.low_res_scheduler_config.get('_class_name')}, "
                   f"max_noise_level {pipe.max_noise_level}, VAE x{pipe.vae.config.downscale}")


class SchedulerChoice(click.Choice):
    """click.Choice over :func:`dreambooth_jax.sampling.scheduler_names`, read when first needed:
    the names come from the samplers module, which imports JAX, and ``dreambooth-jax --help``
    should not wait for that."""

    def __init__(self) -> None:  # no super().__init__: it would assign the `choices` property
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        from dreambooth_jax.sampling import scheduler_names

        return scheduler_names()


_SR_ONLY = ("sr_steps", "sr_guidance", "sr_noise_level", "sr_lora", "sr_lora_scale")
_SR2_ONLY = ("sr2_steps", "sr2_guidance", "sr2_noise_level")
_BY_FAMILY = "default: {sd} for Stable Diffusion, {if_} for DeepFloyd IF"


@main.command()
@click.option("--model", required=True,
              help="Base model: a Stable Diffusion folder or hub id, or a DeepFloyd IF stage I folder (IF cascade).")
@click.option("--sr-model", default="",
              help="Optional SR stage: an x4-upscaler folder or hub id (Stable Diffusion), or the IF stage II folder "
                   "(IF; output 4x stage I's size, prompt embeddings from stage I's T5).")
@click.option("--sr2-model", default="",
              help="IF only: the Stable Diffusion x4 upscaler as the cascade's third stage, after --sr-model "
                   "(256 -> 1024 px with the real models).")
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt (repeatable).")
@click.option("--negative-prompt", default="", help="Negative prompt for classifier-free guidance.")
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Base-stage sampling steps (" + _BY_FAMILY.format(sd=50, if_=100) + ").")
@click.option("--sr-steps", type=click.IntRange(min=1), default=None,
              help="SR-stage steps (only with --sr-model; default 50).")
@click.option("--sr2-steps", type=click.IntRange(min=1), default=None,
              help="x4-upscaler steps of an IF cascade (only with --sr2-model; default 50).")
@click.option("--scheduler", type=SchedulerChoice(), default=None,
              help="Sampler of every stage; *_karras: with Karras sigmas (" + _BY_FAMILY.format(sd="ddim", if_="ddpm")
                   + ").")
@click.option("--guidance", type=click.FloatRange(min=0), default=None,
              help="Classifier-free guidance scale (0: ignore the prompt, 1: no guidance; "
                   + _BY_FAMILY.format(sd=7.5, if_=7.0) + ").")
@click.option("--sr-guidance", type=click.FloatRange(min=0), default=None,
              help="SR-stage guidance scale (only with --sr-model; " + _BY_FAMILY.format(sd=9.0, if_=4.0) + ").")
@click.option("--sr2-guidance", type=click.FloatRange(min=0), default=None,
              help="x4-upscaler guidance scale of an IF cascade (only with --sr2-model; default 9.0).")
@click.option("--sr-noise-level", type=click.IntRange(min=0), default=None,
              help="SR-stage noise augmentation (only with --sr-model): 0 to the upscaler's max_noise_level (350 for "
                   "SD x4) or to IF stage II's image_noising_scheduler timesteps - 1 (999); "
                   + _BY_FAMILY.format(sd=20, if_=250) + ".")
@click.option("--sr2-noise-level", type=click.IntRange(min=0), default=None,
              help="x4-upscaler noise augmentation of an IF cascade, 0 to its max_noise_level (only with "
                   "--sr2-model; default 100, as diffusers' IF docs).")
@click.option("--eta", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="DDIM eta, 0 (deterministic) to 1 (DDPM-like noise); --scheduler ddim only.")
@click.option("--seed", default=0, show_default=True)
@click.option("--height", type=click.IntRange(min=1), default=None,
              help="Base-stage height in pixels, a multiple of the model's VAE factor x UNet downsampling (64 for "
                   "SD; " + _BY_FAMILY.format(sd=512, if_=64) + ").")
@click.option("--width", type=click.IntRange(min=1), default=None, help="As --height.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (trusted files only).")
@click.option("--lora", multiple=True, metavar="FILE",
              help="LoRA .safetensors file (diffusers/peft or kohya/AUTOMATIC1111 format) folded into the base "
                   "model's UNet and text encoder; repeatable, applied in order (Stable Diffusion only).")
@click.option("--lora-scale", type=float, multiple=True,
              help="LoRA strength (times the file's alpha/rank; default 1): give it once for all --lora files, "
                   "or once per --lora file, in the same order.")
@click.option("--sr-lora", multiple=True, metavar="FILE", help="As --lora, for the SR model (only with --sr-model).")
@click.option("--sr-lora-scale", type=float, multiple=True, help="As --lora-scale, for --sr-lora.")
@click.option("--out", required=True, help="Output folder (must be new or empty).")
@user_errors
def sample(**kwargs):
    """Generate images: base stage, then the x4 SR stage if --sr-model is given.

    With a DeepFloyd IF stage I folder as --model: the IF cascade, stage I, then stage II
    (--sr-model), then the x4 upscaler (--sr2-model). Options not given take the model family's
    default. Every option is checked before a model is loaded."""
    from click.core import ParameterSource

    from dreambooth_jax.sampling import SampleConfig, run

    ctx = click.get_current_context()
    for model, names, stage in (("sr_model", _SR_ONLY, "the x4 upscaling stage"),
                                ("sr2_model", _SR2_ONLY, "the third (x4 upscaler) stage of an IF cascade")):
        if not kwargs[model]:
            for name in names:
                if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
                    option = "--" + name.replace("_", "-")
                    raise click.UsageError(f"{option} is only used by {stage}; add --{model.replace('_', '-')} "
                                           f"or drop {option}")
    for name in ("prompts", "lora", "lora_scale", "sr_lora", "sr_lora_scale"):
        kwargs[name] = list(kwargs[name])
    run(SampleConfig(**kwargs), progress=lambda m: click.echo(m, err=True))


@main.command("class-images")
@click.option("--model", required=True, help="The frozen model: diffusers folder or hub id.")
@click.option("--class-prompt", required=True, help='e.g. "a photo of dog"')
@click.option("--num", type=click.IntRange(min=1), default=200, show_default=True, help="Number of class images.")
@click.option("--out", required=True, help="Folder; an earlier one with a matching manifest is topped up.")
@click.option("--sampler", type=SchedulerChoice(), default="ddpm", show_default=True,
              help="ddpm: ancestral, as the paper; *_karras: with Karras sigmas.")
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--guidance", type=click.FloatRange(min=0), default=7.5, show_default=True,
              help="Classifier-free guidance scale (0: ignore the prompt, 1: no guidance).")
@click.option("--size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Image size in pixels (a multiple of the model's VAE factor x UNet downsampling).")
@click.option("--seed", default=0, show_default=True)
@user_errors
def class_images(model, class_prompt, num, out, sampler, steps, guidance, size, seed):
    """Sample the prior-preservation class images with the frozen model (resumable, with a manifest).

    The options and the --out folder are checked before the model is loaded."""
    from pathlib import Path

    from dreambooth_jax.class_images import check_class_image_folder
    from dreambooth_jax.sampling import check_guidance, guidance_note

    check_guidance(guidance, "--guidance")  # nan/inf: FloatRange lets them through
    check_class_image_folder(Path(out), "--out")
    note = guidance_note(guidance, "--guidance")
    if note:
        click.echo(note, err=True)

    from dreambooth_jax.models import load_pretrained
    from dreambooth_jax.training.config import TrainConfig
    from dreambooth_jax.training.run import generate_class_images

    cfg = TrainConfig(model=model, class_prompt=class_prompt, num_class_images=num, class_sampler=sampler,
                      class_steps=steps, class_guidance=guidance, resolution=size, seed=seed)
    paths = generate_class_images(cfg, load_pretrained(model), Path(out), lambda m: click.echo(m, err=True))
    click.echo(f"{len(paths)} class images in {out}")


@main.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, help="Folder to write model/ and (LoRA runs) lora/ into.")
@click.option("--what", type=click.Choice(["all", "model", "lora"]), default="all", show_default=True,
              help="model: a full diffusers folder; lora: the LoRA files (diffusers + kohya); all: both.")
@click.option("--stage", type=click.Choice(["base", "sr"]), default="base", show_default=True,
              help="sr: the fine-tuned x4 upscaler of a run with an SR stage.")
@click.option("--step", type=click.IntRange(min=1), default=None, help="A kept checkpoint's step (default: newest).")
@click.option("--merge-lora/--no-merge-lora", default=True, show_default=True,
              help="LoRA runs: the diffusers folder holds the base with the adapters merged (or the plain base).")
@click.option("--overwrite", is_flag=True, help="Replace model/ or lora/ already in --out.")
@user_errors
def export(run_dir, out, what, stage, step, merge_lora, overwrite):
    """Export a run's checkpoint (during or after training): diffusers folder, LoRA files, or both."""
    from dreambooth_jax.training.export_run import export_run

    export_run(run_dir, out, stage=stage, step=step, what=what, merge_lora=merge_lora, overwrite=overwrite,
               log=lambda m: click.echo(m, err=True))
    click.echo(f"exported to {out}")


@main.command("evaluate")
@click.option("--model", default="", help="The fine-tuned base model (diffusers folder or hub id); or --images.")
@click.option("--images", default="", help="A folder of images already generated (this command's images/<tag> layout).")
@click.option("--instance-dir", required=True, help="The subject's real photos (at least 2).")
@click.option("--class-noun", required=True, help='e.g. "dog" (the paper\'s live-subject prompts for cat/dog).')
@click.option("--identifier", default="sks", show_default=True, help="The rare token the model was trained with.")
@click.option("--dino", required=True, help="DINO ViT folder (transformers layout) or hub id, e.g. facebook/dino-vits16.")
@click.option("--clip", required=True, help="CLIP folder or hub id, e.g. openai/clip-vit-base-patch32.")
@click.option("--lpips", required=True, help="LPIPS weights (.safetensors written by scripts/convert_lpips.py).")
@click.option("--sr-model", default="", help="x4 upscaler: images are scored after the SR stage.")
@click.option("--before", default="", help="The frozen prior: scored too, with the same seeds (before/after table).")
@click.option("--prompts", default="", help="Prompt templates, one per line ({0}/[V]: identifier, {1}/[class]: "
              "class); default: the paper's 25.")
@click.option("--num-images", default=4, show_default=True, help="Images per prompt.")
@click.option("--class-images", default=16, show_default=True, help='Images of "a [class]" for PRES.')
@click.option("--steps", "sample_steps", default=50, show_default=True)
@click.option("--sr-steps", default=50, show_default=True)
@click.option("--guidance", default=7.5, show_default=True)
@click.option("--sr-noise-level", default=20, show_default=True)
@click.option("--size", default=512, show_default=True, help="Base-stage image size.")
@click.option("--batch", default=8, show_default=True, help="Images per sampler call.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", required=True, help="New or empty folder: metrics.json, metrics.md, contact sheets, images/.")
@user_errors
def evaluate(**kwargs):
    """Score a fine-tuned model with the DreamBooth paper's metrics: DINO, CLIP-I, CLIP-T, PRES, DIV."""
    from dreambooth_jax.evaluation.paper import EvalConfig
    from dreambooth_jax.evaluation.paper import evaluate as run_evaluation

    result = run_evaluation(EvalConfig(**kwargs), log=lambda m: click.echo(m, err=True))
    for tag, res in result["models"].items():
        click.echo(f"{tag}: " + ", ".join(f"{k} {v:.3f}" for k, v in res["overall"].items()))
    click.echo(f"report: {kwargs['out']}/metrics.md")


main.add_command(train, "train")
main.add_command(demo, "demo")


if __name__ == "__main__":
    sys.exit(main())
