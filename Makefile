# One-command entry points. `make test` sets up .venv and runs the default (fast) test suite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-all demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

test: setup
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q

test-all: setup
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(BIN)/python -m pytest -q -m ''

# The embedded default: toy prior + toy subject -> class images, DreamBooth (base + SR), samples, metrics.
demo: setup
	$(BIN)/python -m dreambooth_jax.demo --out out/demo

clean:
	rm -rf $(VENV) out
