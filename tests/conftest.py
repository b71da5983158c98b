"""Shared fixtures: tiny random-weight pipeline folders saved by diffusers/transformers."""

from __future__ import annotations

import jax
import pytest

try:  # the reference side; absent where only the package is installed (tests without torch still run)
    import torch
except ImportError:
    torch = None

# Parity is measured against float32 PyTorch: ask XLA for full-precision matmuls on CPU.
jax.config.update("jax_default_matmul_precision", "highest")
# One thread per pytest worker (make test runs 2 workers on 2 cores): with more, the tiny models'
# forwards wait on oversubscribed OpenMP threads for seconds.
if torch is not None:
    torch.set_num_threads(1)

FAMILIES = ("sd1", "sd2", "upscaler")


@pytest.fixture(scope="session")
def pipeline_dirs(tmp_path_factory):
    """{'sd1' | 'sd2' | 'upscaler': folder} built lazily, once per test session."""
    from dreambooth_jax.testing.reference import make_pipeline_folder

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_pipeline_folder(tmp_path_factory.mktemp(name) / "pipe", name, seed=0, perturb=0.02)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def torch_pipelines(pipeline_dirs):
    """The same folders loaded by diffusers (the reference)."""
    from diffusers import DiffusionPipeline

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = DiffusionPipeline.from_pretrained(str(pipeline_dirs(name)))
        return cache[name]

    return get


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """JAX's persistent compilation cache for the session: the many runs of the same tiny models
    (each run builds new jitted functions) compile each program once."""
    import os

    base = tmp_path_factory.getbasetemp()
    # under pytest-xdist every worker has its own basetemp inside a shared one: share the cache
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_cache"
    folder.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model is a test failure: these errors must come before any model is loaded."""
    def fail(*args, **kwargs):
        raise AssertionError(f"load_pretrained{args} called before the options were checked")

    monkeypatch.setattr("dreambooth_jax.models.load_pretrained", fail)
