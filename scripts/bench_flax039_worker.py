"""Worker of ``bench_train.py --flax039-python``: diffusers 0.39's Flax UNet DreamBooth step.

Run by the *other* interpreter (a venv with diffusers 0.39.0, the last release with Flax models, and
transformers 4.57.6, the last with FlaxCLIPTextModel):

    /tmp/venv039/bin/python scripts/bench_flax039_worker.py --unet-config FOLDER/unet/config.json \\
        --size 64 [--mode same_work|as_run] [--vae-config FOLDER/vae/config.json] \\
        [--text-encoder-config FOLDER/text_encoder/config.json] [--repeats 3] [--dtype float32]

Times the step function of diffusers' old ``examples/dreambooth/train_dreambooth_flax.py`` on one
device (jit with the states donated instead of pmap, so no pmean), in one of two modes:

* ``same_work`` (default), the work of bench_train.py's row "(b) same work": 2 instance + 2 class
  latents sampled from a given latent distribution, DDPM noise (scaled_linear 0.00085..0.012, 1000
  steps) at random timesteps, epsilon target, UNet forward/backward, instance MSE + 1.0 x prior MSE,
  clip_by_global_norm(1.0) + adamw(5e-6, weight_decay=1e-2).
* ``as_run``, the script's step as it really runs (row "(a) as run"): inside the jitted step the
  FlaxAutoencoderKL encodes the 4 images (pixel_values NCHW (4, 3, size, size), as the script's
  collate_fn gives them; ``vae.encode`` transposes to NHWC itself), samples the latent distribution
  and scales by the VAE's scaling_factor, and the FlaxCLIPTextModel (not trained) encodes input_ids
  (4, 77) with ``train=False``; then the same noise, UNet, prior-preservation loss and update as
  ``same_work``. As in the script, the text encoder's TrainState (with its unused AdamW state) is
  passed through the step and donated. input_ids are fixed token ids (no tokenizer needed).

Weights are random (``init_weights`` / the models' own random init): speed does not depend on their
values. XLA's thread count is left at its default, as for our side. Prints one JSON line on stdout:
{"mode", "compile_s": first call (compile + one step), "step_s": median steady step, "best_s",
"times", "params": UNet parameter count, ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import timed  # noqa: E402  (stdlib only: importable from any interpreter)


def latent_factor(vae_config: Path | None) -> int:
    """The VAE's downsampling factor, 2 ** (number of blocks - 1), as our encoder applies it."""
    if vae_config is None or not vae_config.exists():
        return 8
    return 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet-config", type=Path, required=True)
    ap.add_argument("--mode", choices=("same_work", "as_run"), default="same_work",
                    help="same_work: from given latents/embeddings; as_run: VAE + text encoder inside the step")
    ap.add_argument("--vae-config", type=Path, default=None,
                    help="default: ../vae/config.json beside the UNet folder (same_work: for the latent size, "
                         "else factor 8; as_run: required, the VAE run in the step)")
    ap.add_argument("--text-encoder-config", type=Path, default=None,
                    help="as_run only; default: ../text_encoder/config.json beside the UNet folder")
    ap.add_argument("--size", type=int, required=True, help="image resolution")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="the models' compute dtype (params stay float32)")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from diffusers import FlaxDDPMScheduler, FlaxUNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from flax.training import train_state

    diffusers_logging.set_verbosity_error()  # "Flax classes are deprecated" on every module setup

    dtype = jnp.dtype(args.dtype)
    config = json.loads(args.unet_config.read_text())
    vae_config = args.vae_config or args.unet_config.parent.parent / "vae" / "config.json"
    h = args.size // latent_factor(vae_config)

    unet = FlaxUNet2DConditionModel.from_config(config, dtype=dtype)
    params = unet.init_weights(jax.random.key(0))
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))

    noise_scheduler = FlaxDDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        num_train_timesteps=1000)
    noise_scheduler_state = noise_scheduler.create_state()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(learning_rate=optax.constant_schedule(5e-6), b1=0.9, b2=0.999, eps=1e-8,
                                 weight_decay=1e-2))
    state = train_state.TrainState.create(apply_fn=unet.__call__, params=params, tx=tx)

    rng = np.random.RandomState(0)
    c = config.get("in_channels", 4)
    scaling_factor = 0.18215
    extra = {}

    def unet_loss(params, latents, context, noise_rng, timestep_rng):
        """From scaled NCHW latents on: noise, UNet, prior-preservation loss (the script's compute_loss tail)."""
        noise = jax.random.normal(noise_rng, latents.shape)
        bsz = latents.shape[0]
        timesteps = jax.random.randint(timestep_rng, (bsz,), 0, noise_scheduler.config.num_train_timesteps)
        noisy_latents = noise_scheduler.add_noise(noise_scheduler_state, latents, noise, timesteps)
        model_pred = unet.apply({"params": params}, noisy_latents, timesteps, context, train=True).sample
        target = noise  # epsilon
        model_pred, model_pred_prior = jnp.split(model_pred, 2, axis=0)
        target, target_prior = jnp.split(target, 2, axis=0)
        loss = ((target - model_pred) ** 2).mean()
        prior_loss = ((target_prior - model_pred_prior) ** 2).mean()
        return loss + 1.0 * prior_loss

    if args.mode == "same_work":
        batch = {  # NHWC latent distribution, as the Flax VAE returns it; 2 instance then 2 class examples
            "latent_mean": jnp.asarray(rng.randn(4, h, h, c).astype(np.float32)),
            "latent_logvar": jnp.asarray(np.full((4, h, h, c), -2.0, np.float32)),
            "context": jnp.asarray(rng.randn(4, 77, config["cross_attention_dim"]).astype(np.float32)),
        }

        def train_step(unet_state, batch, train_rng):  # the script's, minus the VAE/text encoders and pmean
            sample_rng, new_train_rng = jax.random.split(train_rng, 2)

            def compute_loss(params):
                lat_rng, noise_rng, timestep_rng = jax.random.split(sample_rng, 3)
                mean, logvar = batch["latent_mean"], batch["latent_logvar"]
                latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(lat_rng, mean.shape)  # latent_dist.sample
                latents = jnp.transpose(latents, (0, 3, 1, 2)) * scaling_factor  # (NHWC) -> (NCHW)
                return unet_loss(params, latents, batch["context"], noise_rng, timestep_rng)

            loss, grad = jax.value_and_grad(compute_loss)(unet_state.params)
            return unet_state.apply_gradients(grads=grad), {"loss": loss}, new_train_rng

        step = jax.jit(train_step, donate_argnums=(0,))
        holder = {"state": state, "rng": jax.random.key(1)}

        def run():
            holder["state"], metrics, holder["rng"] = step(holder["state"], batch, holder["rng"])
            holder["loss"] = float(jax.device_get(metrics["loss"]))
    else:  # as_run: the encoders inside the step, as train_dreambooth_flax.py does (text encoder not trained)
        from diffusers import FlaxAutoencoderKL
        from transformers import CLIPTextConfig, FlaxCLIPTextModel

        te_config = args.text_encoder_config or args.unet_config.parent.parent / "text_encoder" / "config.json"
        for p in (vae_config, te_config):
            if not p.exists():
                raise SystemExit(f"as_run needs {p}")
        vae = FlaxAutoencoderKL.from_config(json.loads(vae_config.read_text()), dtype=dtype)
        vae_params = vae.init_weights(jax.random.key(2))
        scaling_factor = vae.config.scaling_factor
        text_encoder = FlaxCLIPTextModel(CLIPTextConfig.from_json_file(str(te_config)), dtype=dtype, seed=3)
        text_encoder_state = train_state.TrainState.create(apply_fn=text_encoder.__call__,
                                                           params=text_encoder.params, tx=tx)
        extra = {"vae_params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(vae_params))),
                 "text_encoder_params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(text_encoder.params)))}
        te = text_encoder.config
        ids = np.full((4, 77), te.pad_token_id, np.int32)  # "<bos> a photo of sks dog <eos> <pad>..." stand-ins
        ids[:, 0], ids[:, 1:6] = te.bos_token_id, rng.randint(0, te.vocab_size - 2, (4, 5))
        ids[:, 6] = te.eos_token_id
        ids[2:, 1:6] = ids[:1, 1:6]  # 2 identical instance prompts, 2 identical class prompts
        batch = {  # as the script's collate_fn: NCHW images in [-1, 1]; 2 instance then 2 class examples
            "pixel_values": jnp.asarray(rng.uniform(-1, 1, (4, 3, args.size, args.size)).astype(np.float32)),
            "input_ids": jnp.asarray(ids),
        }

        def train_step(unet_state, text_encoder_state, vae_params, batch, train_rng):  # the script's, minus pmean
            dropout_rng, sample_rng, new_train_rng = jax.random.split(train_rng, 3)
            params = {"unet": unet_state.params}

            def compute_loss(params):
                vae_outputs = vae.apply({"params": vae_params}, batch["pixel_values"], deterministic=True,
                                        method=vae.encode)
                latents = vae_outputs.latent_dist.sample(sample_rng)
                latents = jnp.transpose(latents, (0, 3, 1, 2))  # (NHWC) -> (NCHW)
                latents = latents * scaling_factor
                noise_rng, timestep_rng = jax.random.split(sample_rng)
                encoder_hidden_states = text_encoder(batch["input_ids"], params=text_encoder_state.params,
                                                     train=False)[0]
                return unet_loss(params["unet"], latents, encoder_hidden_states, noise_rng, timestep_rng)

            loss, grad = jax.value_and_grad(compute_loss)(params)
            return (unet_state.apply_gradients(grads=grad["unet"]), text_encoder_state, {"loss": loss},
                    new_train_rng)

        step = jax.jit(train_step, donate_argnums=(0, 1))
        holder = {"state": state, "te_state": text_encoder_state, "rng": jax.random.key(1)}

        def run():
            holder["state"], holder["te_state"], metrics, holder["rng"] = step(
                holder["state"], holder["te_state"], vae_params, batch, holder["rng"])
            holder["loss"] = float(jax.device_get(metrics["loss"]))

    t = timed(run, args.repeats)
    loss = holder["loss"]
    if not np.isfinite(loss):
        raise SystemExit(f"non-finite loss {loss}")
    print(json.dumps({"mode": args.mode, "compile_s": t["first_s"], "step_s": t["median_s"],
                      "best_s": min(t["times"]), "times": t["times"], "params": n_params, **extra,
                      "latent": [4, h, h, c], "jax": jax.__version__, "backend": jax.default_backend()}), flush=True)


if __name__ == "__main__":
    main()
