"""scripts/bench_device.py on CPU at the tiny config: the LoRA row for real (both sides, one process per
part), every row with -m slow, and the report when the torch side is skipped, missing or fails (parts
faked, no subprocess)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_device.py"
LABELS = ("train: full fine-tuning (AdamW)", "train: LoRA rank 16", "sampler")


def _module():
    """The script as a module (it puts scripts/ and the repo root on sys.path: undone here)."""
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("bench_device", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclass looks its module up there
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = saved
    return mod


def _rows(text: str) -> dict[str, list[str]]:
    """Table rows of the report: label -> its 9 cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in LABELS:
            rows[cells[0]] = cells[1:]
    return rows


def _run(tmp_path: Path, *args: str) -> tuple[str, dict[str, list[str]]]:
    """The script on CPU at the tiny config, 1 steady call; (stdout, table rows), checked: numbers everywhere."""
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(os.environ, DREAMBOOTH_BENCH_DIR=str(tmp_path / "bench"),
               XLA_FLAGS=f"{flags} --xla_backend_optimization_level=0".strip(),
               OMP_NUM_THREADS="1")  # torch's spinning OpenMP threads crawl on a shared 2-core box
    out = tmp_path / "table.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", "tiny", "--repeats", "1", "--steps", "1",
                           "--images", "1", "--no-remat", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "versions: python" in proc.stdout and "jax 0." in proc.stdout and "device: cpu" in proc.stdout
    assert "peak RSS" in proc.stdout  # CPU: no device memory stats, and the table says so
    rows = _rows(proc.stdout)
    for label, cells in rows.items():
        assert len(cells) == 9, (label, cells)
        values = [float(c) for c in cells]  # every time, memory and ratio is a number
        assert all(v > 0 for v in values), (label, cells)
    assert _rows(out.read_text()) == rows
    assert (tmp_path / "bench" / "device-tiny" / "model_index.json").exists()
    return proc.stdout, rows


def test_tiny_lora_row_both_sides(tmp_path):
    """The default suite's share (~15 s): both train parts' code paths, LoRA branch, in real processes."""
    _, rows = _run(tmp_path, "--rows", "train_lora")
    assert set(rows) == {"train: LoRA rank 16"}


@pytest.mark.slow
def test_tiny_run_has_every_row_and_numeric_ratios(tmp_path):
    """All six parts (about a minute on 2 idle cores, more on a busy machine)."""
    _, rows = _run(tmp_path)
    assert set(rows) == set(LABELS)


def _fake_spawn(calls: list, fail: str = ""):
    """A stand-in for the part processes: fixed results, ``fail`` fails; records the parts asked for."""
    def spawn(part: str, settings: dict) -> dict:
        calls.append(part)
        if part == fail:
            return {"error": "OOM"}
        if part == "setup":
            return dict(backend="cpu", device_kind="cpu", device_count=1, device_memory_gb=None, cuda=None, cpus=2,
                        host_memory_gb=24.0, config=settings["config"].replace("auto", "small"), folder="/nowhere",
                        folder_s=0.1)
        return dict(first_s=2.0, steady_s=0.5, peak_gb=1.0, peak_kind="rss", dtype="float32", device="cpu")
    return spawn


def test_missing_diffusers_prints_our_rows_and_how_to_bring_it(monkeypatch):
    mod, calls = _module(), []
    monkeypatch.setattr(mod, "spawn", _fake_spawn(calls))
    monkeypatch.setattr(mod, "missing_torch_packages", lambda: ["diffusers"])
    res = CliRunner().invoke(mod.main, [])
    assert res.exit_code == 0, res.output
    assert calls == ["setup", "ours/train_full", "ours/train_lora", "ours/sample"]
    assert "config small" in res.output  # the CPU default
    assert "diffusers not installed" in res.output and "--find-links .whl" in res.output
    rows = _rows(res.output)
    assert set(rows) == set(LABELS)
    for cells in rows.values():
        assert cells[:3] == ["2.00", "0.500", "1.00"] and cells[3:] == ["-"] * 6


def test_skip_flags_and_a_failed_part(monkeypatch):
    mod, calls = _module(), []
    monkeypatch.setattr(mod, "spawn", _fake_spawn(calls, fail="torch/sample"))
    res = CliRunner().invoke(mod.main, ["--config", "tiny"])
    assert res.exit_code == 0, res.output
    rows = _rows(res.output)
    assert rows[LABELS[0]][6:] == ["1.00", "1.00", "1.00"]
    assert rows["sampler"][3:] == ["-"] * 6 and "torch sampler: failed: OOM" in res.output
    calls.clear()
    res = CliRunner().invoke(mod.main, ["--config", "tiny", "--skip-ours"])
    assert res.exit_code == 0 and calls == ["setup", "torch/train_full", "torch/train_lora", "torch/sample"]
    res = CliRunner().invoke(mod.main, ["--skip-ours", "--skip-torch"])
    assert res.exit_code != 0 and "nothing to run" in res.output
    res = CliRunner().invoke(mod.main, ["--rows", "sample,train"])
    assert res.exit_code != 0 and "--rows: choose from train_full, train_lora, sample" in res.output
