"""T5 encoder (transformers' ``T5EncoderModel``) in Flax NNX, and the T5 tokenizer, for DeepFloyd IF.

IF encodes prompts with the encoder of google/t5-v1_1-xxl (:func:`t5_xxl_config`): RMS layer
norms without bias, a gated-GELU feed-forward (``gelu_new``, the tanh approximation), no biases
anywhere, a relative position bias (bidirectional buckets) computed by the first layer's attention
and reused by every later layer, and no 1/sqrt(d) scaling of the attention scores (T5 folds it
into the initialisation). Parameter paths equal transformers' state-dict keys
(``encoder.block.0.layer.0.SelfAttention.q.weight``...); the encoder's ``embed_tokens`` is tied to
``shared`` and loads into it.

Dtypes: the residual stream, the norms, the scores, the softmax and the feed-forward activation
run in float32; the matmuls in ``opts.dtype``. As in transformers, a norm's output is rounded to
the half-precision compute dtype before its weight scales it, and with float16 compute ``wo`` (the
feed-forward's output projection) runs in float32 (transformers' ``_keep_in_fp32_modules``: T5
v1.1's feed-forward overflows float16). The output is float32.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models.clip import PRETRAINED_KEYS as _PRETRAINED_KEYS
from dreambooth_jax.models.layers import Linear
from dreambooth_jax.models.loading import build_model, warn_truncated
from dreambooth_jax.models.options import ModelOptions, check_choice, parse_config
from dreambooth_jax.models.vit import read_model_config

T5_DEFAULTS = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    feed_forward_proj="relu",
    dense_act_fn=None, is_gated_act=None,  # None: derived from feed_forward_proj, as T5Config does
)
_FIXED = dict(model_type=("t5",), is_decoder=(False,),  # a decoder stack is causal, with one-sided buckets
              architectures=(["T5EncoderModel"], ["T5ForConditionalGeneration"], ["T5Model"], None))
# Keys that do not change the encoder's forward: dropout (inference forward, as transformers'
# eval mode), the decoder's and generation's settings, token ids the encoder never reads.
_IGNORED = (_PRETRAINED_KEYS - {"is_decoder"}) | {
    "dropout_rate", "classifier_dropout", "num_decoder_layers", "scale_decoder_outputs", "output_past",
    "n_positions", "pad_token_id", "eos_token_id", "bos_token_id",
}
ACTIVATIONS = ("gelu_new", "relu")
IF_MAX_LENGTH = 77  # IF's text encoder was trained on 77 tokens (diffusers' IFPipeline.encode_prompt)


def t5_xxl_config() -> dict:
    """The config.json of DeepFloyd IF's ``text_encoder/`` (google/t5-v1_1-xxl's encoder, 4.76 B
    parameters), as transformers writes it."""
    return {
        "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_kv": 64, "d_ff": 10240,
        "num_layers": 24, "num_decoder_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
        "is_gated_act": True, "layer_norm_epsilon": 1e-6, "vocab_size": 32128, "dropout_rate": 0.1,
        "initializer_factor": 1.0, "is_encoder_decoder": True, "decoder_start_token_id": 0, "pad_token_id": 0,
        "eos_token_id": 1, "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "float16",
    }


@dataclasses.dataclass(frozen=True)
class T5Config:
    raw: dict
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int
    relative_attention_max_distance: int
    layer_norm_epsilon: float
    dense_act_fn: str  # "gelu_new" (tanh approximation) or "relu"
    is_gated_act: bool  # act(wi_0 x) * wi_1 x, else act(wi x)

    @classmethod
    def from_transformers(cls, raw: Mapping[str, Any], source: str = "text_encoder/config.json") -> "T5Config":
        c = parse_config(raw, T5_DEFAULTS, source, fixed=_FIXED, ignored=_IGNORED)
        proj = c["feed_forward_proj"]
        parts = proj.split("-") if isinstance(proj, str) else []
        if not 1 <= len(parts) <= 2 or len(parts) == 2 and parts[0] != "gated":
            raise ConfigError(f"{source}: unsupported value {proj!r} for 'feed_forward_proj' "
                              "(expected 'ACT' or 'gated-ACT', e.g. 'gated-gelu' or 'relu')")
        # transformers 5's T5Config derives both from feed_forward_proj, then lets the file's own
        # dense_act_fn / is_gated_act keys override them; so do we.
        act = c["dense_act_fn"] or ("gelu_new" if proj == "gated-gelu" else parts[-1])
        gated = parts[0] == "gated" if c["is_gated_act"] is None else c["is_gated_act"]
        check_choice(act, ACTIVATIONS, "dense_act_fn" if c["dense_act_fn"] else "feed_forward_proj", source)
        check_choice(gated, (True, False), "is_gated_act", source)
        buckets, distance = c["relative_attention_num_buckets"], c["relative_attention_max_distance"]
        if not isinstance(buckets, int) or buckets < 4 or not isinstance(distance, int) or distance <= buckets // 4:
            raise ConfigError(f"{source}: relative_attention_num_buckets={buckets!r} / relative_attention_max_distance="
                              f"{distance!r}: need at least 4 buckets and a max distance above a quarter of them")
        return cls(raw=dict(raw), dense_act_fn=act, is_gated_act=gated, **{k: c[k] for k in (
            "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
            "relative_attention_max_distance", "layer_norm_epsilon")})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32: the bidirectional bucket of ``key - query`` (transformers'
    ``T5Attention._relative_position_bucket``). Half the buckets per direction; within one, the
    first half are exact distances, the rest logarithmic up to max_distance, the last one beyond.

    Host numpy, since shapes are static. The logarithmic bucket is ``trunc(log(n / e) / log(M / e)
    * (h - e))`` evaluated in float32 as torch does: at distances where the exact value is an
    integer (n = 64 for IF's 32 buckets, M = 128) the float32 rounding decides the bucket, so the
    log is the correctly rounded float32 one (float64 log rounded once), as torch's CPU kernel
    gives; tests compare every distance up to 1024 with transformers.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    n = np.abs(rel)
    ratio = np.maximum(n, exact).astype(np.float32) / np.float32(exact)
    log = np.log(ratio.astype(np.float64)).astype(np.float32)
    large = exact + (log / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return ((rel > 0) * half + np.where(n < exact, n, large)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """T5's RMS norm (no mean subtraction, no bias), in float32. With half-precision compute the
    normalised input is rounded to it before the weight multiplies, as transformers does when its
    weights are float16/bfloat16."""

    def __init__(self, dim: int, eps: float, opts: ModelOptions, *, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), opts.param_dtype))
        self.eps = eps
        self.dtype = opts.dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * h.astype(self.dtype)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5Config, opts: ModelOptions, *, rngs: nnx.Rngs, has_relative_attention_bias: bool):
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.buckets, self.max_distance = cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        self.q, self.k, self.v = (Linear(cfg.d_model, inner, opts, use_bias=False, rngs=rngs) for _ in range(3))
        self.o = Linear(inner, cfg.d_model, opts, use_bias=False, rngs=rngs)
        self.relative_attention_bias = (
            nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads, dtype=jnp.float32,
                      param_dtype=opts.param_dtype, rngs=rngs) if has_relative_attention_bias else None)

    def position_bias(self, length: int) -> jax.Array:
        """(1, H, L, L) float32, added to every layer's scores."""
        buckets = relative_position_buckets(length, self.buckets, self.max_distance)
        return self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)[None]

    def __call__(self, x, bias):
        """x (B, L, D) in the compute dtype; bias (B or 1, H, L, L) float32: position bias + mask."""
        b, l, _ = x.shape
        split = lambda t: t.reshape(b, l, self.heads, self.d_kv).transpose(0, 2, 1, 3)  # (B, H, L, d)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        # Unscaled scores, accumulated in float32: T5-XXL's are large enough to overflow float16.
        scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, l, self.heads * self.d_kv)
        return self.o(out)


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, cfg: T5Config, opts: ModelOptions, *, rngs: nnx.Rngs, has_relative_attention_bias: bool):
        self.SelfAttention = T5Attention(cfg, opts, rngs=rngs, has_relative_attention_bias=has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, opts, rngs=rngs)

    def __call__(self, h, bias):
        return h + self.SelfAttention(self.layer_norm(h), bias).astype(jnp.float32)


class T5DenseActDense(nnx.Module):
    """``DenseReluDense``: act(wi_0 x) * (wi_1 x) -> wo when gated (T5 v1.1), act(wi x) -> wo otherwise."""

    def __init__(self, cfg: T5Config, opts: ModelOptions, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.gated = cfg.is_gated_act
        self.act = cfg.dense_act_fn
        if self.gated:
            self.wi_0 = Linear(d, f, opts, use_bias=False, rngs=rngs)
            self.wi_1 = Linear(d, f, opts, use_bias=False, rngs=rngs)
        else:
            self.wi = Linear(d, f, opts, use_bias=False, rngs=rngs)
        # transformers keeps wo in float32 when the model is loaded in float16 (not for bfloat16)
        wo_opts = dataclasses.replace(opts, dtype=jnp.float32) if jnp.dtype(opts.dtype) == jnp.float16 else opts
        self.wo = Linear(f, d, wo_opts, use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = (self.wi_0 if self.gated else self.wi)(x)
        a = h.astype(jnp.float32)
        a = jax.nn.gelu(a, approximate=True) if self.act == "gelu_new" else jax.nn.relu(a)
        h = a.astype(x.dtype)
        if self.gated:
            h = h * self.wi_1(x)
        return self.wo(h)


class T5LayerFF(nnx.Module):
    def __init__(self, cfg: T5Config, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseActDense(cfg, opts, rngs=rngs)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, opts, rngs=rngs)

    def __call__(self, h):
        return h + self.DenseReluDense(self.layer_norm(h)).astype(jnp.float32)


class T5Block(nnx.Module):
    def __init__(self, cfg: T5Config, opts: ModelOptions, *, rngs: nnx.Rngs, has_relative_attention_bias: bool):
        self.layer = nnx.List([
            T5LayerSelfAttention(cfg, opts, rngs=rngs, has_relative_attention_bias=has_relative_attention_bias),
            T5LayerFF(cfg, opts, rngs=rngs)])

    def __call__(self, h, bias):
        return self.layer[1](self.layer[0](h, bias))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.block = nnx.List([T5Block(cfg, opts, rngs=rngs, has_relative_attention_bias=i == 0)
                               for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, opts, rngs=rngs)


class T5EncoderModel(nnx.Module):
    def __init__(self, cfg: T5Config, opts: ModelOptions = ModelOptions(), *, rngs: nnx.Rngs):
        self.config = cfg
        self.opts = opts
        self.shared = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=opts.param_dtype,
                                rngs=rngs)
        self.encoder = T5Stack(cfg, opts, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (B, L) int -> last_hidden_state (B, L, d_model) float32.

        attention_mask: optional (B, L), 1 for real tokens, 0 for padding (keys only: padded
        positions still get outputs, as in transformers); IF passes the tokenizer's mask.
        """
        l = input_ids.shape[1]
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(l)
        if attention_mask is not None:  # additive, like transformers' eager path
            keep = attention_mask.astype(bool)[:, None, None, :]
            bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)
        h = self.shared(input_ids)
        for block in self.encoder.block:
            h = block(h, bias)
        return self.encoder.final_layer_norm(h).astype(jnp.float32)


# ----------------------------------------------------------------------------- loading
def _t5_rename(key: str) -> str | None:
    if key == "encoder.embed_tokens.weight":  # tied to shared.weight (older files hold both)
        return "shared.weight"
    if key.startswith(("decoder.", "lm_head.")):  # a whole T5 (e.g. google/t5-v1_1-xxl): encoder only
        return None
    return key


def load_t5_encoder(folder: str | Path, opts: ModelOptions = ModelOptions(), *, variant: str | None = None,
                    allow_pickle: bool = False) -> T5EncoderModel:
    """An IF ``text_encoder/`` folder: config.json + model.safetensors, or shards with their index;
    ``variant="fp16"`` reads ``model.fp16.safetensors`` or the shards ``model.fp16-0000N-of-0000M``
    named by ``model.safetensors.index.fp16.json`` (transformers' name for a variant's index, as
    IF ships it).

    ConfigError (naming the file) for a folder that is not a T5 encoder (a CLIP text encoder, a
    UNet...) or whose config changes the forward; CheckpointError for missing or mismatched weights.
    """
    folder = Path(folder)
    raw, source = read_model_config(folder, "t5", "a transformers T5EncoderModel folder such as "
                                                  "DeepFloyd IF's text_encoder/")
    cfg = T5Config.from_transformers(raw, source)
    return build_model(T5EncoderModel, cfg, folder, "model", opts, _t5_rename, allow_pickle, variant)


# ----------------------------------------------------------------------------- tokenizer
def load_t5_tokenizer(folder: str | Path):
    """transformers' T5 tokenizer from an IF ``tokenizer/`` folder: ``spiece.model`` (as IF ships
    it; reading it needs the ``sentencepiece`` package) or ``tokenizer.json``."""
    from transformers import T5TokenizerFast

    folder = Path(folder)
    has_json, has_spm = (folder / "tokenizer.json").is_file(), (folder / "spiece.model").is_file()
    if not has_json and not has_spm:
        raise CheckpointError(f"tokenizer folder {folder} has neither spiece.model nor tokenizer.json "
                              "(is it a T5 tokenizer folder, such as DeepFloyd IF's tokenizer/?)")
    if not has_json:
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise CheckpointError(f"{folder / 'spiece.model'}: reading a SentencePiece model needs the "
                                  "sentencepiece package (pip install 'sentencepiece>=0.2')") from None
    return T5TokenizerFast.from_pretrained(str(folder))


def encode_prompts(tokenizer, prompts: Sequence[str] | str, max_length: int = IF_MAX_LENGTH
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (input_ids, attention_mask), both (B, max_length) int32, as diffusers'
    ``IFPipeline.encode_prompt`` tokenizes them with ``clean_caption=False``: each prompt lowercased
    and stripped, then padded to max_length, truncated (the end token kept) and ended by ``</s>``.

    Not implemented: ``clean_caption=True`` (IFPipeline.__call__'s default when bs4 and ftfy are
    installed), which also strips URLs, HTML, CJK characters, some punctuation... Prompts cut at
    max_length are warned about (UserWarning naming the dropped words), as ``loading.tokenize`` does.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = [p.lower().strip() for p in prompts]
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True)
    warn_truncated(tokenizer, prompts, max_length)
    return np.asarray(enc.input_ids, np.int32), np.asarray(enc.attention_mask, np.int32)
