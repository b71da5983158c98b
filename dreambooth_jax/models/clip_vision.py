"""CLIP (transformers' ``CLIPModel``: text and vision towers with their projections) in Flax NNX,
for the DreamBooth paper's CLIP-I (image-image) and CLIP-T (prompt-image) scores.

The text tower is ``clip.CLIPTextModel`` (the SD text encoder); the vision tower's encoder layers
are ``clip.CLIPEncoderLayer`` too. Parameter paths equal the checkpoint's keys (``text_model.*``,
``vision_model.*``, ``visual_projection.weight``, ``text_projection.weight``, ``logit_scale``), as
``save_pretrained`` writes them and ``openai/clip-vit-base-patch32`` / ``-large-patch14`` ship.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.clip import PRETRAINED_KEYS as _PRETRAINED_KEYS
from dreambooth_jax.models.clip import TEXT_DEFAULTS as _TEXT_DEFAULTS
from dreambooth_jax.models.clip import CLIPEncoder, CLIPTextConfig, CLIPTextModel
from dreambooth_jax.models.layers import Conv2d, LayerNorm, Linear
from dreambooth_jax.models.loading import build_model
from dreambooth_jax.models.options import ModelOptions, check_choice, parse_config
from dreambooth_jax.models.vit import check_patches, patch_tokens, read_model_config

_VISION_SUPPORTED = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
# architectures is null inside a CLIPModel's config.json (transformers 4 wrote every attribute)
_VISION_FIXED = dict(attention_dropout=(0.0,), dropout=(0.0,), model_type=("clip_vision_model",),
                     architectures=(["CLIPVisionModel"], None))
# + the generic token ids, null in a vision config
_VISION_IGNORED = _PRETRAINED_KEYS | {"bos_token_id", "eos_token_id", "pad_token_id"}
_FIXED = dict(model_type=("clip",), architectures=(["CLIPModel"],))
# logit_scale_init_value: the checkpoint holds logit_scale itself
_IGNORED = (_PRETRAINED_KEYS - {"projection_dim"}) | {"text_config", "vision_config", "text_config_dict",
                                                      "vision_config_dict", "logit_scale_init_value"}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    raw: dict
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_channels: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "config.json") -> "CLIPVisionConfig":
        c = parse_config(raw, _VISION_SUPPORTED, source, fixed=_VISION_FIXED, ignored=_VISION_IGNORED)
        check_choice(c["hidden_act"], ("quick_gelu", "gelu"), "hidden_act", source)
        check_patches(c, source)
        return cls(raw=dict(raw), **{k: c[k] for k in _VISION_SUPPORTED})


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    raw: dict
    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "config.json") -> "CLIPConfig":
        c = parse_config(raw, dict(projection_dim=512), source, fixed=_FIXED, ignored=_IGNORED)
        text = _sub_config(raw, "text", _TEXT_DEFAULTS, source)
        return cls(raw=dict(raw), projection_dim=c["projection_dim"],
                   text=CLIPTextConfig.from_transformers(text, f"{source} (text_config)"),
                   vision=CLIPVisionConfig.from_transformers(_sub_config(raw, "vision", _VISION_SUPPORTED, source),
                                                             f"{source} (vision_config)"))


def _sub_config(raw: Mapping[str, Any], name: str, defaults: Mapping[str, Any], source: str) -> dict:
    """``raw[name + '_config']``, with transformers' handling of the legacy ``*_config_dict`` key
    (openai/clip-vit-large-patch14 has one): CLIPConfig rebuilds the sub-config from it over the
    defaults, so every forward-relevant key it lacks takes the default (e.g. ``eos_token_id``)."""
    sub, legacy = raw.get(f"{name}_config") or {}, raw.get(f"{name}_config_dict")
    if not isinstance(sub, dict) or not isinstance(legacy, (dict, type(None))):
        raise ConfigError(f"{source}: '{name}_config' and '{name}_config_dict' must be JSON objects")
    return {**sub, **defaults, **legacy} if legacy is not None else dict(sub)


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), opts.param_dtype))
        self.patch_embedding = Conv2d(cfg.num_channels, d, cfg.patch_size, opts, stride=cfg.patch_size,
                                      use_bias=False, rngs=rngs)
        self.position_embedding = nnx.Embed((cfg.image_size // cfg.patch_size) ** 2 + 1, d, dtype=opts.dtype,
                                            param_dtype=opts.param_dtype, rngs=rngs)
        self.image_size = cfg.image_size

    def __call__(self, pixel_values):
        positions = self.position_embedding(jnp.arange(self.position_embedding.num_embeddings))
        return patch_tokens(pixel_values, self.patch_embedding, self.class_embedding[...], positions, self.image_size)


class CLIPVisionModel(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = CLIPVisionEmbeddings(cfg, opts, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts, rngs=rngs)  # (sic) transformers' name
        self.encoder = CLIPEncoder(cfg, opts, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixel_values (B, H, W, C) float, H = W = config.image_size, normalised as CLIP's image
        processor does -> (last_hidden_state (B, 1 + patches, D), pooled (B, D)), float32.

        As in transformers, last_hidden_state is the encoder's output; only the pooled CLS token
        goes through ``post_layernorm``.
        """
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            h = layer(h, None)
        return h.astype(jnp.float32), self.post_layernorm(h[:, 0]).astype(jnp.float32)


class CLIPModel(nnx.Module):
    def __init__(self, cfg: CLIPConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.opts = opts
        self.text_model = CLIPTextModel(cfg.text, opts, rngs=rngs)
        self.vision_model = CLIPVisionModel(cfg.vision, opts, rngs=rngs)
        self.visual_projection = Linear(cfg.vision.hidden_size, cfg.projection_dim, opts, use_bias=False, rngs=rngs)
        self.text_projection = Linear(cfg.text.hidden_size, cfg.projection_dim, opts, use_bias=False, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, opts.param_dtype))  # log(1 / 0.07), CLIP's init

    def image_embeds(self, pixel_values: jax.Array, *, normalize: bool = True) -> jax.Array:
        """(B, H, W, C) preprocessed images -> (B, projection_dim) float32: transformers'
        ``CLIPOutput.image_embeds`` (L2-normalised), or ``get_image_features`` with normalize=False."""
        return self._project(self.visual_projection, self.vision_model(pixel_values)[1], normalize)

    def text_embeds(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                    normalize: bool = True) -> jax.Array:
        """(B, L) token ids -> (B, projection_dim) float32: the EOS token's state (pooled as
        ``CLIPTextModel`` pools) projected; ``CLIPOutput.text_embeds`` (L2-normalised), or
        ``get_text_features`` with normalize=False."""
        return self._project(self.text_projection, self.text_model(input_ids, attention_mask)[1], normalize)

    def _project(self, projection: Linear, pooled: jax.Array, normalize: bool) -> jax.Array:
        e = projection(pooled.astype(self.opts.dtype)).astype(jnp.float32)
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True) if normalize else e


def _clip_model_rename(key: str) -> str | None:
    return None if key.endswith(".embeddings.position_ids") else key  # buffers in older checkpoints


def load_clip(folder: str | Path, opts: ModelOptions = ModelOptions(), *, allow_pickle: bool = False,
              variant: str | None = None) -> CLIPModel:
    """A transformers ``CLIPModel`` folder (config.json with text_config / vision_config +
    model.safetensors, or shards with their index), e.g. openai/clip-vit-base-patch32.

    ConfigError (naming the file) for a folder without config.json, a config of another model
    (a ViT, a text encoder alone, a diffusers UNet...) or with keys that would change the forward;
    CheckpointError for missing or mismatched weights.
    """
    folder = Path(folder)
    raw, source = read_model_config(folder, "clip", "a transformers CLIPModel folder such as "
                                                    "openai/clip-vit-base-patch32")
    cfg = CLIPConfig.from_transformers(raw, source)
    return build_model(CLIPModel, cfg, folder, "model", opts, _clip_model_rename, allow_pickle, variant)
