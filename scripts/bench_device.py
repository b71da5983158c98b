"""One prepared benchmark for an accelerator: our train steps and sampler vs diffusers PyTorch's, side by side.

    python scripts/bench_device.py [--config sd15|small|tiny] [--repeats 3] [--steps 25] [--images 4] \\
        [--rows train_full,train_lora,sample] [--skip-torch] [--skip-ours] [--no-remat] [--out FILE.md]

Prints the versions, the device and its memory, then one table, on random weights of the config's
architecture at its resolution: ``sd15`` (the default on an accelerator) is the real SD1.5 UNet, VAE
and CLIP ViT-L/14 text encoder at 512 px; ``small`` (the default on CPU) and ``tiny`` are the CPU
benchmark configs of shared/BENCHMARKS.md. Rows:

- train, full fine-tuning: our DreamBooth step as ``dreambooth-jax train`` builds it (fp32 master
  weights, bf16 compute on accelerators, remat, clip-grad-norm 1.0 + AdamW) vs diffusers'
  train_dreambooth.py UNet step (fp32 weights, torch autocast bf16 (fp16 + GradScaler on GPUs without
  bf16), SDPA attention, gradient checkpointing when we remat, clip + AdamW). Batch 1 instance + 1 class
  example from given latents and text embeddings on both sides (UNet fwd/bwd + prior MSE + optimizer).
- train, LoRA rank 16: our LoRA step (adapters on to_q/k/v/out.0, the frozen base in the compute dtype)
  vs train_dreambooth_lora.py's (peft adapters on the same modules in fp32, the frozen UNet in the
  autocast dtype).
- sampler: our jitted ``BaseSampler`` (text encoder, DDIM loop, VAE decode in one call) vs diffusers'
  ``StableDiffusionPipeline`` (weights in the autocast dtype on a GPU, DDIMScheduler, SDPA):
  ``--images`` images, CFG 7.5, ``--steps`` steps.

Times: the first call (ours: compile + run) and the median of ``--repeats`` steady calls. On CPU both
sides compute in float32. Memory: each part (side x row) runs in its own process, this script
re-invoked with a hidden ``--part``, because JAX's ``peak_bytes_in_use`` only grows over a process's
life and each framework keeps its own pool: ours ``memory_stats()['peak_bytes_in_use']``, torch
``max_memory_allocated()`` after ``reset_peak_memory_stats()``, each over the whole part (weights,
optimizer state, activations, load transients). Without device memory stats (CPU) both are the part
process's peak RSS, imports included, and the table says so. A first process reads the device and
writes the pipeline folder once (``$DREAMBOOTH_BENCH_DIR/device-<config>``, by default under
~/.cache/dreambooth_jax/bench) with our own models and exporter in the diffusers layout, so our rows
need neither torch nor diffusers.

Bringing diffusers (pure Python; the accelerator machine has torch, transformers and peft, not it): on
a machine with a package registry, in the repository root (``.whl/`` is git-ignored),

    python3 -m pip download diffusers==0.42.1 --no-deps -d .whl/

carry ``.whl``, and there, before this script:

    python3 -m pip install -q --no-index --no-deps --find-links .whl --target /tmp/site diffusers \\
        && export PYTHONPATH=/tmp/site

Without torch or diffusers the table keeps our columns and says how to bring them. The sd15 run is
planned for under 8 minutes on an H200; each part prints its wall time as it ends.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import BENCH_DIR, peak_rss_gb, timed  # noqa: E402

RESOLUTION = {"tiny": 64, "small": 256, "sd15": 512}
PROMPT = "a photo of sks dog in the snow"
GUIDANCE = 7.5
LORA_RANK = 16
ROWS = {  # row key -> label in the table
    "train_full": "train: full fine-tuning (AdamW)",
    "train_lora": f"train: LoRA rank {LORA_RANK}",
    "sample": "sampler",
}
VERSIONS = ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "peft")
PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
TORCH_PACKAGES = ("torch", "diffusers", "transformers")
PART_TIMEOUT_S = 900
BRING_DIFFUSERS = ("bring diffusers as a wheel: `python3 -m pip download diffusers==0.42.1 --no-deps -d .whl/` on a "
                   "machine with a registry, carry .whl, then `python3 -m pip install --no-index --no-deps "
                   "--find-links .whl --target /tmp/site diffusers && export PYTHONPATH=/tmp/site` "
                   "(see this script's docstring)")
SD15_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every part measures; passed to the part processes as JSON."""

    config: str
    folder: str  # the random-weight pipeline folder
    repeats: int
    steps: int  # sampler steps
    images: int  # sampler images
    remat: bool
    dtype: str  # our compute dtype (bfloat16 on accelerators, float32 on CPU)

    @property
    def size(self) -> int:
        return RESOLUTION[self.config]


# ----------------------------------------------------------------------------- the random-weight pipeline folder
def model_configs(config: str) -> tuple[dict, dict, dict]:
    """(UNet, VAE, text encoder) config dicts of a benchmark config, in diffusers / transformers keys."""
    if config == "sd15":
        from scale_report import SD15_UNET

        unet, vae, text = dict(SD15_UNET), dict(SD15_VAE), dict(SD15_TEXT)
    else:
        from dreambooth_jax.testing.reference import TEXT, UNETS, VAES

        unet, vae, text = dict(UNETS[config]), dict(VAES[config]), dict(TEXT[config])
    n = len(vae["block_out_channels"])
    vae.update(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    text.update(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407, layer_norm_eps=1e-5)
    return unet, vae, text


def _random_model(cls, cfg, seed: int):
    """``cls(cfg)`` with numpy random weights (no JAX init ops): kernels ~ N(0, 1/fan_in), norm scales 1,
    biases 0. Fast at SD1.5 size on any host; the values do not change the speed."""
    import jax
    import numpy as np
    from flax import nnx

    from dreambooth_jax.models.options import ModelOptions

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(cfg, ModelOptions(), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name == "scale":
            return np.ones(leaf.shape, leaf.dtype)
        if len(leaf.shape) < 2:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)).astype(leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def write_random_pipeline(folder: Path, config: str, seed: int = 0) -> Path:
    """A random-weight SD pipeline folder of ``config``'s architecture in the diffusers layout, written
    with our models and exporter (no torch / diffusers needed), into a temporary folder renamed into place."""
    from dreambooth_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from dreambooth_jax.models.export import DIFFUSERS_VERSION, save_component
    from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig
    from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig
    from dreambooth_jax.testing.reference import SD1_SCHEDULER, TOKENIZER_DIR

    unet, vae, text = model_configs(config)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    parts = {"unet": (UNet2DConditionModel, UNetConfig.from_diffusers(unet)),
             "vae": (AutoencoderKL, VAEConfig.from_diffusers(vae)),
             "text_encoder": (CLIPTextModel, CLIPTextConfig.from_transformers(text))}
    for i, (name, (cls, cfg)) in enumerate(parts.items()):
        save_component(_random_model(cls, cfg, seed + i), tmp / name)
    shutil.copytree(TOKENIZER_DIR, tmp / "tokenizer")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        dict(_class_name="PNDMScheduler", _diffusers_version=DIFFUSERS_VERSION, **SD1_SCHEDULER), indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def pipeline_folder(config: str) -> Path:
    """The config's random-weight pipeline folder under BENCH_DIR, written once."""
    folder = BENCH_DIR / f"device-{config}"
    if not (folder / "model_index.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_random_pipeline(folder, config)
    return folder


def _latent_shape(folder: str, size: int) -> tuple[int, int]:
    """(latent side, context width) of the folder's VAE and UNet at ``size`` pixels."""
    vae = json.loads((Path(folder) / "vae" / "config.json").read_text())
    unet = json.loads((Path(folder) / "unet" / "config.json").read_text())
    cross = unet["cross_attention_dim"]
    return size // 2 ** (len(vae["block_out_channels"]) - 1), cross if isinstance(cross, int) else cross[0]


# ----------------------------------------------------------------------------- the parts (each in its own process)
def part_setup(config: str) -> dict:
    """The device, its memory, the resolved config (auto: sd15 on an accelerator, small on CPU), the folder."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    backend = jax.default_backend()
    config = config if config != "auto" else ("sd15" if backend != "cpu" else "small")
    t0 = time.perf_counter()
    folder = pipeline_folder(config)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dict(backend=backend, device_kind=dev.device_kind, device_count=jax.device_count(),
                device_memory_gb=stats["bytes_limit"] / 2 ** 30 if "bytes_limit" in stats else None,
                cuda=_cuda_device() if backend not in ("cpu", "tpu") else None, host_memory_gb=ram / 2 ** 30,
                cpus=os.cpu_count(), config=config, folder=str(folder), folder_s=time.perf_counter() - t0)


def _cuda_device() -> str | None:
    """torch's name and total memory of the GPU (JAX reports only its allocator's limit), if torch is here."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2 ** 30:.1f} GB, compute capability {props.major}.{props.minor}"


def _jax_peak() -> tuple[float, str]:
    """(GB, what): the device's peak bytes in use, or this process's peak RSS where it has no stats."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2 ** 30, "device"
    return peak_rss_gb(), "rss"


def _result(t: dict, peak: tuple[float, str], **extra) -> dict:
    return dict(first_s=t["first_s"], steady_s=t["median_s"], peak_gb=peak[0], peak_kind=peak[1], **extra)


def ours_train(s: Settings, lora: bool) -> dict:
    """Our DreamBooth step, as ``dreambooth-jax train`` builds it, on a 1 instance + 1 class batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dreambooth_jax.diffusion.schedules import schedule_from_config
    from dreambooth_jax.models import ModelOptions, load_pretrained
    from dreambooth_jax.models.lora import LoRASpec, add_lora
    from dreambooth_jax.sharding import make_mesh, param_shardings
    from dreambooth_jax.training.run import split_trainable
    from dreambooth_jax.training.state import init_state, make_optimizer
    from dreambooth_jax.training.step import StepConfig, jit_train_step, make_train_step

    dtype = jnp.dtype(s.dtype)
    pipe = load_pretrained(s.folder, ModelOptions(dtype=dtype, remat=s.remat), components=("unet", "scheduler"))
    if lora:
        add_lora(pipe.unet, LoRASpec(rank=LORA_RANK))
    graphdefs, params, frozen, _ = split_trainable({"unet": pipe.unet}, dtype)
    schedule = schedule_from_config(pipe.scheduler_config)
    del pipe  # the fp32 LoRA base (the frozen argument is its compute-dtype copy)
    tx = make_optimizer(1e-4 if lora else 5e-6, weight_decay=1e-2)
    mesh = make_mesh(1, jax.devices()[:1])
    abstract = jax.eval_shape(lambda p: init_state(p, tx, False), params)
    state = jax.jit(lambda p: init_state(p, tx, False), out_shardings=param_shardings(abstract, mesh),
                    donate_argnums=0)(params)
    del params
    cfg = StepConfig(cast_params=None if dtype == jnp.float32 else dtype.name)
    step = make_train_step(graphdefs["unet"], schedule, tx, cfg)
    side, width = _latent_shape(s.folder, s.size)
    rng = np.random.default_rng(0)
    batch = dict(latent_mean=rng.standard_normal((2, side, side, 4), np.float32),
                 latent_logvar=np.full((2, side, side, 4), -4.0, np.float32), is_class=np.array([False, True]),
                 context=rng.standard_normal((2, 77, width), np.float32))
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    key = jax.random.key_data(jax.random.key(0))
    live = {"state": state}

    def run() -> None:
        if "compiled" not in live:  # ahead-of-time compile inside the first call, as training does
            live["compiled"] = jit_train_step(step, abstract, shapes, jax.eval_shape(lambda f: f, frozen), mesh)
        live["state"], metrics = live["compiled"](live["state"], batch, key, frozen)
        jax.block_until_ready(metrics["loss"])

    t = timed(run, s.repeats)
    return _result(t, _jax_peak(), dtype=s.dtype, device=jax.devices()[0].device_kind)


def ours_sample(s: Settings) -> dict:
    """Our jitted sampler (text encoder + DDIM loop + VAE decode in one call), as ``dreambooth-jax sample``."""
    import jax
    import jax.numpy as jnp

    from dreambooth_jax.diffusion.pipeline import BaseSampler
    from dreambooth_jax.models import ModelOptions, load_pretrained

    sampler = BaseSampler(load_pretrained(s.folder, ModelOptions(dtype=jnp.dtype(s.dtype))), sampler="ddim",
                          steps=s.steps)
    prompts = [PROMPT] * s.images
    t = timed(lambda: sampler(prompts, height=s.size, width=s.size, guidance=GUIDANCE, seed=0).images, s.repeats)
    return _result(t, _jax_peak(), dtype=s.dtype, device=jax.devices()[0].device_kind)


def _torch_device() -> tuple:
    """(device, autocast dtype or None, peak-memory function): bf16 autocast on a GPU (fp16 where it has
    no bf16), float32 on CPU. Also quiets diffusers' and transformers' progress bars and notices."""
    import warnings

    import diffusers
    import torch
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch_dtype=: all versions take it, new ones warn

    if not torch.cuda.is_available():
        return "cpu", None, lambda: (peak_rss_gb(), "rss")
    torch.cuda.reset_peak_memory_stats()
    amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cuda", amp, lambda: (torch.cuda.max_memory_allocated() / 2 ** 30, "device")


def _torch_info(device: str, amp) -> dict:
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    return dict(dtype=str(amp).removeprefix("torch.") + " autocast" if amp else "float32", device=name)


def torch_train(s: Settings, lora: bool) -> dict:
    """diffusers' train_dreambooth(_lora).py UNet step on the same batch: autocast, SDPA, clip + AdamW."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel

    device, amp, peak = _torch_device()
    unet = UNet2DConditionModel.from_pretrained(Path(s.folder) / "unet").to(device).train()
    if s.remat:
        unet.enable_gradient_checkpointing()
    if lora:  # train_dreambooth_lora.py: frozen base in the mixed-precision dtype, fp32 peft adapters
        from peft import LoraConfig

        unet.requires_grad_(False)
        if amp is not None:
            unet.to(dtype=amp)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4 if lora else 5e-6, weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device, enabled=amp == torch.float16)
    sched = DDPMScheduler.from_pretrained(Path(s.folder) / "scheduler")
    side, width = _latent_shape(s.folder, s.size)
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(2, 4, side, side, generator=g, device=device)
    context = torch.randn(2, 77, width, generator=g, device=device)

    def step() -> None:
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (2,), device=device)
        with torch.autocast(device, dtype=amp or torch.bfloat16, enabled=amp is not None):
            pred = unet(sched.add_noise(latents, noise, t), t, context).sample
        loss = sum(F.mse_loss(p.float(), n) for p, n in zip(pred.chunk(2), noise.chunk(2)))  # instance + prior
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    t = timed(step, s.repeats)
    return _result(t, peak(), **_torch_info(device, amp))


def torch_sample(s: Settings) -> dict:
    """diffusers' StableDiffusionPipeline with the DDIM scheduler, in the autocast dtype on a GPU."""
    device, amp, peak = _torch_device()  # first: it quiets the notices that importing the pipeline prints
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(s.folder, torch_dtype=amp or torch.float32, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator(device).manual_seed(0)
    with torch.inference_mode():
        t = timed(lambda: pipe([PROMPT] * s.images, height=s.size, width=s.size, num_inference_steps=s.steps,
                               guidance_scale=GUIDANCE, generator=g, output_type="np").images, s.repeats)
    return _result(t, peak(), **_torch_info(device, amp))


PARTS: dict[str, Callable[[Settings], dict]] = {
    "ours/train_full": lambda s: ours_train(s, lora=False),
    "ours/train_lora": lambda s: ours_train(s, lora=True),
    "ours/sample": ours_sample,
    "torch/train_full": lambda s: torch_train(s, lora=False),
    "torch/train_lora": lambda s: torch_train(s, lora=True),
    "torch/sample": torch_sample,
}


def run_part(part: str, settings: str) -> dict:
    """One part in this process: its result, or {'error': one line} (the traceback goes to stderr)."""
    try:
        if part == "setup":
            return part_setup(json.loads(settings)["config"])
        return PARTS[part](Settings(**json.loads(settings)))
    except ModuleNotFoundError as e:
        return {"error": f"missing package {e.name}"}
    except Exception as e:  # noqa: BLE001 (an OOM or a bug in one part must not lose the other rows)
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


def spawn(part: str, settings: dict) -> dict:
    """Run one part in a fresh process of this script; its result dict, with its wall time as ``wall_s``."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--settings", json.dumps(settings),
               "--result", str(result)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=PART_TIMEOUT_S)
            out = json.loads(result.read_text()) if result.exists() else {"error": f"exit {proc.returncode}, no result"}
        except subprocess.TimeoutExpired:
            out = {"error": f"timed out after {PART_TIMEOUT_S} s"}
    out["wall_s"] = time.perf_counter() - t0
    print(f"  {part}: {'failed: ' + out['error'] if 'error' in out else 'done'} ({out['wall_s']:.1f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------- report
def versions() -> dict:
    """Installed versions (None: not installed; JAX's accelerator plugins only when installed), read from
    package metadata without importing anything."""
    out = {"python": platform.python_version()}
    for name in VERSIONS + PLUGINS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name not in PLUGINS:
                out[name] = None
    return out


def missing_torch_packages() -> list[str]:
    """The packages of the torch side that are not importable here."""
    return [m for m in TORCH_PACKAGES if importlib.util.find_spec(m) is None]


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(theirs: dict, ours: dict, key: str) -> str:
    if not theirs or not ours or not ours[key] or (key == "peak_gb" and theirs["peak_kind"] != ours["peak_kind"]):
        return "-"
    return f"{theirs[key] / ours[key]:.2f}"


def _memory_line(results: dict) -> str:
    kinds = {r["peak_kind"] for r in results.values() if "peak_kind" in r}
    if kinds == {"rss"}:
        return "peak RSS of the part's process, imports included (GB; no device memory stats here)"
    if kinds == {"device"}:
        return "peak device memory (GB; ours: peak_bytes_in_use, torch: max_memory_allocated)"
    return "peak device memory where the side has stats, else the process's peak RSS (GB; not compared)"


def format_table(results: dict, s: Settings, rows: list[str], notes: list[str]) -> str:
    """The markdown report: settings, one line per row, ratios torch / ours (above 1: ours faster / smaller)."""
    ok = {k: r for k, r in results.items() if "error" not in r}
    dtypes = sorted({f"{side} {r['dtype']}" for (side, _), r in ok.items()})
    devices = sorted({f"{side} on {r['device']}" for (side, _), r in ok.items()})
    remat = "on (torch: gradient checkpointing)" if s.remat else "off"
    lines = [f"config {s.config}: {s.size} px, random weights; train batch 1 instance + 1 class, remat {remat}; "
             f"sampler {s.images} image(s), CFG {GUIDANCE}, {s.steps} DDIM steps + VAE decode; "
             f"first call, then the median of {s.repeats} steady call(s)",
             f"compute: {', '.join(dtypes) or '-'}; {', '.join(devices) or '-'}",
             f"memory: {_memory_line(ok)}; each part in its own process",
             "ratios: torch / ours (above 1: ours is faster / uses less memory)",
             "",
             "| part | ours first s | ours steady s | ours peak GB | torch first s | torch steady s | torch peak GB "
             "| steady torch/ours | first torch/ours | peak torch/ours |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key in rows:
        o, t = ok.get(("ours", key), {}), ok.get(("torch", key), {})
        cells = [_num(o.get("first_s"), ".2f"), _num(o.get("steady_s"), ".3f"), _num(o.get("peak_gb"), ".2f"),
                 _num(t.get("first_s"), ".2f"), _num(t.get("steady_s"), ".3f"), _num(t.get("peak_gb"), ".2f"),
                 _ratio(t, o, "steady_s"), _ratio(t, o, "first_s"), _ratio(t, o, "peak_gb")]
        lines.append(f"| {ROWS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


def prepare(config: str | None, **options) -> Settings:
    """The setup process: print the device, write the folder; the Settings of every part."""
    info = spawn("setup", {"config": config or "auto"})
    if "error" in info:
        raise click.ClickException(f"could not read the device or write the pipeline folder: {info['error']}")
    mem = _num(info["device_memory_gb"], ".1f")
    print(f"device: {info['backend']} {info['device_kind']} x{info['device_count']}, JAX memory limit {mem} GB; "
          f"host {info['cpus']} CPUs, {info['host_memory_gb']:.0f} GB", flush=True)
    if info["cuda"]:
        print(f"cuda device (torch): {info['cuda']}", flush=True)
    print(f"pipeline folder: {info['folder']} (config {info['config']}; {info['folder_s']:.1f} s)", flush=True)
    return Settings(config=info["config"], folder=info["folder"],
                    dtype="float32" if info["backend"] == "cpu" else "bfloat16", **options)


def run_parts(s: Settings, rows: list[str], sides: list[str], notes: list[str]) -> dict:
    """The rows on each side, one process each; {(side, row): result}. Failures are added to ``notes``."""
    results = {}
    for key in rows:
        for side in sides:
            if side == "torch" and key == "train_lora" and importlib.util.find_spec("peft") is None:
                notes.append("torch LoRA row skipped: peft not installed (bring it as a wheel like diffusers)")
                continue
            results[(side, key)] = r = spawn(f"{side}/{key}", dataclasses.asdict(s))
            if "error" in r:
                notes.append(f"{side} {ROWS[key]}: failed: {r['error']}")
    return results


@click.command()
@click.option("--config", type=click.Choice(sorted(RESOLUTION)), default=None,
              help="model size (default: sd15 on an accelerator, small on CPU)")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1), help="steady calls timed (median)")
@click.option("--steps", default=25, show_default=True, type=click.IntRange(1), help="DDIM steps of the sampler rows")
@click.option("--images", default=4, show_default=True, type=click.IntRange(1), help="images of the sampler rows")
@click.option("--rows", default=",".join(ROWS), show_default=True, help="which rows, comma-separated")
@click.option("--skip-torch", is_flag=True, help="only our side")
@click.option("--skip-ours", is_flag=True, help="only diffusers PyTorch's side")
@click.option("--remat/--no-remat", default=True, show_default=True,
              help="recompute activations in the train steps (torch: gradient checkpointing)")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="also write the table here (markdown)")
@click.option("--part", default=None, hidden=True)
@click.option("--settings", default="{}", hidden=True)
@click.option("--result", default=None, hidden=True)
def main(config, repeats, steps, images, rows, skip_torch, skip_ours, remat, out, part, settings, result):
    if part:  # a part process: run it, write its result, nothing else
        Path(result).write_text(json.dumps(run_part(part, settings)))
        return
    if skip_torch and skip_ours:
        raise click.UsageError("--skip-torch and --skip-ours together leave nothing to run")
    rows = [r.strip() for r in rows.split(",") if r.strip()]
    if not rows or set(rows) - set(ROWS):
        raise click.UsageError(f"--rows: choose from {', '.join(ROWS)}, got {','.join(rows) or 'none'}")
    t_start = time.perf_counter()
    print("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions().items()), flush=True)
    s = prepare(config, repeats=repeats, steps=steps, images=images, remat=remat)
    sides, notes = ([] if skip_ours else ["ours"]), []
    missing = [] if skip_torch else missing_torch_packages()
    if skip_torch:
        notes.append("torch side skipped (--skip-torch)")
    elif missing:
        notes.append(f"torch side skipped: {', '.join(missing)} not installed; {BRING_DIFFUSERS}")
        print(notes[-1], flush=True)
    else:
        sides.append("torch")
    results = run_parts(s, rows, sides, notes)
    notes.append(f"total {time.perf_counter() - t_start:.0f} s (folder, loads, compiles, runs)")
    table = format_table(results, s, rows, notes)
    print("\n" + table, end="", flush=True)
    if out:
        Path(out).write_text(table)

if __name__ == "__main__":
    main()
