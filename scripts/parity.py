"""Numerical parity of our Flax models against diffusers/transformers (PyTorch) on YOUR checkpoint.

    python scripts/parity.py PATH_TO_DIFFUSERS_FOLDER [--dtype bfloat16] [--latent-size 32]

Loads each component (text encoder, UNet, VAE encode + decode) on both sides from the same
folder, runs them on the same deterministic inputs and prints max abs and relative error.
Needs the test extra (torch, diffusers): ``pip install -e '.[test]'``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@click.command()
@click.argument("model")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              help="Compute dtype of our side (the reference always runs float32).")
@click.option("--latent-size", default=16, show_default=True, help="Latent height/width for the UNet.")
@click.option("--image-size", default=64, show_default=True, help="Image height/width for the VAE.")
@click.option("--components", default="text_encoder,unet,vae", show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Allow pickled .bin weights (trusted files only).")
def main(model, dtype, latent_size, image_size, components, allow_pickle):
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from dreambooth_jax.errors import DreamboothError
    from dreambooth_jax.models import ModelOptions, load_pretrained, tokenize
    from dreambooth_jax.models.loading import resolve_model_path

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    comps = tuple(c.strip() for c in components.split(","))
    try:
        root = resolve_model_path(model)
        pipe = load_pretrained(root, ModelOptions(dtype=jnp.dtype(dtype)),
                               components=comps + ("tokenizer", "scheduler"), allow_pickle=allow_pickle)
    except DreamboothError as e:
        raise click.ClickException(str(e))
    rng = np.random.RandomState(0)
    rows = []

    def report(name, ours, ref):
        ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
        err = np.abs(ours - ref).max()
        rows.append((name, err, err / max(np.abs(ref).max(), 1e-12), ours.shape))

    ids = tokenize(pipe.tokenizer, ["a photo of sks dog", "a red sks teapot on a wooden floor"])
    hidden = None
    if "text_encoder" in comps:
        ref = CLIPTextModel.from_pretrained(root / "text_encoder").eval()
        with torch.no_grad():
            r = ref(torch.from_numpy(ids).long())
        h, pooled = pipe.text_encoder(jnp.asarray(ids))
        report("text_encoder last_hidden_state", h, r.last_hidden_state.numpy())
        report("text_encoder pooled", pooled, r.pooler_output.numpy())
        hidden = r.last_hidden_state.numpy()
    if "unet" in comps:
        ref = UNet2DConditionModel.from_pretrained(root / "unet").eval()
        cfg = pipe.unet.config
        if hidden is None:
            hidden = rng.randn(2, 77, cfg.cross_attention_dim[0]).astype(np.float32)
        x = rng.randn(2, cfg.in_channels, latent_size, latent_size).astype(np.float32)
        t = np.array([10, 700])
        labels = np.array([20, 20]) if cfg.num_class_embeds else None
        with torch.no_grad():
            r = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(hidden),
                    class_labels=None if labels is None else torch.from_numpy(labels)).sample.numpy()
        o = pipe.unet(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(hidden),
                      class_labels=labels)
        report("unet", np.asarray(o, np.float32).transpose(0, 3, 1, 2), r)
    if "vae" in comps:
        ref = AutoencoderKL.from_pretrained(root / "vae").eval()
        img = rng.uniform(-1, 1, (1, 3, image_size, image_size)).astype(np.float32)
        with torch.no_grad():
            post = ref.encode(torch.from_numpy(img)).latent_dist
            dec = ref.decode(post.mean).sample.numpy()
        mean, logvar = pipe.vae.encode(jnp.asarray(img.transpose(0, 2, 3, 1)))
        report("vae encode mean", np.asarray(mean).transpose(0, 3, 1, 2), post.mean.numpy())
        report("vae encode logvar", np.asarray(logvar).transpose(0, 3, 1, 2), post.logvar.numpy())
        d = pipe.vae.decode(jnp.asarray(post.mean.numpy().transpose(0, 2, 3, 1)))
        report("vae decode", np.asarray(d).transpose(0, 3, 1, 2), dec)
    click.echo(f"parity of {root} (ours: {dtype} compute; reference: PyTorch float32)")
    click.echo(f"{'component':34s} {'max abs err':>12s} {'rel. to scale':>14s}  shape")
    for name, err, rel, shape in rows:
        click.echo(f"{name:34s} {err:12.3e} {rel:14.3e}  {shape}")


if __name__ == "__main__":
    main()
