"""CLIP text encoder (transformers' ``CLIPTextModel``) in Flax NNX.

SD 1.x uses OpenAI's ViT-L/14 text tower (quick_gelu, 12 layers); SD 2.x uses OpenCLIP ViT-H's
(gelu, saved with 23 of its 24 layers, which is how SD2's "penultimate layer" is baked in).
Parameter paths equal transformers 5's state-dict keys; real SD folders prefix them with
``text_model.``, which is accepted on load and written on export.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dreambooth_jax.models.attention import attention
from dreambooth_jax.models.layers import LayerNorm, Linear
from dreambooth_jax.models.options import ModelOptions, check_choice, parse_config

TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, eos_token_id=49407, bos_token_id=49406, pad_token_id=1,
)
_FIXED = dict(attention_dropout=(0.0,), dropout=(0.0,), model_type=("clip_text_model",),
              architectures=(["CLIPTextModel"], None))  # null inside a CLIPModel config
# Generic transformers PretrainedConfig keys and init-only keys that do not change the forward.
PRETRAINED_KEYS = {
    "projection_dim", "initializer_range", "initializer_factor", "torch_dtype", "dtype",
    "transformers_version", "output_hidden_states", "output_attentions", "return_dict",
    "use_return_dict", "torchscript", "use_bfloat16", "pruned_heads", "tie_word_embeddings",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
    "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type",
    "gradient_checkpointing", "tf_legacy_loss", "use_cache", "_attn_implementation_autoset",
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    raw: dict
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "text_encoder/config.json") -> "CLIPTextConfig":
        c = parse_config(raw, TEXT_DEFAULTS, source, fixed=_FIXED, ignored=PRETRAINED_KEYS)
        check_choice(c["hidden_act"], ("quick_gelu", "gelu"), "hidden_act", source)
        return cls(raw=dict(raw), **{k: c[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id")})


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

    def __call__(self, ids):
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))[None]


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (Linear(d, d, opts, rngs=rngs) for _ in range(4))

    def __call__(self, x, mask):
        b, l, d = x.shape
        split = lambda t: t.reshape(b, l, self.heads, d // self.heads)
        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                        impl="matmul", mask=mask)
        return self.out_proj(out.reshape(b, l, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, opts, rngs=rngs)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, opts, rngs=rngs)
        self.quick = cfg.hidden_act == "quick_gelu"

    def __call__(self, x):
        h = self.fc1(x).astype(jnp.float32)
        h = h * jax.nn.sigmoid(1.702 * h) if self.quick else jax.nn.gelu(h, approximate=False)
        return self.fc2(h.astype(x.dtype))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts, rngs=rngs)
        self.self_attn = CLIPAttention(cfg, opts, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts, rngs=rngs)
        self.mlp = CLIPMLP(cfg, opts, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, opts, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class CLIPTextModel(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.opts = opts
        self.embeddings = CLIPEmbeddings(cfg, opts, rngs=rngs)
        self.encoder = CLIPEncoder(cfg, opts, rngs=rngs)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, opts, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 skip_layers: int = 0) -> tuple[jax.Array, jax.Array]:
        """input_ids (B, L) int -> (last_hidden_state (B, L, D), pooled (B, D)), float32.

        attention_mask: optional (B, L), 1 for real tokens. skip_layers: drop the last N encoder
        layers before the final layer norm ("clip skip"; 0 is the model as saved).
        """
        b, l = input_ids.shape
        mask = jnp.tril(jnp.ones((l, l), bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        h = self.embeddings(input_ids).astype(self.opts.dtype)
        for layer in self.encoder.layers[: len(self.encoder.layers) - skip_layers]:
            h = layer(h, mask)
        h = self.final_layer_norm(h).astype(jnp.float32)
        if self.config.eos_token_id == 2:  # legacy configs: the EOS token has the largest id
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
        return h, h[jnp.arange(b), eos]
