"""Attention kernels: each of our paths vs torch's scaled_dot_product_attention.

    python scripts/bench_attention.py --quick          # a few minutes on 2 CPU cores
    python scripts/bench_attention.py                  # every shape below
    python scripts/bench_attention.py --shapes sd15-4096,vae-4096 --reps 7 --dtype bfloat16

Per shape, forward and forward+backward (gradients of q, k, v), float32 by default. On JAX's
default backend; torch runs on the CPU, or on CUDA when JAX's backend is a GPU and torch sees
one. Where ``auto`` picks a kernel that is none of the named paths (cuDNN on a GPU, Pallas on a
TPU), it gets a column of its own. Our paths are called
through ``dreambooth_jax.models.attention.attention`` with (B, L, H, D) inputs, as the models call
it (so the layout transposes are included); torch gets (B, H, L, D). Timings of torch and of each
of our paths alternate within every repetition, so load from other processes hits all of them
alike; each number is the median over the repetitions (after a compile/warm-up call).
``torch.set_num_threads`` is set to the CPU count the process may use (2 here), which is also what
XLA's thread pool uses. The last columns: the path ``auto`` picks on this backend, the fastest
path, and torch's time / ours (> 1: we are faster). Paths whose score matrix (B*H*Lq*Lk floats)
would exceed --max-score-gib are skipped ('-'): the matmul, chunked and xla paths hold it (the
chunked path's autodiff backward stores every chunk's probabilities).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dreambooth_jax.models import attention as A  # noqa: E402

PATHS = ("matmul", "chunked", "flash", "xla")

# name: (B, H, Lq, Lk, D)
SHAPES = {
    "small-1024": (4, 8, 1024, 1024, 8),  # small config, top UNet level (32x32 latents)
    "small-1024-x77": (4, 8, 1024, 77, 8),
    "sd15-4096": (1, 8, 4096, 4096, 40),  # SD1.5 at 512 px: 64x64 latents, 320 ch, 8 heads
    "sd15-4096-x77": (1, 8, 4096, 77, 40),
    "sd15-1024": (1, 8, 1024, 1024, 80),
    "sd15-1024-x77": (1, 8, 1024, 77, 80),
    "sd15-256": (1, 8, 256, 256, 160),
    "sd15-256-x77": (1, 8, 256, 77, 160),
    "sd21-9216": (1, 5, 9216, 9216, 64),  # SD2.1 at 768 px: 96x96 latents, head dim 64
    "sd21-9216-x77": (1, 5, 9216, 77, 64),
    "sd21-2304": (1, 10, 2304, 2304, 64),
    "sd21-2304-x77": (1, 10, 2304, 77, 64),
    "sd21-576": (1, 20, 576, 576, 64),
    "sd21-576-x77": (1, 20, 576, 77, 64),
    "vae-4096": (1, 1, 4096, 4096, 512),  # VAE mid-block at 512 px
}
QUICK = ("small-1024", "small-1024-x77", "sd15-4096", "sd15-4096-x77", "sd15-1024", "sd21-576", "vae-4096")


def _sync():
    if torch.cuda.is_available() and jax.default_backend() == "gpu":
        torch.cuda.synchronize()


def _jax_fns(impl, g):
    fwd = jax.jit(lambda q, k, v: A.attention(q, k, v, impl=impl))
    loss = lambda q, k, v: jnp.vdot(A.attention(q, k, v, impl=impl), g)
    return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def bench_shape(shape, reps: int, max_score_gib: float, paths=PATHS, dtype="float32"):
    b, h, lq, lk, d = shape
    rng = np.random.default_rng(0)
    mk = lambda l: rng.standard_normal((b, l, h, d)).astype(np.float32)
    q, k, v, g = mk(lq), mk(lk), mk(lk), mk(lq)
    jq, jk, jv, jg = (jnp.asarray(t, dtype) for t in (q, k, v, g))
    dev = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    tdt = getattr(torch, dtype)
    tt = lambda t, grad: torch.tensor(t.transpose(0, 2, 1, 3).copy(), dtype=tdt, device=dev, requires_grad=grad)
    tq, tk, tv = (tt(t, True) for t in (q, k, v))
    tg = tt(g, False)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv)
        _sync()

    def torch_fwdbwd():
        tq.grad = tk.grad = tv.grad = None
        sdpa(tq, tk, tv).backward(tg)
        _sync()

    score_gib = b * h * lq * lk * 4 / 2 ** 30
    fns = {"fwd": {"torch": torch_fwd}, "fwd+bwd": {"torch": torch_fwdbwd}}
    for impl in paths:
        if impl not in ("flash", "auto") and score_gib > max_score_gib:
            continue
        f, fb = _jax_fns(impl, jg)
        fns["fwd"][impl] = lambda f=f: jax.block_until_ready(f(jq, jk, jv))
        fns["fwd+bwd"][impl] = lambda fb=fb: jax.block_until_ready(fb(jq, jk, jv))
    results = {}
    for mode, cands in fns.items():
        for fn in cands.values():  # compile and warm up
            fn()
            fn()
        times = {name: [] for name in cands}
        for _ in range(reps):
            for name, fn in cands.items():  # interleaved: torch, matmul, chunked, flash, xla, torch, ...
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        results[mode] = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"shapes {', '.join(QUICK)}; 3 repetitions")
    ap.add_argument("--shapes", default="", help=f"comma-separated names from: {', '.join(SHAPES)}")
    ap.add_argument("--reps", type=int, default=0, help="repetitions per timing (default 5, 3 with --quick)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--max-score-gib", type=float, default=1.0,
                    help="skip the paths that hold the score matrix above this size (default 1 GiB)")
    args = ap.parse_args(argv)
    names = [s for s in args.shapes.split(",") if s] or (list(QUICK) if args.quick else list(SHAPES))
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    reps = args.reps or (3 if args.quick else 5)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)
    load0 = os.getloadavg()
    backend = jax.default_backend()
    tdev = "cuda" if backend == "gpu" and torch.cuda.is_available() else f"cpu, {threads} threads"
    print(f"# jax {jax.__version__} ({backend}: {jax.devices()[0].device_kind}), torch {torch.__version__} ({tdev}), "
          f"{args.dtype}, {reps} interleaved repetitions, medians in ms; load average before: {load0[0]:.2f}",
          flush=True)
    plans = {n: A.attention_plan((b, lq, h, d), (b, lk, h, d), args.dtype, backend)[0]
             for n, (b, h, lq, lk, d) in ((n, SHAPES[n]) for n in names)}
    paths = PATHS + (("auto",) if any(p not in PATHS for p in plans.values()) else ())
    cols = ("torch",) + paths
    head = f"{'shape (B,H,Lq,Lk,D)':<22} {'pass':<8}" + "".join(f"{c:>9}" for c in cols) + \
        f" {'auto':>7} {'best':>8} {'torch/best':>10}"
    print(head)
    print("-" * len(head), flush=True)
    t_start = time.time()
    for name in names:
        shape = SHAPES[name]
        auto = plans[name]
        res = bench_shape(shape, reps, args.max_score_gib, paths, args.dtype)
        for mode, r in res.items():
            ours = {p: r[p] for p in paths if p in r}
            best = min(ours, key=ours.get)
            cells = "".join(f"{r[c]:9.1f}" if c in r else f"{'-':>9}" for c in cols)
            label = ",".join(map(str, shape))
            print(f"{label:<22} {mode:<8}{cells} {auto:>7} {best:>8} {r['torch'] / ours[best]:10.2f}", flush=True)
    load1 = os.getloadavg()
    print(f"# {time.time() - t_start:.0f} s; load average after: {load1[0]:.2f} (1 min), {load1[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
