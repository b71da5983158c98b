"""ViT image encoder (transformers' ``ViTModel``) in Flax NNX: the DINO metric's feature extractor.

The DreamBooth paper's DINO score is the cosine similarity of ViT-S/16 DINO embeddings
(``facebook/dino-vits16``): the CLS token of ``last_hidden_state``, after the final layernorm.
transformers' optional pooler (dense + tanh on that token; DINO checkpoints are converted without
it) is not part of the DINO embedding and is not built; its weights are skipped if a checkpoint
has them.

A ViT encoder layer is the pre-LN block CLIP uses too (layernorm, attention with q/k/v/out biases,
residual, layernorm, two-layer MLP, residual), so the layers are ``clip.CLIPEncoderLayer`` and the
loader maps ViT's names onto it. Checkpoints are read in transformers' on-disk layout
(``encoder.layer.N.attention.attention.query.weight``..., what ``save_pretrained`` writes and the
hub holds) or with transformers 5's module names (``layers.N.attention.q_proj.weight``...).
Images are NHWC; the model takes its config's ``image_size`` only (no position interpolation).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.clip import PRETRAINED_KEYS as _PRETRAINED_KEYS
from dreambooth_jax.models.clip import CLIPEncoderLayer
from dreambooth_jax.models.layers import Conv2d, LayerNorm
from dreambooth_jax.models.loading import build_model
from dreambooth_jax.models.options import ModelOptions, check_choice, parse_config

_SUPPORTED = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
)
_FIXED = dict(hidden_dropout_prob=(0.0,), attention_probs_dropout_prob=(0.0,), qkv_bias=(True,),
              model_type=("vit",), architectures=(["ViTModel"],))
# + the pooler's shape and activation (not built, see above) and the masked-image-modeling decoder's stride
_IGNORED = _PRETRAINED_KEYS | {"pooler_output_size", "pooler_act", "encoder_stride"}

# checkpoint key -> our key, applied in order: the on-disk layout to transformers 5's names, then
# those to the names of the CLIP encoder layer we reuse
_RENAMES = tuple((re.compile(a), b) for a, b in (
    (r"^encoder\.layer\.(\d+)\.", r"layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"\.attention\.([qkv])_proj\.", r".self_attn.\1_proj."),
    (r"\.attention\.o_proj\.", ".self_attn.out_proj."),
    (r"\.layernorm_before\.", ".layer_norm1."),
    (r"\.layernorm_after\.", ".layer_norm2."),
))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    raw: dict
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    image_size: int
    patch_size: int
    num_channels: int

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "config.json") -> "ViTConfig":
        c = parse_config(raw, _SUPPORTED, source, fixed=_FIXED, ignored=_IGNORED)
        check_choice(c["hidden_act"], ("gelu", "quick_gelu"), "hidden_act", source)
        check_patches(c, source)
        return cls(raw=dict(raw), **{k: c[k] for k in _SUPPORTED})


def check_patches(c: Mapping[str, Any], source: str) -> None:
    """image_size / patch_size / heads of a parsed ViT or CLIP vision config: what we implement."""
    for key in ("image_size", "patch_size"):
        if not isinstance(c[key], int) or isinstance(c[key], bool):
            raise ConfigError(f"{source}: '{key}' is {c[key]!r}; dreambooth-jax implements square images and "
                              "patches (one int)")
    if c["image_size"] % c["patch_size"]:
        raise ConfigError(f"{source}: image_size {c['image_size']} is not a multiple of patch_size {c['patch_size']}")
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ConfigError(f"{source}: hidden_size {c['hidden_size']} is not a multiple of num_attention_heads "
                          f"{c['num_attention_heads']}")


def read_json_config(path: Path) -> dict:
    """A JSON config file as a dict; ConfigError naming the file if it is missing or not a JSON object."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not a readable JSON file: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a JSON {type(raw).__name__}, not an object of config keys")
    return raw


def read_model_config(folder: Path, model_type: str, expected: str) -> tuple[dict, str]:
    """``folder/config.json`` and its path, checked to be a transformers config of ``model_type``.

    expected: the folder wanted, for the messages (e.g. "a transformers ViTModel folder such as
    facebook/dino-vits16"). Raises ConfigError naming the file and what it holds instead.
    """
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: {folder} is not {expected} (config.json + model.safetensors)")
    raw = read_json_config(path)
    found = raw.get("model_type")
    if found != model_type:
        what = (f"has model_type {found!r}" if found is not None else
                f"is a diffusers {raw['_class_name']} config" if "_class_name" in raw else "has no 'model_type'")
        raise ConfigError(f"{path} {what}, not {model_type!r}: {folder} is not {expected}")
    return raw, str(path)


def patch_tokens(pixel_values: jax.Array, projection: Conv2d, cls: jax.Array, positions: jax.Array,
                 image_size: int) -> jax.Array:
    """NHWC pixels -> (B, 1 + patches, D): the class token, then the patch embeddings in row-major
    order (torch's ``flatten(2)`` of the NCHW conv output), plus the position embeddings."""
    b, h, w, _ = pixel_values.shape
    if (h, w) != (image_size, image_size):
        raise ValueError(f"images are {h}x{w} pixels; this model takes {image_size}x{image_size} (its config's "
                         "image_size; position-embedding interpolation is not implemented): resize them first")
    x = projection(pixel_values)
    d = x.shape[-1]
    x = x.reshape(b, -1, d)
    cls = jnp.broadcast_to(cls.reshape(1, 1, d).astype(x.dtype), (b, 1, d))
    return jnp.concatenate([cls, x], axis=1) + positions.reshape(1, -1, d).astype(x.dtype)


class ViTPatchEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.projection = Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, opts, stride=cfg.patch_size,
                                 rngs=rngs)


class ViTEmbeddings(nnx.Module):
    def __init__(self, cfg: ViTConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(0.02)
        positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, cfg.hidden_size), opts.param_dtype))
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, positions, cfg.hidden_size), opts.param_dtype))
        self.patch_embeddings = ViTPatchEmbeddings(cfg, opts, rngs=rngs)
        self.image_size = cfg.image_size

    def __call__(self, pixel_values):
        return patch_tokens(pixel_values, self.patch_embeddings.projection, self.cls_token[...],
                            self.position_embeddings[...], self.image_size)


class ViTModel(nnx.Module):
    def __init__(self, cfg: ViTConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = ViTEmbeddings(cfg, opts, rngs=rngs)
        self.layers = nnx.List([CLIPEncoderLayer(cfg, opts, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts, rngs=rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values (B, H, W, C) float, H = W = config.image_size, normalised as the checkpoint's
        image processor does -> last_hidden_state (B, 1 + patches, D) float32, after the final layernorm."""
        h = self.embeddings(pixel_values)
        for layer in self.layers:
            h = layer(h, None)
        return self.layernorm(h).astype(jnp.float32)

    def cls_embedding(self, pixel_values: jax.Array) -> jax.Array:
        """(B, D): the CLS token of ``last_hidden_state``, the DINO metric's image embedding (not L2-normalised)."""
        return self(pixel_values)[:, 0]


def _vit_rename(key: str) -> str | None:
    if key.startswith("pooler."):  # transformers' optional pooler: not the DINO embedding (module docstring)
        return None
    for pattern, new in _RENAMES:
        key = pattern.sub(new, key)
    return key


def load_vit(folder: str | Path, opts: ModelOptions = ModelOptions(), *, allow_pickle: bool = False,
             variant: str | None = None) -> ViTModel:
    """A transformers ``ViTModel`` folder (config.json + model.safetensors, or shards with their
    ``model.safetensors.index.json``), e.g. facebook/dino-vits16 or dino-vitb16.

    ConfigError (naming the file) for a folder without config.json, a config of another model
    (CLIP, a diffusers UNet...) or with keys that would change the forward; CheckpointError for
    missing or mismatched weights.
    """
    folder = Path(folder)
    raw, source = read_model_config(folder, "vit", "a transformers ViTModel folder such as facebook/dino-vits16")
    cfg = ViTConfig.from_transformers(raw, source)
    return build_model(ViTModel, cfg, folder, "model", opts, _vit_rename, allow_pickle, variant)
