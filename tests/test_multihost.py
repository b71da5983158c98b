"""Two processes on localhost (jax.distributed + gloo CPU collectives, 4 devices each) compute
the same train step as one process with 8 devices."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(pipeline_dirs, tmp_path):
    d = str(pipeline_dirs("sd1"))
    port = str(_free_port())
    ref = tmp_path / "ref.npz"
    subprocess.run([sys.executable, str(WORKER), d, str(ref), "0", "1", port], check=True, timeout=600,
                   capture_output=True)
    out = tmp_path / "multi.npz"
    procs = [subprocess.Popen([sys.executable, str(WORKER), d, str(out), str(i), "2", port],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=600)[0].decode()[-3000:] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    a, b = np.load(ref), np.load(out)
    assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * abs(float(a["loss"]))
    n = len([k for k in a.files if k.startswith("p")])
    assert n > 10
    for i in range(n):
        np.testing.assert_allclose(b[f"p{i}"], a[f"p{i}"], atol=2e-6, rtol=1e-5)
