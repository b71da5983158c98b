"""Where the UNet training step's time goes, ours vs diffusers PyTorch (issue 10, part 4).

    python scripts/profile_step.py [--config small] [--repeats 3] [--flags]

The work: UNet forward + backward (MSE to the noise), batch 4, the benchmark config's latents and a
77-token context, fp32, one device; torch uses 2 threads. Three views, one run:

1. Ablation, both sides the same way: the full step; attention replaced by identity (out = q); that
   and GroupNorm replaced by identity too. The differences are what attention and GroupNorm cost;
   what is left is convolutions, linears, elementwise and layout.
2. Per-op breakdown of our compiled step from a jax.profiler trace (XLA:CPU records one event per
   executed thunk; the thunk's HLO instruction gives its kind: convolution, dot, reduce fusion
   (norms, softmax statistics), elementwise fusion, copy/transpose, loop), beside torch.profiler's
   operator table of the same step.
3. ``--flags``: the same step of ours under XLA:CPU flag variants (each in a fresh subprocess,
   XLA_FLAGS set before jax starts): oneDNN on/off, XNNPACK/YNNPACK fusion types, fast math.
   Reports the time or the error of each; nothing is changed in the library by this script.
4. ``--convs``: one 3x3 convolution, forward and forward+backward, at the small config's and
   SD1.5's shapes, in the formulations one could use instead of XLA's convolution: XLA's conv
   (what the models use), im2col (9 shifted copies concatenated, one matmul), 9 shifted matmuls
   summed, and XLA's conv with a custom weight gradient (9 matmuls of shifted inputs with the
   output gradient) -- beside torch's conv2d (oneDNN).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import checkpoint, timed  # noqa: E402

SIZES = {"tiny": 64, "small": 256}
FLAG_VARIANTS = [
    ("default", ""),
    ("oneDNN on", "--xla_cpu_use_onednn=true"),
    ("XNNPACK off", "--xla_cpu_use_xnnpack=false"),
    ("fast math", "--xla_cpu_enable_fast_math=true"),
    ("new fusion emitters off", "--xla_cpu_use_fusion_emitters=false"),
    ("prefer 512-bit vectors", "--xla_cpu_prefer_vector_width=512"),
]


def _inputs(folder: Path, size: int):
    rng = np.random.RandomState(0)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    lat = size // 8
    x = rng.standard_normal((4, lat, lat, cfg["in_channels"])).astype(np.float32)
    noise = rng.standard_normal(x.shape).astype(np.float32)
    ctx = rng.standard_normal((4, 77, text_cfg["hidden_size"])).astype(np.float32)
    t = np.array([10, 300, 600, 900], np.int32)
    return x, noise, ctx, t


def _ours_fn(folder: Path, size: int, ablate: tuple[str, ...] = ()):
    """A jitted fwd+bwd of our UNet, with the named parts replaced by identity; returns run()."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dreambooth_jax.models import ModelOptions, layers, load_pretrained

    saved = {}
    if "attention" in ablate:
        saved["attention"] = layers.attention
        layers.attention = lambda q, k, v, impl="auto": q
    if "groupnorm" in ablate:
        saved["groupnorm"] = layers.GroupNorm.__call__
        layers.GroupNorm.__call__ = lambda self, x: x
    try:
        unet = load_pretrained(folder, ModelOptions(dtype=jnp.float32), components=("unet",)).unet
        graphdef, params = nnx.split(unet, nnx.Param)
        x, noise, ctx, t = _inputs(folder, size)

        def loss(p):
            pred = nnx.merge(graphdef, p)(x, t, ctx)
            return jnp.mean((pred - noise) ** 2)

        grad = jax.jit(jax.grad(loss))
        compiled = grad.lower(params).compile()
    finally:
        if "attention" in saved:
            layers.attention = saved["attention"]
        if "groupnorm" in saved:
            layers.GroupNorm.__call__ = saved["groupnorm"]

    def run():
        jax.block_until_ready(compiled(params))
    return run, compiled


def _torch_fn(folder: Path, size: int, ablate: tuple[str, ...] = ()):
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(2)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").train()
    x, noise, ctx, t = (torch.from_numpy(a) for a in _inputs(folder, size))
    x, noise = x.permute(0, 3, 1, 2).contiguous(), noise.permute(0, 3, 1, 2).contiguous()
    t = t.long()
    sdpa, gn = F.scaled_dot_product_attention, torch.nn.GroupNorm.forward

    def run():
        if "attention" in ablate:
            F.scaled_dot_product_attention = lambda q, k, v, **kw: q
        if "groupnorm" in ablate:
            torch.nn.GroupNorm.forward = lambda self, h: h
        try:
            loss = F.mse_loss(unet(x, t, ctx).sample, noise)
            loss.backward()
            unet.zero_grad(set_to_none=True)
        finally:
            F.scaled_dot_product_attention, torch.nn.GroupNorm.forward = sdpa, gn
    return run, unet


def _hlo_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> kind for the instructions of the compiled module's computations."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comps[current] = []
        elif current is not None and line.strip() and line.strip() != "}":
            comps[current].append(line)
    kinds = {}
    op_re = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?\s+([\w\-]+)\(")
    for lines in comps.values():
        for line in lines:
            m = op_re.match(line)
            if not m:
                continue
            name, op = m.groups()
            if op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", line)
                body = " ".join(comps.get(called.group(1), [])) if called else ""
                if " convolution(" in body:
                    op = "convolution (fused)"
                elif " dot(" in body:
                    op = "dot (fused)"
                elif " reduce(" in body or " reduce-window(" in body:
                    op = "reduce fusion (norms, softmax stats, bias grads)"
                elif " transpose(" in body or " copy(" in body:
                    op = "layout fusion (transpose/copy)"
                else:
                    op = "elementwise fusion"
            elif op in ("custom-call",) and "onednn" in line.lower():
                op = "oneDNN custom call"
            kinds[name] = op
    return kinds


def _ours_breakdown(run, compiled, repeats: int) -> list[tuple[str, float]]:
    import jax

    kinds = _hlo_kinds(compiled.as_text())
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(repeats):
            run()
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
        events = json.load(gzip.open(files[0]))["traceEvents"]
    by_kind: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e["name"]
        kind = kinds.get(name)
        if kind is None:
            base = re.sub(r"[.:]\d+$", "", name)
            kind = {"ynn_fusion": "YNNPACK fusion (conv/dot)", "xnn_fusion": "XNNPACK fusion (conv/dot)"}.get(base)
        if kind is None:
            continue  # runtime / Python events, not ops
        if kind in ("convolution", "convolution (fused)"):
            kind = "convolution"
        by_kind[kind] += e["dur"] / 1e6 / repeats
    return by_kind.most_common()


def _torch_breakdown(run, repeats: int) -> list[tuple[str, float]]:
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
    groups = {"convolution": ("conv",), "attention": ("attention", "_flash", "sdpa"),
              "group_norm": ("group_norm",), "layer_norm": ("layer_norm",), "linear/matmul": ("addmm", "mm", "bmm", "linear"),
              }
    out: collections.Counter = collections.Counter()
    for ev in prof.key_averages():
        name = ev.key.lower()
        if not name.startswith("aten::") and "backward" not in name.lower():
            continue
        # self time only, so nested calls are not counted twice
        secs = ev.self_cpu_time_total / 1e6 / repeats
        kind = "other (elementwise, copies, reductions)"
        for g, keys in groups.items():
            if any(k in name for k in keys):
                kind = g
                break
        out[kind] += secs
    return out.most_common()


def _conv_table(repeats: int) -> None:
    import time

    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(2)
    dn = ("NHWC", "HWIO", "NHWC")

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

    def shifts(x):
        h, w_ = x.shape[1:3]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return [xp[:, i:i + h, j:j + w_, :] for i in range(3) for j in range(3)]

    def im2col(x, w):
        return jnp.concatenate(shifts(x), axis=-1) @ w.reshape(-1, w.shape[-1])

    def shifted(x, w):
        return sum(s @ w[k // 3, k % 3] for k, s in enumerate(shifts(x)))

    @jax.custom_vjp
    def custom_dw(x, w):
        return xla(x, w)

    def _fwd(x, w):
        return xla(x, w), (x, w)

    def _bwd(res, dy):
        x, w = res
        dx = jax.lax.conv_general_dilated(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=dn)
        dyf = dy.reshape(-1, dy.shape[-1])
        dw = jnp.stack([s.reshape(-1, x.shape[-1]).T @ dyf for s in shifts(x)]).reshape(w.shape)
        return dx, dw

    custom_dw.defvjp(_fwd, _bwd)

    def clock(fn, n=repeats + 2):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    print(f"\none 3x3 conv, ms forward / forward+backward (mean of {repeats + 2})")
    print(f"{'(B, H, Cin, Cout)':22s} {'XLA conv':>14s} {'im2col':>14s} {'9 matmuls':>14s} {'custom dW':>14s} {'torch':>14s}")
    for shape in [(4, 32, 32, 32), (4, 16, 64, 64), (4, 8, 128, 128), (1, 64, 320, 320), (1, 32, 640, 640)]:
        b, h, c, o = shape
        rng = np.random.RandomState(0)
        x = jnp.asarray(rng.randn(b, h, h, c), jnp.float32)
        w = jnp.asarray(rng.randn(3, 3, c, o) * 0.05, jnp.float32)
        cells = []
        for f in (xla, im2col, shifted, custom_dw):
            fwd = jax.jit(f)
            both = jax.jit(jax.grad(lambda x, w, f=f: (f(x, w) ** 2).sum(), argnums=(0, 1)))
            cells.append(f"{clock(lambda: jax.block_until_ready(fwd(x, w))):6.2f} / "
                         f"{clock(lambda: jax.block_until_ready(both(x, w))):6.2f}")
        tx = torch.randn(b, c, h, h, requires_grad=True)
        tw = torch.randn(o, c, 3, 3, requires_grad=True)

        def t_both():
            (torch.nn.functional.conv2d(tx, tw, padding=1) ** 2).sum().backward()
        with torch.no_grad():
            t_fwd = clock(lambda: torch.nn.functional.conv2d(tx, tw, padding=1))
        cells.append(f"{t_fwd:6.2f} / {clock(t_both):6.2f}")
        print(f"{str(shape):22s} " + " ".join(f"{c:>14s}" for c in cells))


def _flag_worker(config: str, repeats: int) -> None:
    folder = checkpoint(config)
    run, _ = _ours_fn(folder, SIZES[config])
    r = timed(run, repeats)
    print(json.dumps({"first_s": r["first_s"], "median_s": r["median_s"]}))


@click.command()
@click.option("--config", default="small", type=click.Choice(sorted(SIZES)), show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--flags", "with_flags", is_flag=True, help="Also time our step under XLA:CPU flag variants.")
@click.option("--convs", is_flag=True, help="Only the table of 3x3 conv formulations (fast).")
@click.option("--flag-worker", is_flag=True, hidden=True)
def main(config: str, repeats: int, with_flags: bool, convs: bool, flag_worker: bool) -> None:
    if flag_worker:
        _flag_worker(config, repeats)
        return
    if convs:
        _conv_table(repeats)
        return
    import jax

    folder = checkpoint(config)
    size = SIZES[config]
    print(f"UNet fwd+bwd, {config} config, batch 4, {size // 8}x{size // 8} latents, 77-token context, fp32; "
          f"jax {jax.__version__} on {jax.default_backend()}, torch 2 threads")
    print(f"\n{'variant':44s} {'ours s':>8s} {'torch s':>8s} {'torch/ours':>10s}")
    results = {}
    for label, ablate in [("full", ()), ("attention -> identity", ("attention",)),
                          ("attention + GroupNorm -> identity", ("attention", "groupnorm"))]:
        ours_run, compiled = _ours_fn(folder, size, ablate)
        ours = timed(ours_run, repeats)["median_s"]
        torch_run, _ = _torch_fn(folder, size, ablate)
        ref = timed(torch_run, repeats)["median_s"]
        results[label] = (ours, ref)
        print(f"{label:44s} {ours:8.3f} {ref:8.3f} {ref / ours:9.2f}x")
        if label == "full":
            full_ours, full_compiled, full_torch = ours_run, compiled, torch_run
    (fo, ft), (ao, at), (go, gt) = results.values()
    print(f"{'=> attention costs':44s} {fo - ao:8.3f} {ft - at:8.3f}")
    print(f"{'=> GroupNorm costs':44s} {ao - go:8.3f} {at - gt:8.3f}")
    print(f"{'=> the rest (conv, linear, elementwise)':44s} {go:8.3f} {gt:8.3f} {gt / go:9.2f}x")

    print("\nper-op breakdown of the full step (seconds per step)")
    ours_ops = _ours_breakdown(full_ours, full_compiled, repeats)
    torch_ops = _torch_breakdown(full_torch, repeats)
    for i in range(max(len(ours_ops), len(torch_ops))):
        left = f"{ours_ops[i][0][:44]:44s} {ours_ops[i][1]:7.3f}" if i < len(ours_ops) else " " * 52
        right = f"{torch_ops[i][0][:40]:40s} {torch_ops[i][1]:7.3f}" if i < len(torch_ops) else ""
        print(f"  ours: {left}   torch: {right}")

    if with_flags:
        print(f"\nour full step under XLA:CPU flags (fresh process each)\n{'variant':28s} {'first s':>8s} {'step s':>8s}")
        for label, flags in FLAG_VARIANTS:
            env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
            proc = subprocess.run([sys.executable, __file__, "--flag-worker", "--config", config,
                                   "--repeats", str(repeats)], capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
                print(f"{label:28s} failed: {err[-1][:100] if err else proc.returncode}")
                continue
            r = json.loads(lines[-1])
            print(f"{label:28s} {r['first_s']:8.1f} {r['median_s']:8.3f}")


if __name__ == "__main__":
    main()
