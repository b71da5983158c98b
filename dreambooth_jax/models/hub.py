"""Where a model argument points: a local folder, or a hub id downloaded (safetensors, JSON and
text files only) with a timeout on progress. Nothing touches the network unless the argument is
not a local path and looks like a hub id."""

from __future__ import annotations

import difflib
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from dreambooth_jax.errors import CheckpointError, ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The default weights of each component and the configs / tokenizer files, nothing else: hub repos
# also hold single-file checkpoints at their root, fp16 / non-EMA / EMA variants and .bin copies
# (SD1.5's repo: ~20 GB in all, ~4 GB of it the pipeline loads).
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model-*.safetensors",
            "model.safetensors", "model-*.safetensors")
_HUB_PATTERNS = ["*.json", "*.txt", "*/spiece.model", *_WEIGHTS, *(f"*/{w}" for w in _WEIGHTS)]  # spiece: IF's T5
_HUB_IGNORE = ["safety_checker/*", "watermarker/*"]  # weights no sampler here uses
HUB_TIMEOUT_ENV = "DREAMBOOTH_HUB_TIMEOUT"
DEFAULT_HUB_TIMEOUT = 60.0  # seconds without download progress before we give up


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def looks_like_local_path(s: str) -> bool:
    """Whether a model argument that does not exist is meant as a local path (else a hub id).

    Local: starts with ./ ../ / ~ (or is . or ..), ends with a slash, holds a backslash or not
    exactly one slash (hub ids are 'org/name'), or its first component is an existing local
    folder ('out/model' while out/ exists). Everything else that matches 'org/name' is a hub id.
    """
    if s in (".", "..") or s.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if "\\" in s or s.endswith("/") or s.count("/") != 1 or (os.sep != "/" and os.sep in s):
        return True
    return Path(s.split("/", 1)[0]).is_dir() or not _HUB_ID.match(s)


def _missing_folder(p: Path) -> CheckpointError:
    """'model folder X does not exist', with what does exist nearby and close names."""
    parent = p.parent
    if parent.is_dir():
        try:
            siblings = sorted(c.name for c in parent.iterdir() if c.is_dir())
        except OSError:
            siblings = []
        close = difflib.get_close_matches(p.name, siblings, n=3, cutoff=0.6)
        where = f"{parent}/ exists" if str(parent) not in ("", ".") else ""
        hint = f"did you mean {' or '.join(str(parent / c) for c in close)}?" if close else ""
        if not hint and where:
            hint = f"it has no folder named like '{p.name}'"
        extra = "; ".join(x for x in (where, hint) if x)
    else:
        a = parent
        while not a.exists() and a != a.parent:
            a = a.parent
        extra = f"{parent}/ does not exist either" + (
            f"; {a}/ is the deepest part that exists" if str(a) not in ("", ".", "/") and a.is_dir() else "")
    return CheckpointError(f"model folder {p} does not exist" + (f" ({extra})" if extra else ""))


def resolve_model_path(path_or_hub_id: str | Path, *, timeout: float | None = None,
                       log: Callable[[str], None] | None = None) -> Path:
    """A local folder as is; a hub id ('org/name') is downloaded (safetensors/json/txt only).

    Nothing touches the network unless the argument is not an existing path, does not look
    like a local path (see ``looks_like_local_path``; a ``Path`` object always is one) and
    looks like a hub id. A download that makes no progress for ``timeout`` seconds (default:
    env DREAMBOOTH_HUB_TIMEOUT, else 60) is abandoned with a CheckpointError; ``log``
    (default: stderr) says what is being downloaded.
    """
    p = Path(path_or_hub_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"model path {p} is a file; expected a diffusers pipeline folder")
        return p
    s = str(path_or_hub_id)
    if isinstance(path_or_hub_id, Path) or looks_like_local_path(s):
        raise _missing_folder(p)
    return _download_from_hub(s, _hub_timeout(timeout), log or _stderr)


def _hub_timeout(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    env = os.environ.get(HUB_TIMEOUT_ENV, "").strip()
    if not env:
        return DEFAULT_HUB_TIMEOUT
    try:
        value = float(env)
        if value <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"environment variable {HUB_TIMEOUT_ENV}={env!r} is not a positive number "
                          "of seconds") from None
    return value


def _download_progress(folder: Path | None) -> tuple:
    """(files, bytes, newest mtime) under the repo's hub cache folder: changes while downloading."""
    if folder is None or not folder.is_dir():
        return (0, 0, 0)
    n = size = newest = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            n, size, newest = n + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return (n, size, newest)


def _download_from_hub(repo_id: str, timeout: float, log: Callable[[str], None]) -> Path:
    """snapshot_download in a worker thread, watched: it is abandoned (CheckpointError) when the
    repo's cache folder has not changed for ``timeout`` s. huggingface_hub's own per-request
    timeouts (HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT, 10 s each by default) still apply,
    but with its retries a stalled network could keep it waiting far longer, silently."""
    fix = ("check the path if you meant a local folder, go online, or set HF_HUB_OFFLINE=1 to use "
           "a copy already in the local hub cache")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise CheckpointError(f"'{repo_id}' is not a local folder, and downloading it as a hub id needs "
                              "huggingface_hub installed; check the path") from None
    offline = bool(getattr(constants, "HF_HUB_OFFLINE", False))
    try:
        from huggingface_hub.file_download import repo_folder_name

        cache = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    except (ImportError, AttributeError, TypeError):  # other huggingface_hub layout: wall-clock timeout
        cache = None
    etag_timeout = min(timeout, float(getattr(constants, "HF_HUB_ETAG_TIMEOUT", 10)))
    what = "looking it up in the local hub cache (HF_HUB_OFFLINE)" if offline else "downloading it from the hub"
    log(f"'{repo_id}' is not a local folder: {what} (timeout {timeout:g} s without progress; "
        f"env {HUB_TIMEOUT_ENV})...")
    result: dict[str, Any] = {}

    def work():
        try:
            result["path"] = huggingface_hub.snapshot_download(
                repo_id, allow_patterns=_HUB_PATTERNS, ignore_patterns=_HUB_IGNORE, etag_timeout=etag_timeout)
        except BaseException as e:  # noqa: BLE001  handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, name=f"hub-download {repo_id}", daemon=True)
    worker.start()
    last, since = _download_progress(cache), time.monotonic()
    while True:
        worker.join(min(1.0, max(timeout / 4, 0.01)))
        if not worker.is_alive():
            break
        now = _download_progress(cache)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > timeout:
            # The worker thread cannot be stopped; it is a daemon and dies with the process.
            raise CheckpointError(
                f"downloading '{repo_id}' from the hub made no progress for {timeout:g} s (no network, or it "
                f"stalled); '{repo_id}' is not a local folder. To fix: {fix}, or set {HUB_TIMEOUT_ENV} "
                "to wait longer")
    if "error" in result:
        e = result["error"]
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        reason = f"{type(e).__name__}: {reason}" if reason else type(e).__name__
        if offline:
            raise CheckpointError(
                f"'{repo_id}' is not a local folder, and HF_HUB_OFFLINE is set, so only the local hub cache "
                f"was searched: {reason}. To fix: check the path, or unset HF_HUB_OFFLINE and go online "
                "to download it") from None
        raise CheckpointError(f"'{repo_id}' is not a local folder, and downloading it from the hub failed: "
                              f"{reason}. To fix: {fix}") from None
    return Path(result["path"])

