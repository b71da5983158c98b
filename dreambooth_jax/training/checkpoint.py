"""Orbax checkpoints of the train state, with named items, keep policy and exact resume.

Items: ``state`` (step, trainable params, optimizer state, EMA: arrays, restored straight into
their shardings) and ``meta`` (JSON: config, data position, rng seed, anything else the loop
needs to continue exactly where it stopped).
"""

from __future__ import annotations

import errno
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).resolve()
        if keep < 1:  # keeping none would delete every checkpoint: a run could never resume
            raise ValueError(f"keep must be >= 1, got {keep}")
        # cleanup_tmp_directories: a save cut short (kill -9, full disk) leaves a tmp folder that
        # is never a valid checkpoint; it is removed when the folder is opened again.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                               enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save (asynchronously where enabled); call ``wait()`` before relying on it on disk.

        A save that cannot fit on the disk is refused before Orbax writes anything: its failure
        midway would come from background threads as hundreds of lines, and the partial folder
        is useless anyway. Raises OSError(ENOSPC) saying how much is needed."""
        self._check_space(step, state)
        self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into ``abstract_state`` (ShapeDtypeStructs carrying shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def _check_space(self, step: int, state: Any) -> None:
        if jax.process_index() != 0:
            return
        need = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        need = int(need * 1.02) + (1 << 20)  # zstd rarely shrinks float weights; metadata, JSON
        self.directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise OSError(errno.ENOSPC, f"the checkpoint of step {step} needs about {need / 2**20:.0f} MB, "
                                        f"{free / 2**20:.0f} MB are free", str(self.directory))

    def read_meta(self, step: int | None = None) -> dict | None:
        """The JSON ``meta`` item of a checkpoint (config, step), without touching its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return out.meta

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, as a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Preempted(SystemExit):
    """A SIGTERM/SIGINT was honoured: what could be saved is saved; exit status 0 (a preempted
    TPU VM or a scheduler's stop is not a failure, and rerunning the command resumes)."""

    def __init__(self):
        super().__init__(0)


class StopSignal:
    """Remembers a SIGTERM/SIGINT (TPU preemption, Ctrl-C) so the loop can save and exit cleanly.

    Installed only around the training loop and restored afterwards; only in the main thread.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._signals = signals
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self._signals:
                self._previous[s] = signal.signal(s, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        return False

    @property
    def requested(self) -> bool:
        return self._event.is_set()
