"""Model arguments: a local path that does not exist says so (never a network error); a hub id
is downloaded with a timeout and a message. huggingface_hub.snapshot_download is replaced by
fakes here: nothing reaches the network."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models import load_pretrained, resolve_model_path
from dreambooth_jax.models.loading import looks_like_local_path


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake hub: ``hub.behave`` decides what snapshot_download does; calls are recorded."""

    class Hub:
        calls: list = []
        stop = threading.Event()
        behave = None

    def fake(repo_id, **kwargs):
        Hub.calls.append((repo_id, kwargs))
        return Hub.behave(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("DREAMBOOTH_HUB_TIMEOUT", raising=False)
    monkeypatch.chdir(tmp_path)
    yield Hub
    Hub.stop.set()  # let a fake that is still sleeping end


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_stalled_download_times_out_with_a_message(hub):
    def stall(repo_id, **kwargs):
        hub.stop.wait(3)  # longer than the timeout: a stalled network
        return str(Path.cwd())

    hub.behave = stall
    logged = []
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("someorg/some-model", timeout=0.5, log=logged.append)
    assert time.monotonic() - t0 < 2.5
    msg = _one_line(e)
    for part in ("'someorg/some-model'", "no progress for 0.5 s", "not a local folder", "check the path",
                 "go online", "HF_HUB_OFFLINE=1", "DREAMBOOTH_HUB_TIMEOUT"):
        assert part in msg, (part, msg)
    assert len(logged) == 1 and "downloading it from the hub" in logged[0] and "timeout 0.5 s" in logged[0]
    assert "someorg/some-model" in logged[0]
    # huggingface_hub's own per-request timeout is passed on, never longer than ours
    assert hub.calls[0][1]["etag_timeout"] <= 0.5


def test_timeout_from_environment(hub, monkeypatch, capsys):
    hub.behave = lambda repo_id, **k: hub.stop.wait(3) and ""
    monkeypatch.setenv("DREAMBOOTH_HUB_TIMEOUT", "0.3")
    with pytest.raises(CheckpointError, match="no progress for 0.3 s"):
        resolve_model_path("someorg/some-model")
    assert "downloading it from the hub (timeout 0.3 s" in capsys.readouterr().err  # default log: stderr
    monkeypatch.setenv("DREAMBOOTH_HUB_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="DREAMBOOTH_HUB_TIMEOUT='soon'"):
        resolve_model_path("someorg/some-model")


def test_slow_download_that_progresses_is_not_cut(hub):
    """The timeout counts time without progress in the repo's cache folder, not the whole download."""
    def slow(repo_id, **kwargs):
        blob = Path(constants.HF_HUB_CACHE) / "models--someorg--big-model" / "blobs" / "x.incomplete"
        blob.parent.mkdir(parents=True)
        for _ in range(15):  # 1.5 s in all, a new chunk every 0.1 s
            with open(blob, "ab") as f:
                f.write(b"x" * 100)
            time.sleep(0.1)
        snap = Path(constants.HF_HUB_CACHE) / "snap"
        snap.mkdir()
        return str(snap)

    hub.behave = slow
    path = resolve_model_path("someorg/big-model", timeout=0.6, log=lambda m: None)
    assert path.name == "snap"


def test_failed_download_says_what_was_tried(hub):
    def fail(repo_id, **kwargs):
        raise ConnectionError("Network is unreachable\n(a long traceback-like second line)")

    hub.behave = fail
    with pytest.raises(CheckpointError) as e:
        load_pretrained("someorg/some-model")
    msg = _one_line(e)
    for part in ("'someorg/some-model' is not a local folder", "ConnectionError: Network is unreachable",
                 "check the path", "go online", "HF_HUB_OFFLINE=1"):
        assert part in msg, (part, msg)


def test_offline_mode_message(hub, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fail(repo_id, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache")

    hub.behave = fail
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    logged = []
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set, so only the local hub cache was searched"):
        resolve_model_path("someorg/some-model", timeout=5, log=logged.append)
    assert "local hub cache" in logged[0]


def test_mistyped_local_path_is_not_a_hub_id(hub):
    hub.behave = lambda repo_id, **k: pytest.fail(f"tried to download {repo_id}")
    (Path("out") / "model1").mkdir(parents=True)
    (Path("out") / "modle").mkdir()
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("out/model")
    msg = _one_line(e)
    assert msg.startswith("model folder out/model does not exist (out/ exists; did you mean ")
    assert "out/model1" in msg and "out/modle" in msg
    with pytest.raises(CheckpointError,
                       match=r"out/zzz does not exist \(out/ exists; it has no folder named like 'zzz'\)"):
        resolve_model_path("out/zzz")
    with pytest.raises(CheckpointError, match=r"runs/a/model does not exist \(runs/a/ does not exist either\)"):
        resolve_model_path("runs/a/model")
    for local in ("./org/name", "../org/name", "/org/name", "~/org/name", "org/name/", "a/b/c", "org\\name",
                  Path("org/name")):
        with pytest.raises(CheckpointError, match="does not exist"):
            resolve_model_path(local)
    assert not hub.calls


def test_local_path_rule():
    assert looks_like_local_path("./x/y") and looks_like_local_path("x/y/") and looks_like_local_path("x/y/z")
    assert looks_like_local_path("justaname")  # hub ids of pipelines are 'org/name'
    assert not looks_like_local_path("stabilityai/stable-diffusion-2-1-base")


def test_hub_id_is_downloaded_when_it_is_one(hub, tmp_path):
    snap = tmp_path / "snapshot"
    snap.mkdir()
    hub.behave = lambda repo_id, **k: str(snap)
    assert resolve_model_path("someorg/some-model", timeout=5, log=lambda m: None) == snap
    repo_id, kwargs = hub.calls[0]
    assert repo_id == "someorg/some-model"
    # what huggingface_hub keeps of SD1.5's real file list with these patterns: the pipeline's
    # default weights and configs, not the root checkpoints, variants or .bin copies (~20 -> ~4 GB)
    from huggingface_hub.utils import filter_repo_objects

    files = ["model_index.json", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors", "v1-5-pruned.ckpt",
             "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
             "unet/diffusion_pytorch_model.bin", "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/spiece.model", "watermarker/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
             "safety_checker/model.safetensors", "feature_extractor/preprocessor_config.json",
             "big/diffusion_pytorch_model.safetensors.index.json", "big/diffusion_pytorch_model-00001-of-00002.safetensors",
             "config.json", "model.safetensors", "preprocessor_config.json"]  # + an encoder repo's root layout
    kept = set(filter_repo_objects(files, allow_patterns=kwargs["allow_patterns"],
                                   ignore_patterns=kwargs["ignore_patterns"]))
    assert kept == {f for f in files if not any(x in f for x in ("pruned", ".fp16.", "non_ema", ".bin", "safety", "watermark"))}
