"""Memory report: the real-size DreamBooth train steps compiled for simulated devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/scale_report.py --table
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/scale_report.py [--fsdp 8] [--remat] \
        [--lora-rank 16] [--optimizer adafactor] [--model sd15|sd21|x4] [--resolution 512] [--batch 2]

Real SD1.5 / SD2.1 / x4-upscaler UNet architectures with abstract parameters (``nnx.eval_shape``:
no weights allocated), compiled by the same ``make_train_step`` / ``jit_train_step`` as training,
bf16 compute, fp32 master weights (full fine-tuning) or a frozen bf16 base + fp32 adapters (LoRA).
Prints XLA's per-device memory analysis (arguments = state + frozen base + batch; temporaries =
activations, gradients, optimizer scratch) and the FLOPs per step. ``--table``: the rows of the
README's memory table, each with its target.

    make memory-report-tpu   # = pip install libtpu into .libtpu/ (ignored), then:
    PYTHONPATH=.libtpu JAX_PLATFORMS=cpu python scripts/scale_report.py --table --target tpu-v5e

``--target tpu-v5e`` (or tpu-v6e, tpu-v5p, tpu-v4) compiles the same steps ahead of time for a TPU
topology (1 or 8 chips) with libtpu on this CPU host (``jax.experimental.topologies``; no TPU needed)
and prints the TPU compiler's memory analysis: bf16 convolutions, the TPU's layouts and fusions,
the Pallas flash attention the step uses there. Compiling the SD-size steps takes 5-20 minutes each
on 2 cores.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import shutil
import sys
import tempfile
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
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                 upcast_attention=True, use_linear_projection=True)
X4_UNET = dict(SD21_UNET, attention_head_dim=8, block_out_channels=[256, 512, 512, 1024],
               down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
               up_block_types=["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"], in_channels=7, num_class_embeds=1000,
               only_cross_attention=[True, True, True, False], upcast_attention=False, sample_size=128)
X4_LOW_RES_SCHEDULER = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
IF_SCHEDULER = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000, "variance_type": "learned_range"}
MODELS = {  # unet config, latent downscale of the VAE (1: pixel space), context width, name
    "sd15": (SD15_UNET, 8, 768, "SD1.5"),
    "sd21": (SD21_UNET, 8, 1024, "SD2.1 (v-prediction)"),
    "x4": (X4_UNET, 4, 1024, "x4 upscaler (SR stage)"),
    "if1": ("IF-I-XL-v1.0", 1, 4096, "DeepFloyd IF-I-XL (64 px, T5-XXL context)"),
    "if2": ("IF-II-L-v1.0", 1, 4096, "DeepFloyd IF-II-L (64 -> 256 px)"),
}
# The README table: (label, model, resolution, global batch, fsdp, lora rank, optimizer, target GB)
TABLE = [
    ("SD1.5 LoRA rank 16, one device", "sd15", 512, 2, 1, 16, "adamw", 6.0),
    ("SD1.5 full fine-tuning, memory: 16gb preset, one device", "sd15", 512, 2, 1, 0, "adafactor", 14.0),
    ("SD1.5 full fine-tuning (AdamW), one device", "sd15", 512, 2, 1, 0, "adamw", None),
    ("SD1.5 full fine-tuning (AdamW), fsdp 8, per device", "sd15", 512, 8, 8, 0, "adamw", 4.0),
    ("SD2.1 768 px v-prediction LoRA rank 16, one device", "sd21", 768, 2, 1, 16, "adamw", 10.0),
    ("x4 upscaler SR stage LoRA rank 16, 512 px output, one device", "x4", 512, 2, 1, 16, "adamw", None),
]
# DeepFloyd IF (issue 14): the two stages at their real sizes, with the T5 embeddings precomputed
IF_TABLE = [
    ("T5-XXL encoder, the one-time prompt embedding pass (bf16, 8 prompts), one device", "t5", 77, 8, 1, 0, "", None),
    ("IF-I-XL LoRA rank 16 (configs/if-stage1.yaml), one device", "if1", 64, 2, 1, 16, "adamw", None),
    ("IF-II-L full fine-tuning (AdamW; configs/if-stage2.yaml), fsdp 8, per device", "if2", 256, 16, 8, 0, "adamw",
     None),
    ("IF-I-XL full fine-tuning (AdamW), fsdp 8, per device", "if1", 64, 8, 8, 0, "adamw", None),
    ("IF-II-L LoRA rank 16, one device", "if2", 256, 2, 1, 16, "adamw", None),
]
SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}



# Ahead-of-time targets: (chip name for the topology, HBM GiB per chip). Compiled on this host by
# libtpu (deviceless), so the memory analysis is the TPU compiler's own, with bf16 convolutions
# and the TPU's layouts and fusion: no TPU needed, only the libtpu wheel (see main's docstring).
TPU_TARGETS = {"tpu-v5e": ("v5e", 16), "tpu-v6e": ("v6e", 32), "tpu-v5p": ("v5p", 95), "tpu-v4": ("v4", 32)}
_TOPOLOGY = {1: ((1, 1, 1), "1x1"), 4: ((2, 2, 1), "2x2"), 8: ((2, 4, 1), "2x4")}


def target_devices(target: str, n: int) -> list:
    """n devices of the target: this process's (cpu) or an abstract TPU topology's."""
    import jax

    if target == "cpu":
        if n > jax.device_count():
            raise click.UsageError(f"{n} devices wanted, {jax.device_count()} present: set "
                                   f"XLA_FLAGS=--xla_force_host_platform_device_count={n}")
        return jax.devices()[:n]
    from jax.experimental import topologies

    if n not in _TOPOLOGY:
        raise click.UsageError(f"--target {target}: device counts {sorted(_TOPOLOGY)} are supported, not {n}")
    chip, _ = TPU_TARGETS[target]
    per_host, shape = _TOPOLOGY[n]
    if chip in ("v5p", "v4"):  # 3D tori: chips are counted per host in 2x2x1 blocks
        shape = {1: "1x1x1", 4: "2x2x1", 8: "2x2x2"}[n]
        per_host = (1, 1, 1) if n == 1 else (2, 2, 1)
    try:
        topo = topologies.get_topology_desc(topology_name=f"{chip}:{shape}", platform="tpu",
                                            chips_per_host_bounds=per_host, num_slices=1,
                                            wrap=(False, False, False))
    except Exception as e:  # noqa: BLE001 - libtpu missing or refusing the topology
        raise click.ClickException(
            f"--target {target} needs libtpu to compile for a TPU without one (pip install libtpu; "
            f"`make memory-report-tpu` does it in an ignored folder): {str(e).splitlines()[-1][:300]}") from e
    devices = list(topo.devices)
    return devices[:n] if len(devices) >= n else devices


def compile_step(model: str, resolution: int, batch: int, fsdp: int, lora_rank: int, optimizer: str,
                 remat: bool = True, dtype: str = "bfloat16", target: str = "cpu"):
    """Compile the train step for abstract real-size weights; returns (compiled, info dict)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dreambooth_jax.diffusion.schedules import schedule_from_config
    from dreambooth_jax.models import ModelOptions, UNet2DConditionModel, UNetConfig
    from dreambooth_jax.models.attention import target_backend
    from dreambooth_jax.models.lora import LoRAParam, LoRASpec, add_lora, resolve_targets
    from dreambooth_jax.sharding import make_mesh
    from dreambooth_jax.training.state import init_state, make_optimizer
    from dreambooth_jax.training.step import StepConfig, jit_train_step, make_train_step

    unet_cfg, down, ctx_dim, _ = MODELS[model]
    if isinstance(unet_cfg, str):
        from dreambooth_jax.testing.real_configs import IF_UNETS

        unet_cfg = IF_UNETS[unet_cfg]
    opts = ModelOptions(dtype=jnp.dtype(dtype), remat=remat)
    cfg = UNetConfig.from_diffusers(unet_cfg)

    def build():
        unet = UNet2DConditionModel(cfg, opts, rngs=nnx.Rngs(0))
        if lora_rank:  # the attention preset, with IF's added-KV projections as the trainer adapts them
            add_lora(unet, LoRASpec(rank=lora_rank, targets=resolve_targets("attention", unet)))
        return unet

    abstract_model = nnx.eval_shape(build)
    mesh = make_mesh(fsdp, target_devices(target, fsdp))  # one device, or an fsdp-only mesh
    if lora_rank:
        graphdef, params, base = nnx.split(abstract_model, LoRAParam, ...)
        cast = lambda a: jax.ShapeDtypeStruct(a.shape, opts.dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype)
        frozen = {"unet": jax.tree.map(cast, base)}
    else:
        graphdef, params = nnx.split(abstract_model, nnx.Param)
        frozen = {}
    trained = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    total = trained + sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    tx = make_optimizer(5e-6, optimizer=optimizer)
    abstract = jax.eval_shape(lambda p: init_state({"unet": p}, tx, False), params)
    h = resolution // down
    f32 = jnp.float32
    ch = 3 if down == 1 else 4  # pixels (IF) or VAE latents
    shapes = {"latent_mean": jax.ShapeDtypeStruct((batch, h, h, ch), f32),
              "latent_logvar": jax.ShapeDtypeStruct((batch, h, h, ch), f32),
              "is_class": jax.ShapeDtypeStruct((batch,), jnp.bool_),
              "context": jax.ShapeDtypeStruct((batch, 77, ctx_dim), f32)}
    low_res_schedule = None
    step_cfg = StepConfig(cast_params=None if opts.dtype == jnp.float32 else jnp.dtype(opts.dtype).name)
    sched = dict(SD15_SCHEDULER, prediction_type="v_prediction") if model == "sd21" else SD15_SCHEDULER
    if model == "x4":
        shapes["low_res"] = jax.ShapeDtypeStruct((batch, h, h, 3), f32)
        low_res_schedule = schedule_from_config(X4_LOW_RES_SCHEDULER)
        step_cfg = dataclasses.replace(step_cfg, sr_noise_level=20, latent_scale=0.08333)
    if model.startswith("if"):  # pixel space (no VAE: the images themselves); stage II: the upscaled
        sched = IF_SCHEDULER    # low-res image, noise-augmented
        del shapes["latent_logvar"]
        step_cfg = dataclasses.replace(step_cfg, latent_scale=1.0)
        if model == "if2":
            shapes["low_res"] = jax.ShapeDtypeStruct((batch, h, h, 3), f32)
            low_res_schedule = schedule_from_config({"beta_schedule": "squaredcos_cap_v2"})
            step_cfg = dataclasses.replace(step_cfg, sr_noise_level=100)
    step = make_train_step(graphdef, schedule_from_config(sched), tx, step_cfg, low_res_schedule=low_res_schedule)
    t0 = time.perf_counter()
    with target_backend("cpu" if target == "cpu" else "tpu"):
        compiled = jit_train_step(step, abstract, shapes, frozen, mesh)
    big = lambda x: int(np.prod(x.shape)) >= 2 ** 18  # weights of >= 1 MiB in fp32
    shapes = {tuple(sorted(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_model)) if big(x)}
    return compiled, {"seconds": time.perf_counter() - t0, "params": total, "trained": trained,
                      "mesh": dict(mesh.shape), "weight_shapes": shapes}


def compile_t5(batch: int, target: str = "cpu"):
    """Compile DeepFloyd IF's one-time prompt pass: T5-XXL's encoder (4.76 B parameters, stored and
    run in bf16, as the IF run loads it with dtype bfloat16) on ``batch`` prompts of 77 tokens, on
    one device. Returns (compiled, info dict)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dreambooth_jax.models import ModelOptions
    from dreambooth_jax.models.t5 import IF_MAX_LENGTH, T5Config, T5EncoderModel, t5_xxl_config
    from dreambooth_jax.sharding import make_mesh, replicated

    cfg = T5Config.from_transformers(t5_xxl_config())
    opts = ModelOptions(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    abstract = nnx.eval_shape(lambda: T5EncoderModel(cfg, opts, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract)
    mesh = make_mesh(1, target_devices(target, 1))
    rep = replicated(mesh)
    place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)
    ids = jax.ShapeDtypeStruct((batch, IF_MAX_LENGTH), jnp.int32, sharding=rep)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m)).lower(
        jax.tree.map(place, params), ids, ids).compile()
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return compiled, {"seconds": time.perf_counter() - t0, "params": n, "trained": 0, "mesh": dict(mesh.shape)}


# ----------------------------------------------------------------------------- where the temporaries go
# XLA:CPU writes its buffer assignment when XLA_FLAGS asks for a dump (set in main before jax starts).
# Values in the temporary allocation whose dimensions are a permutation of a weight's are classified
# by the instruction that made them; the bytes reported for a class are the address ranges used by
# that class alone (a lower bound of what the class costs at the peak).
DUMP_DIR = tempfile.mkdtemp(prefix="scale_report_dump_")
_VALUE = re.compile(r" value: <\d+ ([\w.\-]+) @\d+> \(size=(\d+),offset=(\d+)\): (\w+)\[([\d,]*)\]")
CLASSES = [("all-gather", "fsdp all-gathered weights"), ("convert", "dtype copies of weights (f32 of bf16: XLA:CPU only)"),
           ("transpose", "transposed kernels (XLA:CPU conv backward)"), ("copy", "transposed kernels (XLA:CPU conv backward)")]


def _classify(name: str) -> str:
    for key, label in CLASSES:
        if key in name.replace("_", "-") or key in name:
            return label
    return "weight-shaped results (gradients)"


def temp_breakdown(weight_shapes: set) -> dict[str, float]:
    """GiB of the temporary allocation used only by weight-shaped values, per class; from the
    newest buffer-assignment dump (then removed)."""
    files = sorted(glob.glob(os.path.join(DUMP_DIR, "*step*buffer-assignment.txt")), key=os.path.getmtime)
    if not files:
        return {}
    lines = Path(files[-1]).read_text().split("\n")
    shutil.rmtree(DUMP_DIR, ignore_errors=True)
    os.makedirs(DUMP_DIR, exist_ok=True)
    start = next((i for i, ln in enumerate(lines) if "preallocated-temp" in ln), None)
    if start is None:
        return {}
    spans: dict[str, list] = collections.defaultdict(list)
    for ln in lines[start + 1:]:
        if not ln.startswith(" value:"):
            break
        m = _VALUE.match(ln)
        if not m:
            continue
        name, size, off, _, dims = m.groups()
        dims = tuple(sorted(int(d) for d in dims.split(",") if d))
        label = _classify(name) if dims in weight_shapes else "other"
        spans[label].append((int(off), int(off) + int(size)))
    merged = {k: _union(v) for k, v in spans.items()}
    out = {}
    for label, ivs in merged.items():
        if label == "other":
            continue
        rest = _union([iv for k, v in merged.items() if k != label for iv in v])
        out[label] = (_length(ivs) - _overlap(ivs, rest)) / 2 ** 30
    return out


def _union(ivs):
    out = []
    for lo, hi in sorted(ivs):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def _length(ivs) -> int:
    return sum(hi - lo for lo, hi in ivs)


def _overlap(a, b) -> int:
    i = j = total = 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    gb = lambda b: b / 2 ** 30
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    return {"arguments": gb(mem.argument_size_in_bytes), "outputs": gb(mem.output_size_in_bytes),
            "aliased": gb(mem.alias_size_in_bytes), "temporaries": gb(mem.temp_size_in_bytes), "peak": gb(peak)}


@click.command()
@click.option("--table", is_flag=True, help="The README's memory table (needs 8 simulated devices for its fsdp row).")
@click.option("--if-table", is_flag=True, help="The DeepFloyd IF rows (real IF-I-XL / IF-II-L sizes).")
@click.option("--rows", default="", help="Only these rows of the table, e.g. 1,3 (0 = the first); each TPU "
              "compile of a real model holds up to ~20 GB, so one process per row keeps a 24 GB host alive.")
@click.option("--model", type=click.Choice(sorted(MODELS)), default="sd15", show_default=True)
@click.option("--fsdp", default=8, show_default=True)
@click.option("--batch", default=0, help="global batch (instance + class); default 1 per device")
@click.option("--remat/--no-remat", default=True, show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--resolution", default=512, show_default=True)
@click.option("--lora-rank", default=0, show_default=True, help="0: full fine-tuning")
@click.option("--optimizer", type=click.Choice(["adamw", "adafactor"]), default="adamw", show_default=True)
@click.option("--target", type=click.Choice(["cpu", *TPU_TARGETS]), default="cpu", show_default=True,
              help="Compile for this process's CPU devices, or ahead of time for a TPU chip (needs libtpu, "
                   "no TPU: `make memory-report-tpu`); the TPU compiler's own memory analysis, bf16 convolutions.")
def main(table, if_table, rows, model, fsdp, batch, remat, dtype, resolution, lora_rank, optimizer, target):
    if target == "cpu":  # the buffer assignment, for the weight-copy breakdown
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP_DIR} --xla_dump_hlo_as_text"
                                   " --xla_dump_hlo_module_re=.*step.*").strip()
    import jax

    chosen = [int(i) for i in rows.split(",") if i.strip()]
    rows = IF_TABLE if if_table else TABLE
    rows = [rows[i] for i in chosen] if chosen else rows
    table = table or if_table
    if table and target != "cpu":
        chip, hbm = TPU_TARGETS[target]
        print(f"TPU {chip} ({hbm} GiB HBM per chip), compiled ahead of time by libtpu on this host")
        print("| row | arguments GB | temporaries GB | peak estimate GB | target GB | trained / all params |")
        print("|---|---|---|---|---|---|")
        for label, m, res, b, f, r, opt, goal in rows:
            if m == "t5":
                compiled, info = compile_t5(b, target=target)
            else:
                compiled, info = compile_step(m, res, b, f, r, opt, target=target)
            mem = memory(compiled)
            ok = "" if goal is None else (" ok" if mem["peak"] <= goal else " OVER")
            print(f"| {label} | {mem['arguments']:.2f} | {mem['temporaries']:.2f} | {mem['peak']:.2f} | "
                  f"{'report' if goal is None else f'<= {goal:.0f}'}{ok} | "
                  f"{info['trained'] / 1e6:.1f} M / {info['params'] / 1e6:.0f} M |", flush=True)
        return
    if table:
        print("| row | arguments GB | temporaries GB | XLA:CPU peak estimate GB | of which weight copies XLA:CPU "
              "makes | peak without them GB | target GB | trained / all params |")
        print("|---|---|---|---|---|---|---|---|")
        for label, m, res, b, f, r, opt, goal in rows:
            if m == "t5":
                compiled, info = compile_t5(b)
                mem = memory(compiled)
                print(f"| {label} | {mem['arguments']:.2f} | {mem['temporaries']:.2f} | {mem['peak']:.2f} | | | "
                      f"report | 0 / {info['params'] / 1e6:.0f} M |", flush=True)
                continue
            if f > jax.device_count():
                print(f"| {label} | (needs {f} devices: XLA_FLAGS=--xla_force_host_platform_device_count={f}) |")
                continue
            compiled, info = compile_step(m, res, b, f, r, opt)
            mem = memory(compiled)
            parts = temp_breakdown(info["weight_shapes"])
            cpu_only = sum(v for k, v in parts.items() if "XLA:CPU" in k)
            lean = mem["peak"] - cpu_only
            ok = "" if goal is None else (" ok" if lean <= goal else " OVER")
            print(f"| {label} | {mem['arguments']:.2f} | {mem['temporaries']:.2f} | {mem['peak']:.2f} | "
                  f"{cpu_only:.2f} | {lean:.2f} | {'report' if goal is None else f'<= {goal:.0f}'}{ok} | "
                  f"{info['trained'] / 1e6:.1f} M / {info['params'] / 1e6:.0f} M |", flush=True)
            for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
                print(f"|   ({k}: {v:.2f} GB) | | | | | | | |", flush=True)
        return
    if target == "cpu":
        fsdp = min(fsdp, jax.device_count())
    batch = batch or max(fsdp, 1)
    compiled, info = compile_step(model, resolution, batch, fsdp, lora_rank, optimizer, remat, dtype, target)
    mem = memory(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    what = f"LoRA rank {lora_rank} ({info['trained'] / 1e6:.1f} M trained)" if lora_rank else f"full, {optimizer}"
    print(f"{MODELS[model][3]} UNet ({info['params'] / 1e6:.0f} M params), {resolution} px, global batch {batch}, "
          f"{dtype} compute, {what}, remat={remat}, mesh {info['mesh']}; compiled in {info['seconds']:.0f}s")
    print(f"per device: arguments {mem['arguments']:.2f} GB, outputs {mem['outputs']:.2f} GB "
          f"(aliased {mem['aliased']:.2f} GB), temporaries {mem['temporaries']:.2f} GB")
    print(f"per device peak estimate (args + outputs - aliased + temps): {mem['peak']:.2f} GB")
    for k, v in sorted((temp_breakdown(info["weight_shapes"]) if target == "cpu" else {}).items(),
                       key=lambda kv: -kv[1]):
        print(f"  temporaries used only by {k}: {v:.2f} GB")
    print(f"FLOPs per step (XLA cost analysis, per device program): {cost.get('flops', float('nan')) / 1e12:.2f} TFLOP")


if __name__ == "__main__":
    main()
