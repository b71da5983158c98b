"""Shared helpers of the benchmark scripts: reference checkpoints, timing, RSS."""

from __future__ import annotations

import os
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(os.environ.get("DREAMBOOTH_BENCH_DIR", Path.home() / ".cache" / "dreambooth_jax" / "bench"))


def checkpoint(name: str, family: str | None = None) -> Path:
    """The benchmark config's random-weight pipeline (seed 0), saved once in the diffusers layout."""
    from dreambooth_jax.testing.reference import make_pipeline_folder

    folder = BENCH_DIR / name
    if not (folder / "model_index.json").exists():
        make_pipeline_folder(folder, name, seed=0)
    return folder


def peak_rss_gb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def timed(fn: Callable, repeats: int = 3, warmup: int = 1) -> dict:
    """First call (compile + run), then the median of ``repeats`` steady calls after ``warmup``."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "median_s": statistics.median(times), "times": times}
