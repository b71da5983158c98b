"""The run folder (``output_dir``): a lock so that two runs never share it, the loss history
appended as it goes and kept across resumes, the config kept with its history, and filesystem
faults (full disk, read-only folder) turned into one line that says what to do.

Layout: ``config.json`` (this run's settings; an earlier, different one is kept as
``config.previous-<time>.json``), ``.lock``, ``base/`` and ``sr/`` (``checkpoints/``,
``metrics.jsonl``, ``metrics.json``, ``tensorboard/``, ``validation/``), ``model/``, ``sr_model/``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from dreambooth_jax.errors import DreamboothError

LOCK_NAME = ".lock"


class RunFolderError(DreamboothError):
    """The output folder cannot be used (a file, read-only, full, or held by another run)."""


# ----------------------------------------------------------------------------- the folder
def prepare_output_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it is a writable folder (before anything expensive)."""
    out = Path(path)
    for p in [out, *out.parents]:
        if p.exists():
            if not p.is_dir():
                raise RunFolderError(f"output_dir {out}: {p} is a file, not a folder; choose another output_dir")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f"output_dir {out} is not writable ({describe_os_error(e)}); "
                             "choose another output_dir") from e
    return out


class RunLock:
    """An exclusive ``flock`` on ``output_dir/.lock`` for the life of a run. The kernel drops it
    when the process ends however it ends (kill -9 included), so a lock is never stale; the file
    says who holds it."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_NAME
        self._fd = None

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(f"cannot lock {self.path}: {describe_os_error(e)}") from e
            try:
                holder = json.loads(self.path.read_text())
                who = (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: "
                       f"{holder.get('command', '')}")
            except (OSError, ValueError, KeyError):
                who = "another process"
            raise RunFolderError(f"output_dir {self.path.parent} is in use by another run ({who}); wait for it "
                                 "to finish or stop it, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
        os.write(fd, (json.dumps(info) + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def write_config(folder: Path, config: dict) -> Path:
    """Write ``config.json``; an existing one with other settings (an earlier run in this folder)
    is kept as ``config.previous-<its time>.json``, never overwritten."""
    path = folder / "config.json"
    text = json.dumps(config, indent=2) + "\n"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old == config:
            return path
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
        keep = folder / f"config.previous-{stamp}.json"
        n = 1
        while keep.exists():
            n += 1
            keep = folder / f"config.previous-{stamp}-{n}.json"
        path.replace(keep)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- metrics
class MetricsLog:
    """The loss history as JSON lines (``metrics.jsonl``), appended and flushed at every logged
    step, so it survives kill -9 and is kept across resumes. On resume at step ``s`` the lines of
    steps after ``s`` (computed after the last checkpoint, about to be computed again) are dropped."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        kept = [m for m in read_metrics(self.path) if m.get("step", 0) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        tmp.replace(self.path)
        self._f = open(self.path, "a")

    def append(self, metrics: dict) -> None:
        if self.enabled:
            self._f.write(json.dumps(metrics) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled and not self._f.closed:
            self._f.close()

    def history(self) -> list[dict]:
        return read_metrics(self.path) if self.enabled else []


def read_metrics(path: Path) -> list[dict]:
    """Every complete line of a ``metrics.jsonl`` (a line cut by a kill is skipped)."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


# ----------------------------------------------------------------------------- faults
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def find_os_error(exc: BaseException) -> OSError | None:
    """The first OSError from a full disk or a read-only/forbidden target in ``exc``'s chain
    (Orbax and tensorstore wrap them), or one recognised from the message alone."""
    seen = set()
    e = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL + _READ_ONLY:
            return e
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return OSError(errno.ENOSPC, "No space left on device")
        if "Read-only file system" in text:
            return OSError(errno.EROFS, "Read-only file system")
        e = e.__cause__ or e.__context__
    return None


def describe_os_error(e: OSError) -> str:
    if e.errno in _DISK_FULL:
        return "disk full"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


def filesystem_error(exc: BaseException, output_dir: Path) -> RunFolderError | None:
    """A one-line error for a filesystem fault during a run, or None if ``exc`` is not one."""
    e = find_os_error(exc)
    if e is None:
        return None
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    what = describe_os_error(e)
    if e.strerror and e.errno is not None and e.strerror != os.strerror(e.errno):
        where += f": {e.strerror}"  # our own message (e.g. the space a checkpoint needs)
    fix = "free some space" if e.errno in _DISK_FULL else "make it writable"
    return RunFolderError(f"{what} while writing to {output_dir}{where}. Nothing complete was lost: {fix} and "
                          "rerun the same command; it resumes from the last complete checkpoint")


def config_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
