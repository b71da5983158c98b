"""Load diffusers-layout pipeline folders into our Flax models, and export them back.

A folder looks like ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` (plus ``low_res_scheduler/`` for the x4 upscaler). Each model component holds a
``config.json`` and safetensors weights. Models are first built abstractly (``nnx.eval_shape``),
so no random weights are ever allocated for a checkpoint's parameters.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.models.clip import CLIPTextConfig, CLIPTextModel
from dreambooth_jax.models.convert import (load_component_weights, state_to_torch, torch_to_state,
                                           write_safetensors)
from dreambooth_jax.models.options import ModelOptions
from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig

DIFFUSERS_VERSION = "0.42.1"  # written into exported configs; any diffusers >= 0.20 reads them
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors"]


@dataclasses.dataclass
class Pipeline:
    """The components of a diffusers pipeline folder, as our models."""

    path: Path
    model_index: dict
    unet: UNet2DConditionModel | None = None
    vae: AutoencoderKL | None = None
    text_encoder: CLIPTextModel | None = None
    tokenizer: Any = None
    scheduler_config: dict | None = None
    low_res_scheduler_config: dict | None = None  # x4 upscaler: noise augmentation schedule
    max_noise_level: int | None = None  # x4 upscaler

    @property
    def is_upscaler(self) -> bool:
        return self.low_res_scheduler_config is not None


# ----------------------------------------------------------------------------- paths
def resolve_model_path(path_or_hub_id: str | Path) -> Path:
    """A local folder as is; a hub id ('org/name') is downloaded (safetensors/json/txt only).

    Nothing touches the network unless the argument is not a local path and looks like a hub id.
    """
    p = Path(path_or_hub_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"model path {p} is a file; expected a diffusers pipeline folder")
        return p
    s = str(path_or_hub_id)
    if s.startswith((".", "/", "~")) or not _HUB_ID.match(s):
        raise CheckpointError(f"model folder {p} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(s, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model...
        raise CheckpointError(f"'{s}' is not a local folder, and downloading it as a hub id failed: "
                              f"{type(e).__name__}: {e}") from e


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _component_dir(root: Path, name: str) -> Path:
    d = root / name
    if not d.is_dir():
        raise CheckpointError(f"{root} has no '{name}/' component folder (is it a diffusers pipeline folder?)")
    return d


# ----------------------------------------------------------------------------- components
def _build(cls, cfg, folder: Path, stem: str, opts: ModelOptions, rename: Callable[[str], str | None],
           allow_pickle: bool, variant: str | None):
    abstract = nnx.eval_shape(lambda: cls(cfg, opts, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tensors = load_component_weights(folder, stem, allow_pickle=allow_pickle, variant=variant)
    state = torch_to_state(tensors, state, source=str(folder), rename=rename,
                           dtype=np.dtype(opts.param_dtype))
    state = jax.tree.map(jnp.asarray, state)  # host numpy -> device arrays
    return nnx.merge(graphdef, state)


def _vae_rename(key: str) -> str:
    # diffusers < 0.14 attention names in the VAE mid-block (still in many SD folders)
    for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                     (".proj_attn.", ".to_out.0.")):
        if ".attentions." in key and old in key:
            return key.replace(old, new)
    return key


def _clip_rename(key: str) -> str | None:
    key = key.removeprefix("text_model.")
    return None if key == "embeddings.position_ids" else key  # a buffer, not a parameter


def load_unet(folder: str | Path, opts: ModelOptions = ModelOptions(), *, allow_pickle: bool = False,
              variant: str | None = None) -> UNet2DConditionModel:
    folder = Path(folder)
    cfg = UNetConfig.from_diffusers(_read_json(folder / "config.json"), str(folder / "config.json"))
    return _build(UNet2DConditionModel, cfg, folder, "diffusion_pytorch_model", opts, lambda k: k,
                  allow_pickle, variant)


def load_vae(folder: str | Path, opts: ModelOptions = ModelOptions(), *, allow_pickle: bool = False,
             variant: str | None = None) -> AutoencoderKL:
    folder = Path(folder)
    cfg = VAEConfig.from_diffusers(_read_json(folder / "config.json"), str(folder / "config.json"))
    return _build(AutoencoderKL, cfg, folder, "diffusion_pytorch_model", opts, _vae_rename,
                  allow_pickle, variant)


def load_text_encoder(folder: str | Path, opts: ModelOptions = ModelOptions(), *,
                      allow_pickle: bool = False, variant: str | None = None) -> CLIPTextModel:
    folder = Path(folder)
    cfg = CLIPTextConfig.from_transformers(_read_json(folder / "config.json"), str(folder / "config.json"))
    return _build(CLIPTextModel, cfg, folder, "model", opts, _clip_rename, allow_pickle, variant)


def load_tokenizer(folder: str | Path, max_length: int = 77):
    """transformers' CLIPTokenizer from a ``tokenizer/`` folder: vocab.json + merges.txt (real SD
    folders) or tokenizer.json (as transformers 5 saves it)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    has_bpe = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not has_bpe and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"tokenizer folder {folder} has neither vocab.json + merges.txt nor tokenizer.json")
    tok = CLIPTokenizer.from_pretrained(str(folder))
    if tok.model_max_length > 100_000:  # transformers' "unset" sentinel
        tok.model_max_length = max_length
    return tok


def tokenize(tokenizer, prompts: list[str] | str, max_length: int | None = None) -> np.ndarray:
    """Prompts -> (B, max_length) int32 ids, padded and truncated as SD pipelines do."""
    if isinstance(prompts, str):
        prompts = [prompts]
    n = max_length or tokenizer.model_max_length
    ids = tokenizer(list(prompts), padding="max_length", max_length=n, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int32)


def default_tokenizer():
    """The CLIP BPE tokenizer shipped with the package (identical vocabulary to SD's)."""
    return load_tokenizer(Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer")


# ----------------------------------------------------------------------------- pipelines
_LOADERS = {"unet": load_unet, "vae": load_vae, "text_encoder": load_text_encoder}
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def load_pretrained(path_or_hub_id: str | Path, opts: ModelOptions = ModelOptions(), *,
                    components: tuple[str, ...] = COMPONENTS, allow_pickle: bool = False,
                    variant: str | None = None, text_encoder_opts: ModelOptions | None = None) -> Pipeline:
    """Load a Stable Diffusion (1.x/2.x) or x4-upscaler pipeline folder or hub id.

    components: which parts to load (e.g. only ('unet',) to export a trained UNet).
    text_encoder_opts: options for the text encoder if they differ from the UNet/VAE ones.
    """
    root = resolve_model_path(path_or_hub_id)
    index = _read_json(root / "model_index.json")
    pipe = Pipeline(path=root, model_index=index)
    for name in components:
        if name in _LOADERS:
            o = text_encoder_opts if (name == "text_encoder" and text_encoder_opts) else opts
            setattr(pipe, name, _LOADERS[name](_component_dir(root, name), o, allow_pickle=allow_pickle,
                                               variant=variant))
        elif name == "tokenizer":
            pipe.tokenizer = load_tokenizer(_component_dir(root, "tokenizer"))
        elif name == "scheduler":
            pipe.scheduler_config = _read_json(_component_dir(root, "scheduler") / "scheduler_config.json")
            if "low_res_scheduler" in index:
                pipe.low_res_scheduler_config = _read_json(
                    _component_dir(root, "low_res_scheduler") / "scheduler_config.json")
                pipe.max_noise_level = int(index.get("max_noise_level", 350))
        else:
            raise ValueError(f"unknown component {name!r}; choose from {COMPONENTS}")
    return pipe


# ----------------------------------------------------------------------------- export
_EXPORT = {
    UNet2DConditionModel: ("UNet2DConditionModel", "diffusion_pytorch_model", ""),
    AutoencoderKL: ("AutoencoderKL", "diffusion_pytorch_model", ""),
    CLIPTextModel: ("CLIPTextModel", "model", "text_model."),
}


def save_component(model: nnx.Module, folder: str | Path, *, overwrite: bool = False,
                   dtype=np.float32) -> Path:
    """Write one model as a diffusers/transformers component folder (config.json + safetensors)."""
    folder = Path(folder)
    class_name, stem, prefix = _EXPORT[type(model)]
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise CheckpointError(f"refusing to overwrite non-empty folder {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(model.config.raw)
    if isinstance(model, CLIPTextModel):
        config.setdefault("architectures", ["CLIPTextModel"])
        config.setdefault("model_type", "clip_text_model")
    else:
        config["_class_name"] = class_name
        config.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    tensors = state_to_torch(nnx.state(model, nnx.Param), dtype=dtype)
    write_safetensors(folder / f"{stem}.safetensors", {prefix + k: v for k, v in tensors.items()})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def export_pipeline(source: str | Path, out: str | Path, models: dict[str, nnx.Module], *,
                    overwrite: bool = False) -> Path:
    """Write a complete pipeline folder: ``source``'s files, with ``models`` (e.g. the fine-tuned
    ``{'unet': unet}``) written in place of the originals. ``source`` is never modified."""
    source, out = resolve_model_path(source), Path(out)
    if out.resolve() == source.resolve():
        raise CheckpointError(f"export folder {out} is the source folder; choose another")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"refusing to overwrite non-empty folder {out}")
        shutil.rmtree(out)
    top = source.resolve()
    skip = lambda d, names: [n for n in names if Path(d).resolve() == top and n in models]
    shutil.copytree(source, out, ignore=skip)
    for name, model in models.items():
        save_component(model, out / name)
    return out
