"""Scale report: the SD1.5-size DreamBooth train step compiled for N simulated devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/scale_report.py [--fsdp 8] [--remat]

Real SD1.5 UNet architecture, abstract parameters (``nnx.eval_shape``: no weights allocated),
512 px (64x64 latents), batch 1 per device (half instance, half class), bf16 compute with fp32
master weights and AdamW state. Prints XLA's per-device memory analysis and FLOPs per step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}


@click.command()
@click.option("--fsdp", default=8, show_default=True)
@click.option("--remat/--no-remat", default=True, show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--resolution", default=512, show_default=True)
def main(fsdp, remat, dtype, resolution):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dreambooth_jax.diffusion.schedules import schedule_from_config
    from dreambooth_jax.models import ModelOptions, UNet2DConditionModel, UNetConfig
    from dreambooth_jax.sharding import make_mesh
    from dreambooth_jax.training.state import init_state, make_optimizer
    from dreambooth_jax.training.step import StepConfig, jit_train_step, make_train_step

    n = jax.device_count()
    opts = ModelOptions(dtype=jnp.dtype(dtype), remat=remat)
    cfg = UNetConfig.from_diffusers(SD15_UNET)
    abstract_model = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, opts, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    nparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    tx = make_optimizer(5e-6)
    abstract = jax.eval_shape(lambda p: init_state({"unet": p}, tx, False), params)
    h = resolution // 8
    f32 = jnp.float32
    batch = {"latent_mean": jax.ShapeDtypeStruct((n, h, h, 4), f32),
             "latent_logvar": jax.ShapeDtypeStruct((n, h, h, 4), f32),
             "is_class": jax.ShapeDtypeStruct((n,), jnp.bool_),
             "context": jax.ShapeDtypeStruct((n, 77, 768), f32)}
    mesh = make_mesh(fsdp)
    step = make_train_step(graphdef, schedule_from_config(SD15_SCHEDULER), tx, StepConfig())
    t0 = time.perf_counter()
    compiled = jit_train_step(step, abstract, batch, {}, mesh)
    secs = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    gb = lambda b: b / 2 ** 30
    print(f"SD1.5 UNet ({nparams / 1e6:.0f} M params), {resolution} px, batch {n} (1/device), {dtype} compute, "
          f"fp32 params + AdamW, remat={remat}, mesh {dict(mesh.shape)}; compiled in {secs:.0f}s")
    print(f"per device: arguments {gb(mem.argument_size_in_bytes):.2f} GB, outputs {gb(mem.output_size_in_bytes):.2f} GB "
          f"(aliased {gb(mem.alias_size_in_bytes):.2f} GB), temporaries {gb(mem.temp_size_in_bytes):.2f} GB, "
          f"generated code {gb(mem.generated_code_size_in_bytes):.3f} GB")
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    print(f"per device peak estimate (args + outputs - aliased + temps): {gb(peak):.2f} GB")
    print(f"FLOPs per step (XLA cost analysis, per device program): {cost.get('flops', float('nan')) / 1e12:.2f} TFLOP")


if __name__ == "__main__":
    main()
