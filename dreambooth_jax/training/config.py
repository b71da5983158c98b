"""Typed training config: YAML file + ``key=value`` overrides, validated in one place.

Every field has a comment; unknown keys (typos) are errors naming the key and the close matches;
override values are parsed as YAML and checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import io
import math
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dreambooth_jax.errors import ConfigError


@dataclasses.dataclass
class TrainConfig:
    # --- model and data
    model: str = ""  # diffusers pipeline folder or hub id (the frozen prior): Stable Diffusion or DeepFloyd IF stage I
    instance_dir: str = ""  # folder with the 3-5 subject photos
    instance_prompt: str = "a photo of sks dog"  # "a [V] [class]"
    class_prompt: str = "a photo of dog"  # "a [class]"
    class_dir: str = ""  # class (prior) images: a folder, or tfds:NAME[/SPLIT]; generated if empty
    class_data_dir: str = ""  # TFDS data dir for tfds: class sources
    num_class_images: int = 200  # prior images to use (generated if missing)
    class_sampler: str = "ddpm"  # sampler for class-image generation (the paper: ancestral)
    class_steps: int = 50  # sampler steps per class image
    class_guidance: float = 7.5  # classifier-free guidance scale of the class images
    resolution: int = 512  # training image size (pixels; DeepFloyd IF stage I: 64)
    center_crop: bool = True  # square crop at the centre (else at a seeded random position)
    flip: bool = True  # horizontal flip augmentation (latents precomputed for both flips)
    output_dir: str = "runs/dreambooth"  # the run folder: checkpoints, logs, validation grids, export
    export_dtype: str = ""  # weights of the exported folder: "" = the source model's, or float32 | float16 | bfloat16
    # --- method
    with_prior_preservation: bool = True  # add lambda x the loss on class images (the paper's method)
    prior_loss_weight: float = 1.0  # lambda
    train_text_encoder: bool = False  # also fine-tune the CLIP text encoder (full fine-tuning only)
    min_snr_gamma: float | None = None  # Min-SNR loss weighting gamma (e.g. 5); null: plain MSE
    offset_noise: float = 0.0  # std of a per-channel constant added to the training noise (0: off)
    # --- LoRA (lora_rank 0: full fine-tuning)
    lora_rank: int = 0  # adapter rank; > 0 trains LoRA adapters only, the base weights stay frozen
    lora_alpha: float | None = None  # adapter scale is lora_alpha / lora_rank; null: alpha = rank
    lora_targets: str = "attention"  # attention (to_q/k/v/out.0, on IF also add_k/v_proj) | attention+ff | all (every linear+conv) | names
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_text_encoder: bool = False  # also adapters on the text encoder's q/k/v/out_proj (trained)
    lora_init: str = "gaussian"  # gaussian down / zero up: step 0 computes the base model exactly
    # --- optimisation
    max_train_steps: int = 1000  # base-stage optimizer steps; 0: only the SR stage is trained (the base model stays frozen)
    train_batch_size: int = 1  # instance images per step (the same number of class images is added)
    learning_rate: float = 5e-6  # peak learning rate (LoRA wants ~1e-4)
    optimizer: str = "adamw"  # adamw (fp32 moments) | adafactor (factored moments: ~1/3 of AdamW's state memory)
    memory: str = ""  # "" | 16gb: full fine-tuning of SD1.5 at 512 px on one 16 GB chip (see README)
    lr_schedule: str = "constant"  # constant | warmup_constant | cosine
    lr_warmup_steps: int = 0  # linear warm-up steps (warmup_constant, cosine)
    adam_b1: float = 0.9  # AdamW beta1
    adam_b2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 1e-2  # decoupled weight decay
    max_grad_norm: float = 1.0  # global gradient-norm clipping
    grad_accum: int = 1  # micro-batches accumulated per optimizer step
    ema_decay: float | None = None  # keep an EMA of the weights (e.g. 0.9999) for export; null: none
    seed: int = 0  # noise, timesteps, dropout and data order
    # --- compute
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    remat: bool = False  # recompute activations in the backward (less memory, ~1/3 more compute)
    fsdp: int = 1  # size of the mesh's fsdp axis (params/optimizer state split over it)
    attention: str = "auto"  # auto | matmul | chunked | xla | flash (auto: per backend and shape)
    # --- SR stage (x4 upscaler) fine-tuning
    sr_model: str = ""  # x4 upscaler (SD) or IF stage II (IF) folder/hub id; empty: no SR stage
    sr_noise_level: int = 5  # low-res noise augmentation for the pairs (lowered, as in the paper; sample with it)
    sr_max_train_steps: int = 500  # SR-stage optimizer steps
    sr_learning_rate: float = 5e-6  # SR-stage learning rate
    sr_resolution: int = 256  # high-res size of the pairs (low-res is a quarter; IF stage II: 256)
    # --- checkpoints, logging, validation
    checkpoint_every: int = 250  # steps between Orbax checkpoints (and on SIGTERM)
    keep_checkpoints: int = 2  # newest checkpoints kept per stage
    log_every: int = 10  # steps between logged scalars (TensorBoard and stderr)
    validation_every: int = 0  # steps between validation grids; 0: only at the end
    validation_prompts: list = dataclasses.field(default_factory=lambda: ["a photo of sks dog in the snow"])  # sampled into a grid
    validation_steps: int = 25  # sampler steps of the validation images
    validation_seed: int = 0  # the validation images' seed (the same each time: comparable grids)

    def __post_init__(self):
        check(self)


def _allowed(tp) -> tuple:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return tuple(a for t in typing.get_args(tp) for a in _allowed(t))
    if origin is not None:
        return (origin,)
    return (float, int) if tp is float else (tp,)


def check(cfg: TrainConfig) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        allowed = _allowed(hints[f.name])
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            names = "/".join("null" if a is type(None) else a.__name__ for a in allowed)
            raise ConfigError(f"config key '{f.name}': expected {names}, got {v!r}")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config key 'dtype': {cfg.dtype!r} is not float32 or bfloat16")
    from dreambooth_jax.training.state import OPTIMIZERS

    _choice(cfg, "optimizer", OPTIMIZERS)
    _choice(cfg, "memory", ("", "16gb"))
    if cfg.memory == "16gb":
        apply_memory_preset(cfg)
    _choice(cfg, "lr_schedule", ("constant", "warmup_constant", "cosine"))
    _choice(cfg, "export_dtype", ("", "float32", "float16", "bfloat16"))
    from dreambooth_jax.diffusion.samplers import SAMPLER_NAMES
    from dreambooth_jax.models.attention import IMPLS

    _choice(cfg, "class_sampler", SAMPLER_NAMES)
    _choice(cfg, "attention", IMPLS)
    for key in ("train_batch_size", "resolution", "grad_accum", "fsdp", "class_steps",
                "sr_max_train_steps", "sr_resolution", "checkpoint_every", "log_every", "validation_steps"):
        _at_least(cfg, key, 1, "")
    _at_least(cfg, "keep_checkpoints", 1, " (0 would delete every checkpoint, and a run could never resume)")
    _at_least(cfg, "num_class_images", 1 if cfg.with_prior_preservation else 0,
              " with prior preservation (or set with_prior_preservation=false)")
    for key in ("max_train_steps", "lr_warmup_steps", "validation_every", "seed", "validation_seed", "sr_noise_level"):
        _at_least(cfg, key, 0, "")
    for key in ("learning_rate", "sr_learning_rate", "adam_eps", "max_grad_norm"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) > 0):
            raise ConfigError(f"config key '{key}' must be a finite number > 0, got {getattr(cfg, key)}")
    for key in ("prior_loss_weight", "weight_decay", "offset_noise", "class_guidance"):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise ConfigError(f"config key '{key}' must be a finite number >= 0, got {getattr(cfg, key)}")
    for key in ("adam_b1", "adam_b2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.ema_decay is not None and not 0 < cfg.ema_decay < 1:
        raise ConfigError(f"config key 'ema_decay' must be in (0, 1), got {cfg.ema_decay}")
    if cfg.min_snr_gamma is not None and not (math.isfinite(cfg.min_snr_gamma) and cfg.min_snr_gamma > 0):
        raise ConfigError(f"config key 'min_snr_gamma' must be > 0 (or null for plain MSE), got {cfg.min_snr_gamma}")
    # IF stage II noises over 1000 steps; the model's own maximum (an x4 upscaler's 350) is checked in preflight
    if cfg.sr_noise_level > 999:
        raise ConfigError(f"config key 'sr_noise_level' must be in [0, 999], got {cfg.sr_noise_level}")
    if cfg.max_train_steps == 0 and not cfg.sr_model:
        raise ConfigError("config key 'max_train_steps' is 0 (the base stage is not trained) but there is no "
                          "sr_model to train; set max_train_steps >= 1 or give sr_model")
    if cfg.sr_resolution % 4:
        raise ConfigError(f"config key 'sr_resolution' ({cfg.sr_resolution}) must be a multiple of 4 "
                          "(the low-res input is a quarter of it)")
    if not all(isinstance(p, str) and p.strip() for p in cfg.validation_prompts):
        raise ConfigError(f"config key 'validation_prompts' must be a list of non-empty strings, "
                          f"got {cfg.validation_prompts!r}")
    _at_least(cfg, "lora_rank", 0, " (0 = full fine-tuning)")
    if cfg.lora_alpha is not None and not (math.isfinite(cfg.lora_alpha) and cfg.lora_alpha > 0):
        raise ConfigError(f"config key 'lora_alpha' must be a number > 0 (or null for alpha = rank), got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"config key 'lora_dropout' must be in [0, 1), got {cfg.lora_dropout}")
    _choice(cfg, "lora_init", ("gaussian",))
    if not cfg.lora_targets.strip():
        raise ConfigError("config key 'lora_targets' is empty (presets: attention, attention+ff, all)")
    if cfg.lora_rank == 0 and cfg.lora_text_encoder:
        raise ConfigError("config key 'lora_text_encoder' needs lora_rank > 0 (LoRA mode); for full fine-tuning "
                          "of the text encoder set train_text_encoder: true")
    if cfg.lora_rank > 0 and cfg.train_text_encoder:
        raise ConfigError("with lora_rank > 0 the text encoder is trained through adapters: set "
                          "lora_text_encoder: true instead of train_text_encoder")
    for key in ("instance_prompt", "class_prompt"):
        if not getattr(cfg, key).strip():
            raise ConfigError(f"config key '{key}' is empty")


def apply_memory_preset(cfg: TrainConfig) -> None:
    """memory: 16gb -- bf16 compute, remat and (full fine-tuning) Adafactor instead of AdamW; EMA is
    refused (a second fp32 copy of the model). Measured in the README's memory table."""
    if cfg.ema_decay is not None:
        raise ConfigError("memory: 16gb keeps no EMA copy of the weights (another fp32 model); remove ema_decay "
                          "or the preset")
    cfg.dtype, cfg.remat = "bfloat16", True
    if cfg.optimizer == "adamw" and not cfg.lora_rank:
        cfg.optimizer = "adafactor"


def _choice(cfg: TrainConfig, key: str, allowed: tuple) -> None:
    if getattr(cfg, key) not in allowed:
        raise ConfigError(f"config key '{key}': {getattr(cfg, key)!r} is not one of {', '.join(allowed)}")


def _at_least(cfg: TrainConfig, key: str, low: int, why: str) -> None:
    if getattr(cfg, key) < low:
        raise ConfigError(f"config key '{key}' must be >= {low}{why}, got {getattr(cfg, key)}")


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """One config key as documented in TrainConfig's source: its section, default and comment."""

    section: str
    key: str
    default: Any
    comment: str


def config_reference() -> list[KeyDoc]:
    """Every TrainConfig key in source order with its section (the ``# --- ...`` lines), default
    and end-of-line comment, read from the class's source so the docs cannot drift from it."""
    comments, sections, section = {}, {}, ""
    tokens = tokenize.generate_tokens(io.StringIO(inspect.getsource(TrainConfig)).readline)
    line_key = None
    for tok in tokens:
        if tok.type == tokenize.NL or tok.type == tokenize.NEWLINE:
            line_key = None
        elif tok.type == tokenize.NAME and line_key is None and tok.start[1] == 4:
            line_key = tok.string
            sections[line_key] = section
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[1] == 4 and text.startswith("---"):
                section = text.strip("- ").strip()
            elif line_key:
                comments[line_key] = text
    out = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        out.append(KeyDoc(sections.get(f.name, ""), f.name, default, comments.get(f.name, "")))
    return out


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def describe_keys() -> str:
    """The config keys as help text: one line per key, grouped by section."""
    lines, section = [], None
    for d in config_reference():
        if d.section != section:
            section = d.section
            lines += ["", f"{section}:"] if lines else [f"{section}:"]
        lines.append(f"  {d.key} = {_yaml_value(d.default)}" + (f"  -- {d.comment}" if d.comment else ""))
    return "\n".join(lines)


def to_yaml(cfg: TrainConfig) -> str:
    """A complete, commented YAML of ``cfg`` (every key, in sections) that load_config reads back
    to an equal config: the file to start one's own from."""
    lines = ["# dreambooth-jax training config: python -m dreambooth_jax.train --config THIS_FILE [key=value ...]",
             "# every key with its value; the comment says what it does and, where the value differs, the default"]
    section = None
    for d in config_reference():
        if d.section != section:
            section = d.section
            lines += ["", f"# --- {section}"]
        value = getattr(cfg, d.key)
        note = d.comment + ("" if value == d.default else f" (default: {_yaml_value(d.default)})")
        lines.append(f"{d.key}: {_yaml_value(value)}" + (f"  # {note.strip()}" if note.strip() else ""))
    return "\n".join(lines) + "\n"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (or start from defaults) and apply ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        _check_keys(values, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        _check_keys({key: None}, "command line")
        values[key] = yaml.safe_load(raw) if raw != "" else ""
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def _coerce(key: str, value: Any) -> Any:
    # YAML 1.1 reads '1e-5' (no dot) as a string; accept it for float fields.
    if isinstance(value, str) and float in _allowed(typing.get_type_hints(TrainConfig)[key]):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _check_keys(values: dict, source: str) -> None:
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{key}'{hint}")
