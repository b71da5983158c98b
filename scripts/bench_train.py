"""Train-step benchmark: our jitted DreamBooth step vs diffusers' PyTorch DreamBooth step
(and, optionally, vs diffusers 0.39's Flax one).

    python scripts/bench_train.py [--configs tiny,small] [--repeats 3] [--flax039-python PATH]

Work (shared/BENCHMARKS.md): batch 2 instance + 2 class images at the config's resolution,
noise + UNet forward/backward + instance MSE + 1.0 x prior MSE, clip-grad-norm 1.0 + AdamW
(lr 5e-6, wd 1e-2) on the UNet only. Rows: (a) each step as really run (diffusers' script encodes
images with the VAE and prompts with the text encoder in every step; ours uses latents and
embeddings precomputed once), (b) the same work on both sides (UNet fwd/bwd + AdamW from given
latents and embeddings). torch uses 2 threads. Ratios are from this one run.

diffusers 0.39 Flax rows (``--flax039-python``): diffusers 0.39.0 is the last release with Flax
models; its old ``train_dreambooth_flax.py`` step (one device: jit with donated state instead of
pmap) runs in scripts/bench_flax039_worker.py, under a separate interpreter, twice: "(as run)" as
the script runs it, FlaxAutoencoderKL encode + FlaxCLIPTextModel forward inside every step (compare
with (a)), and "(same work)" from given latents and embeddings (compare with (b)). Random weights
(``init_weights``: that venv has no torch to load ours; speed does not depend on the values); the
UNet's, VAE's and text encoder's parameter counts are checked against ours / diffusers PyTorch.
XLA's thread count is left at its default on both jax sides. Create the venv with our jax and flax
versions (``python -c "import jax, flax; print(jax.__version__, flax.__version__)"``):

    python3 -m venv /tmp/venv039 && /tmp/venv039/bin/pip install diffusers==0.39.0 \\
        transformers==4.57.6 "jax[cpu]==<same as ours>" "flax==<same as ours>"

LoRA rows (``--lora-rank``, default 16): our LoRA step (adapters on to_q/k/v/out.0, the frozen base
a step argument in the compute dtype, AdamW on the adapters) vs diffusers' train_dreambooth_lora.py
step (peft adapters, same targets, rank and init, AdamW on the adapters), as run and same work.

Speedup = reference step time / our step time (our steps per second over theirs); "ref first" is
the reference's first call (for the Flax rows: jit compile + one step, like "ours first").
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import checkpoint, peak_rss_gb, timed  # noqa: E402

WORKER = Path(__file__).resolve().parent / "bench_flax039_worker.py"

SIZES = {"tiny": 64, "small": 256}


def bench_ours(folder, size, repeats, dtype="float32", lora_rank=0):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dreambooth_jax.diffusion.schedules import schedule_from_config
    from dreambooth_jax.models import ModelOptions, load_pretrained
    from dreambooth_jax.training.run import encode_images, encode_prompts
    from dreambooth_jax.sharding import make_mesh, param_shardings
    from dreambooth_jax.training.state import init_state, make_optimizer
    from dreambooth_jax.training.step import StepConfig, jit_train_step, make_train_step

    pipe = load_pretrained(folder, ModelOptions(dtype=jnp.dtype(dtype)))
    rng = np.random.RandomState(0)
    imgs = rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
    mean, logvar = encode_images(pipe.vae, imgs)
    ctx = encode_prompts(pipe, ["a photo of sks dog", "a photo of dog"])
    batch = dict(latent_mean=mean, latent_logvar=logvar, is_class=np.array([False, False, True, True]),
                 context=ctx[[0, 0, 1, 1]])
    frozen = {}
    if lora_rank:  # as training does it: adapters trained, the base a frozen argument in the compute dtype
        from dreambooth_jax.models.lora import LoRAParam, LoRASpec, add_lora

        add_lora(pipe.unet, LoRASpec(rank=lora_rank))
        graphdef, params, base = nnx.split(pipe.unet, LoRAParam, ...)
        frozen = {"unet": jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, base)}
    else:
        graphdef, params = nnx.split(pipe.unet, nnx.Param)
    tx = make_optimizer(5e-6, weight_decay=1e-2)
    mesh = make_mesh(1, jax.devices()[:1])
    abstract = jax.eval_shape(lambda p: init_state({"unet": p}, tx, False), params)
    state = jax.jit(lambda p: init_state({"unet": p}, tx, False), out_shardings=param_shardings(abstract, mesh))(params)
    step = make_train_step(graphdef, schedule_from_config(pipe.scheduler_config), tx,
                           StepConfig(latent_scale=pipe.vae.config.scaling_factor))
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    abstract_frozen = jax.eval_shape(lambda f: f, frozen)
    key = jax.random.key_data(jax.random.key(0))
    holder = {"state": state, "compiled": None}

    def run():
        if holder["compiled"] is None:
            holder["compiled"] = jit_train_step(step, abstract, abstract_batch, abstract_frozen, mesh)
        holder["state"], m = holder["compiled"](holder["state"], batch, key, frozen)
        jax.block_until_ready(m["loss"])

    out = timed(run, repeats)
    out["params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return out


def bench_flax039(python: str, folder: Path, size: int, repeats: int, dtype: str, mode: str = "same_work") -> dict:
    """diffusers 0.39's Flax step in ``python`` (scripts/bench_flax039_worker.py --mode ``mode``: same_work or
    as_run). Returns its JSON ({compile_s, step_s, params, ...}) or {"error": one line} when the interpreter
    or the worker fails."""
    import json
    import subprocess

    cmd = [python, str(WORKER), "--mode", mode, "--unet-config", str(folder / "unet" / "config.json"),
           "--vae-config", str(folder / "vae" / "config.json"),
           "--text-encoder-config", str(folder / "text_encoder" / "config.json"), "--size", str(size),
           "--repeats", str(repeats), "--dtype", dtype]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as e:  # missing / not executable interpreter, hang
        return {"error": f"{type(e).__name__}: {e}"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        return {"error": f"exit {proc.returncode}: {err[-1] if err else 'no output'}"}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as e:
        return {"error": f"unreadable worker output ({e}): {lines[-1][:200]}"}


def bench_torch(folder, size, repeats, full: bool, lora_rank: int = 0):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(2)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").train()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    sched = DDPMScheduler.from_pretrained(folder / "scheduler")
    if lora_rank:  # as diffusers' train_dreambooth_lora.py: frozen UNet + peft adapters, AdamW on them
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-6, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(4, 3, size, size, generator=g) * 2 - 1
    ids = tok(["a photo of sks dog"] * 2 + ["a photo of dog"] * 2, padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    with torch.no_grad():
        latents0 = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        enc0 = text(ids)[0]

    def step():
        if full:  # as diffusers' train_dreambooth.py: encoders inside every step
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                enc = text(ids)[0]
        else:
            latents, enc = latents0, enc0
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (4,))
        pred = unet(sched.add_noise(latents, noise, t), t, enc).sample
        p, pp = pred.chunk(2)
        n, npr = noise.chunk(2)
        loss = F.mse_loss(p, n) + 1.0 * F.mse_loss(pp, npr)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = timed(step, repeats)
    out["vae_params"] = sum(p.numel() for p in vae.parameters())
    out["text_encoder_params"] = sum(p.numel() for p in text.parameters())
    return out


@click.command()
@click.option("--configs", default="tiny,small", show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="our compute dtype")
@click.option("--lora-rank", default=16, show_default=True, help="rank of the LoRA rows (0: no LoRA rows)")
@click.option("--flax039-python", default="", help="interpreter of a venv with diffusers 0.39.0 (Flax): "
              "adds the 'diffusers 0.39 Flax (as run)' and '(same work)' rows; empty: skip them")
def main(configs, repeats, dtype, lora_rank, flax039_python):
    import jax

    rows = []
    for name in configs.split(","):
        folder, size = checkpoint(name), SIZES[name]
        ours = bench_ours(folder, size, repeats, dtype)
        rss = peak_rss_gb()
        t_b = bench_torch(folder, size, repeats, full=False)
        t_a = bench_torch(folder, size, repeats, full=True)
        fx = {}  # mode -> worker JSON; failed modes are reported and left out
        for mode in ("as_run", "same_work") if flax039_python else ():
            r = bench_flax039(flax039_python, folder, size, repeats, dtype, mode)
            if "error" in r:
                print(f"{name}: diffusers 0.39 Flax ({mode.replace('_', ' ')}) row skipped: {flax039_python} "
                      f"failed: {r['error']}", flush=True)
            else:
                fx[mode] = r
        lora = None
        if lora_rank:
            lora = (bench_ours(folder, size, repeats, dtype, lora_rank),
                    bench_torch(folder, size, repeats, full=True, lora_rank=lora_rank),
                    bench_torch(folder, size, repeats, full=False, lora_rank=lora_rank))
        rows.append((name, ours, t_a, t_b, fx, rss, lora))
    print(f"\ntrain step: 2 instance + 2 class images, UNet fwd/bwd + prior MSE + clip + AdamW; jax {jax.__version__} "
          f"on {jax.default_backend()}, 1 device, {dtype}; torch 2 threads")
    print(f"{'config':7s} {'row':32s} {'ours first':>10s} {'ours step':>10s} {'ref first':>10s} {'ref step':>10s} "
          f"{'speedup':>8s}")
    for name, o, ta, tb, fx, rss, lora in rows:
        refs = [("(a) as run (ours: precomputed)", ta["first_s"], ta["median_s"])]
        if "as_run" in fx:
            refs.append(("diffusers 0.39 Flax (as run)", fx["as_run"]["compile_s"], fx["as_run"]["step_s"]))
        refs.append(("(b) same work", tb["first_s"], tb["median_s"]))
        if "same_work" in fx:
            refs.append(("diffusers 0.39 Flax (same work)", fx["same_work"]["compile_s"], fx["same_work"]["step_s"]))
        for label, first, step in refs:
            print(f"{name:7s} {label:32s} {o['first_s']:10.1f} {o['median_s']:10.3f} {first:10.1f} {step:10.3f} "
                  f"{step / o['median_s']:7.2f}x")
        for mode, r in fx.items():
            same = "match" if r["params"] == o["params"] else "MISMATCH"
            print(f"{name:7s} UNet params: ours {o['params']:,}, diffusers 0.39 Flax ({mode.replace('_', ' ')}) "
                  f"{r['params']:,} ({same})")
        if "as_run" in fx:
            for key, what in (("vae_params", "VAE"), ("text_encoder_params", "text encoder")):
                same = "match" if fx["as_run"].get(key) == ta[key] else "MISMATCH"
                print(f"{name:7s} {what} params: diffusers PyTorch {ta[key]:,}, diffusers 0.39 Flax "
                      f"{fx['as_run'].get(key, 0):,} ({same})")
        if lora is not None:
            lo, la, lb = lora
            for label, ref in ((f"LoRA r{lora_rank} (a) as run", la), (f"LoRA r{lora_rank} (b) same work", lb)):
                print(f"{name:7s} {label:32s} {lo['first_s']:10.1f} {lo['median_s']:10.3f} {ref['first_s']:10.1f} "
                      f"{ref['median_s']:10.3f} {ref['median_s'] / lo['median_s']:7.2f}x")
            print(f"{name:7s} our LoRA step / our full step: {lo['median_s'] / o['median_s']:.2f} of the time")
        print(f"{name:7s} peak RSS after ours: {rss:.2f} GB")
    print(f"peak RSS of this process (both sides): {peak_rss_gb():.2f} GB")
    print("ref: (a), (b) diffusers PyTorch; 'diffusers 0.39 Flax' in its own interpreter (compile + 1 step first); "
          "'(as run)' rows: the reference encodes images + prompts in every step, ours does not"
          if flax039_python else "ref: diffusers PyTorch")


if __name__ == "__main__":
    main()
