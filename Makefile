# One-command entry points. `make test` sets up .venv and runs the default (fast) test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-core check-env memory-report-tpu test test-other-cpu test-faults test-all demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Installed once per change of pyproject.toml (editable: code changes need no reinstall).
# setup-core: what the package needs to run (the demo); setup: + the test extra (PyTorch, diffusers,
# TFDS: the numerical reference, gigabytes), for make test.
setup-core: $(VENV)/.installed-core

$(VENV)/.installed-core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

setup: $(VENV)/.installed

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	# the lpips package is LPIPS' reference; its torchvision requirement cannot be met beside this torch
	# (tests/test_lpips.py stands in torchvision's feature stacks), hence --no-deps
	$(BIN)/pip install -q --no-deps lpips==0.1.4
	touch $(VENV)/.installed-core $@

# The suite is mostly XLA compiles of tiny models: LLVM at -O0 compiles them ~25% faster (10 vs 14
# minutes in all); XLA:CPU's fast-math is off, so the level does not change float semantics (the
# parity tests pass at both). test-other-cpu below runs them again at the default level.
test: setup
	XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0" \
		$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The float parity tests again on other CPU kernels (torch's generic ATen kernels, XLA limited to
# SSE4.2): their bounds must hold on any CPU, not only on the one they were written on.
test-other-cpu: setup
	ATEN_CPU_CAPABILITY=default XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_max_isa=SSE4_2" \
		$(BIN)/python -m pytest -q tests/test_schedules.py tests/test_samplers.py tests/test_samplers_if.py

# Real processes preempted, killed, locked out and out of disk, then resumed (a few minutes).
test-faults: setup
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -m faults

test-all: setup
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -m ''

# The embedded default: toy prior + toy subject -> class images, DreamBooth (base + SR), samples, metrics.
demo: setup-core
	$(BIN)/python -m dreambooth_jax.demo --out out/demo

# Is this environment able to run the package (another Python, jax, a TPU/GPU runtime)? PASS or FAIL.
check-env: setup-core
	$(BIN)/python scripts/check_env.py

# The README's memory table as the TPU compiler sees it (v5e, ahead of time: libtpu only, no TPU).
memory-report-tpu: setup
	$(BIN)/pip install -q --no-deps --target .libtpu "libtpu==$$($(BIN)/python -c 'import importlib.metadata as m; print([r.split("==")[1].split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")][0])')"
	PYTHONPATH=.libtpu JAX_PLATFORMS=cpu $(BIN)/python scripts/scale_report.py --table --target tpu-v5e

clean:
	rm -rf $(VENV) out
