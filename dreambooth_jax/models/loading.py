"""Load diffusers-layout pipeline folders into our Flax models (export back:
``models/export.py``; hub ids: ``models/hub.py``).

A folder looks like ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/`` (plus ``low_res_scheduler/`` for the x4 upscaler). Each model component holds a
``config.json`` and safetensors weights. Models are first built abstractly (``nnx.eval_shape``),
so no random weights are ever allocated for a checkpoint's parameters.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models.clip import CLIPTextConfig, CLIPTextModel
from dreambooth_jax.models.convert import load_component_weights, torch_to_state
from dreambooth_jax.models.hub import looks_like_local_path, resolve_model_path  # noqa: F401  (public here too)
from dreambooth_jax.models.options import ModelOptions
from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig


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
def build_model(cls, cfg, folder: Path, stem: str, opts: ModelOptions, rename: Callable[[str], str | None],
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
    return build_model(UNet2DConditionModel, cfg, folder, "diffusion_pytorch_model", opts, lambda k: k,
                  allow_pickle, variant)


def load_vae(folder: str | Path, opts: ModelOptions = ModelOptions(), *, allow_pickle: bool = False,
             variant: str | None = None) -> AutoencoderKL:
    folder = Path(folder)
    cfg = VAEConfig.from_diffusers(_read_json(folder / "config.json"), str(folder / "config.json"))
    return build_model(AutoencoderKL, cfg, folder, "diffusion_pytorch_model", opts, _vae_rename,
                  allow_pickle, variant)


def load_text_encoder(folder: str | Path, opts: ModelOptions = ModelOptions(), *,
                      allow_pickle: bool = False, variant: str | None = None) -> CLIPTextModel:
    folder = Path(folder)
    cfg = CLIPTextConfig.from_transformers(_read_json(folder / "config.json"), str(folder / "config.json"))
    return build_model(CLIPTextModel, cfg, folder, "model", opts, _clip_rename, allow_pickle, variant)


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
    """Prompts -> (B, max_length) int32 ids, padded and truncated as SD pipelines do.

    A prompt longer than ``max_length`` tokens (with its start/end tokens) is cut as the SD
    pipelines cut it, with a UserWarning naming the prompt, its length and the words dropped.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    n = max_length or tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True).input_ids
    warn_truncated(tokenizer, prompts, n)
    return np.asarray(ids, dtype=np.int32)


def warn_truncated(tokenizer, prompts: list[str], n: int) -> None:
    """Warn for each prompt cut at ``n`` tokens. Counted word by word (CLIP's BPE never merges
    across whitespace, so the counts add up), so that the warning names whole words."""
    specials = len(tokenizer("").input_ids)  # <start> and <end>
    for prompt in prompts:
        words = prompt.split()
        if not words:
            continue
        counts = np.cumsum([len(t) for t in tokenizer(words, add_special_tokens=False).input_ids])
        if counts[-1] + specials <= n:
            continue
        first = int(np.searchsorted(counts, n - specials, side="right"))  # first word not wholly kept
        partly = first > 0 and counts[first - 1] < n - specials or first == 0 and n - specials > 0
        dropped = " ".join(words[first:])
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        cut = dropped if len(dropped) <= 80 else dropped[:38] + " ... " + dropped[-38:]
        warnings.warn(f"prompt '{short}' is {int(counts[-1]) + specials} tokens long, more than the text "
                      f"encoder's limit of {n}; its end is dropped{' (the first word in part)' if partly else ''}: "
                      f"'{cut}'", UserWarning, stacklevel=3)


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
    if str(index.get("_class_name", "")).startswith("IF"):
        raise ConfigError(f"{root / 'model_index.json'}: {index['_class_name']} is a DeepFloyd IF pipeline (pixel "
                          "space, T5 text encoder, no VAE): load it with dreambooth_jax.models.if_loading.load_if")
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

