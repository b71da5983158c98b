"""scripts/check_env.py: the version report and the declared-range check (the runs it makes are
the same code paths the train/sample tests cover; running it takes a minute: `make check-env`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_env.py"


@pytest.fixture(scope="module")
def check_env():
    spec = importlib.util.spec_from_file_location("check_env", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["check_env"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_versions_and_declared_ranges(check_env):
    import jax

    v = check_env.versions()
    assert v["jax"] == jax.__version__ and v["python"].count(".") == 2
    rows = {name: (spec, have, ok) for name, spec, have, ok in check_env.declared_ranges()}
    assert rows, "dreambooth-jax is not installed (pip install -e .): no declared requirements to check"
    spec, have, ok = rows["jax"]
    assert have == jax.__version__ and ok, f"CI's jax {have} must be inside the declared range {spec}"
    assert all(ok for _, _, ok in rows.values()), {k: r for k, r in rows.items() if not r[2]}
    assert not any(name in rows for name in ("torch", "diffusers", "pytest")), "extras leaked into the core check"


def test_keep_folder_is_never_overwritten(check_env, tmp_path):
    from click.testing import CliRunner

    res = CliRunner().invoke(check_env.main, ["--keep", str(tmp_path)])
    assert res.exit_code == 2 and "exists" in res.output and "Traceback" not in res.output
