"""The T5 encoder and tokenizer for DeepFloyd IF vs transformers (PyTorch): tiny random
T5EncoderModels saved by transformers in IF's layouts (one file, shards, fp16 variant shards),
padded prompts with their attention mask, half-precision compute, the real T5-XXL's size, and the
errors for wrong folders. Tokenizers are built offline (a vocabulary list; a SentencePiece model
trained here)."""

from __future__ import annotations

import copy
import io
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

from dreambooth_jax.errors import CheckpointError, ConfigError
from dreambooth_jax.models.options import ModelOptions
from dreambooth_jax.models.t5 import (T5Config, T5EncoderModel, encode_prompts, load_t5_encoder, load_t5_tokenizer,
                                      relative_position_buckets, t5_xxl_config)
from dreambooth_jax.testing.reference import max_rel_err

# Largest error relative to the output's scale (max |ref|) between our float32 forward and
# transformers'. Both round every operation to float32 (u = 2**-24 ~ 6e-8) but sum in different
# orders, so a length-K dot product differs by ~sqrt(K) u relative to its terms (a random walk of
# roundings). The longest sums are K = 64 (wo) and 77 (probabilities @ values): ~5e-7 each; the
# ~25 stages of two layers (RMS norms, q/k/v/o, scores with the position bias, softmax, tanh-GELU,
# wi_0 * wi_1, wo, residuals) are independent and add in quadrature, ~2.5e-6 with O(1) activations
# (the weights below keep scores and activations O(1), so the softmax and the norms amplify
# nothing). 1e-5 is ~4x that (measured: 6.8e-7 gated-GELU, 5.0e-7 ReLU); real mistakes err by far more
# (measured: exact GELU for gelu_new 2.1e-4; buckets off by one 0.73; the mask ignored 0.96).
FP32_REL_TOL = 1e-5
# Half-precision compute: every matmul input, weight and output is rounded to the compute dtype
# (unit roundoff u = 2**-8 for bfloat16, 2**-11 for float16), ~20 roundings per layer along the
# longest path, ~40 in the two layers. Independent errors add in quadrature: sqrt(40) u ~ 6.3 u.
# Bound: 8 u against the float32 reference (measured: 3.0 u bf16, 3.1 u fp16; transformers' own
# bf16 / fp16 forwards: 4.1 u, 3.5 u, checked against the same bound).
HALF_ULPS = 8
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
VOCAB, LENGTH, LENGTHS = 100, 77, (77, 20, 5)  # IF's 77 tokens: distances past max_distance=16


def _tiny_config(**kw) -> transformers.T5Config:
    return transformers.T5Config(**{**dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                           relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                           feed_forward_proj="gated-gelu", vocab_size=VOCAB), **kw})


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """O(1) activations and attention far from uniform (transformers' init is nearly so); every
    weight exactly representable in float16, so the fp16 variant holds the same values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "shared" in name or "relative_attention_bias" in name:
                p.copy_(noise)
            elif p.ndim == 2:  # linear: unit-variance outputs
                p.copy_(noise / p.shape[1] ** 0.5)
            else:  # norm weights
                p.copy_(1 + 0.1 * noise)
            p.copy_(p.half().float())
    return model.eval()


def _prompts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ending in </s> (1), padded with <pad> (0) to LENGTH, and their attention mask."""
    rng = np.random.default_rng(seed)
    ids, mask = np.zeros((len(LENGTHS), LENGTH), np.int32), np.zeros((len(LENGTHS), LENGTH), np.int32)
    for i, n in enumerate(LENGTHS):
        ids[i, : n - 1], ids[i, n - 1], mask[i, :n] = rng.integers(2, VOCAB, n - 1), 1, 1
    return ids, mask


def _reference(model: torch.nn.Module, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.last_hidden_state.float().numpy()


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def _ours(folder, opts: ModelOptions = ModelOptions(), **kw) -> np.ndarray:
    ids, mask = _prompts()
    return np.asarray(_forward(load_t5_encoder(folder, opts, **kw), jnp.asarray(ids), jnp.asarray(mask)))


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """(folders by layout, torch model, float32 reference output) of a tiny T5 v1.1-style encoder."""
    model = _randomize(transformers.T5EncoderModel(_tiny_config()), 0)
    root = tmp_path_factory.mktemp("t5")
    folders = {name: root / name for name in ("single", "sharded", "fp16", "legacy")}
    model.save_pretrained(folders["single"])
    model.save_pretrained(folders["sharded"], max_shard_size="20KB")
    copy.deepcopy(model).half().save_pretrained(folders["fp16"], variant="fp16", max_shard_size="20KB")
    assert (folders["fp16"] / "model.safetensors.index.fp16.json").is_file()  # IF's names
    assert (folders["fp16"] / "model.fp16-00001-of-00003.safetensors").is_file()
    # a whole T5 as older transformers saved it: the tied embedding under both names, a decoder
    legacy = folders["legacy"]
    legacy.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()
    sd["decoder.final_layer_norm.weight"] = torch.ones(32)
    sd["lm_head.weight"] = torch.zeros(VOCAB, 32)
    save_file(sd, legacy / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folders["single"] / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps({**config, "architectures": ["T5ForConditionalGeneration"]}))
    return folders, model, _reference(model, *_prompts())


@pytest.mark.parametrize("layout,variant", [("single", None), ("sharded", None), ("fp16", "fp16"), ("legacy", None)])
def test_encoder_matches_transformers(gated, layout, variant):
    folders, _, ref = gated
    err = max_rel_err(_ours(folders[layout], variant=variant), ref)
    assert err <= FP32_REL_TOL, err


def test_relu_feed_forward_matches_transformers(tmp_path):
    """The original T5's ungated ReLU feed-forward (wi, wo)."""
    model = _randomize(transformers.T5EncoderModel(_tiny_config(feed_forward_proj="relu")), 1)
    model.save_pretrained(tmp_path)
    err = max_rel_err(_ours(tmp_path), _reference(model, *_prompts()))
    assert err <= FP32_REL_TOL, err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute(gated, dtype):
    folders, _, ref = gated
    bound = HALF_ULPS * UNIT_ROUNDOFF[dtype]
    model = load_t5_encoder(folders["single"], ModelOptions(dtype=getattr(jnp, dtype)))
    ids, mask = _prompts()
    err = max_rel_err(np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask))), ref)
    assert err <= bound, (err, bound)
    # the same bound holds for transformers' own half-precision forward (fp16: wo kept in float32)
    theirs = transformers.T5EncoderModel.from_pretrained(folders["single"], dtype=getattr(torch, dtype)).eval()
    their_err = max_rel_err(_reference(theirs, ids, mask), ref)
    assert their_err <= bound, (their_err, bound)
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.dtype == (jnp.float32 if dtype == "float16" else jnp.bfloat16)
    assert theirs.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == (
        torch.float32 if dtype == "float16" else torch.bfloat16)


@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 16), (16, 32), (4, 8), (33, 100), (128, 1024)])
def test_relative_position_buckets_match_transformers(buckets, distance):
    """Bit for bit at every distance up to 1023: the logarithmic buckets' float32 boundaries
    included (IF's 32 buckets / 128: distances 16, 32, 64 fall exactly on bucket edges)."""
    n = 1024
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    ref = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, True, buckets, distance)
    np.testing.assert_array_equal(relative_position_buckets(n, buckets, distance), ref.numpy())


def test_t5_xxl_size():
    """IF's text encoder, built abstractly: 4.76 B parameters, as transformers counts them."""
    cfg = T5Config.from_transformers(t5_xxl_config())
    abstract = nnx.eval_shape(lambda: T5EncoderModel(cfg, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    per_layer = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096  # q k v o, wi_0 wi_1 wo, two norms
    assert ours == 32128 * 4096 + 24 * per_layer + 32 * 64 + 4096 == 4_762_310_656
    with torch.device("meta"):
        theirs = transformers.T5EncoderModel(transformers.T5Config(**t5_xxl_config()))
    assert sum(p.numel() for p in theirs.parameters()) == ours  # tied embed_tokens counted once


def _write_config(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    raw = {**t5_xxl_config(), **changes}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    return folder


def test_wrong_folders_and_configs(tmp_path):
    clip = tmp_path / "clip_text_encoder"
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16)).save_pretrained(clip)
    with pytest.raises(ConfigError, match=r"config\.json has model_type 'clip_text_model', not 't5'"):
        load_t5_encoder(clip)
    with pytest.raises(ConfigError, match="does not exist"):
        load_t5_encoder(tmp_path / "nowhere")
    for changes, key in ((dict(foo=1), "'foo'"), (dict(is_decoder=True), "'is_decoder'"),
                         (dict(feed_forward_proj="gated-silu", dense_act_fn=None), "'feed_forward_proj'"),
                         (dict(dense_act_fn="gelu"), "'dense_act_fn'"),
                         (dict(feed_forward_proj="gelu-gated"), "'feed_forward_proj'"),
                         (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets"),
                         (dict(architectures=["T5ForSequenceClassification"]), "'architectures'")):
        folder = _write_config(tmp_path / key.strip("'"), **changes)
        with pytest.raises(ConfigError, match=key) as e:
            load_t5_encoder(folder)
        assert str(folder / "config.json") in str(e.value)


def test_missing_or_mismatched_weights(gated, tmp_path):
    import shutil

    folders, model, _ = gated
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folders["single"] / "config.json", bare)
    with pytest.raises(CheckpointError, match="expected model.safetensors"):
        load_t5_encoder(bare)
    with pytest.raises(CheckpointError, match=r"expected model\.fp16\.safetensors"):
        load_t5_encoder(folders["single"], variant="fp16")
    for layout in ("sharded", "fp16"):
        broken = shutil.copytree(folders[layout], tmp_path / layout)
        shard = sorted(broken.glob("model*-00002-of-*.safetensors"))[0]
        shard.unlink()
        with pytest.raises(CheckpointError, match=f"missing .*{shard.name}"):
            load_t5_encoder(broken, variant="fp16" if layout == "fp16" else None)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(folders["single"] / "config.json", partial)
    dropped = ("encoder.block.1.layer.1.DenseReluDense.wo.weight", "encoder.embed_tokens.weight")  # and a tied alias
    sd = {k: v for k, v in model.state_dict().items() if k not in dropped}
    save_file(sd, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint: encoder\.block\.1\.layer\.1\.DenseRelu"):
        load_t5_encoder(partial)


# ----------------------------------------------------------------------------- tokenizer
CORPUS = ["a photo of a sks dog", "a photo of a dog in the snow", "a cat on a red chair",
          "the quick brown fox jumps over the lazy dog", "an oil painting of a mountain lake at sunrise"] * 20
PROMPTS = ["A Photo of a SKS dog  ", "the lazy fox on a chair", ""]


def _check_if_encoding(tokenizer):
    """encode_prompts gives what IFPipeline.encode_prompt's tokenizer call gives (clean_caption=False)."""
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    ref = tokenizer([p.lower().strip() for p in PROMPTS], padding="max_length", max_length=77, truncation=True,
                    add_special_tokens=True, return_tensors="np")
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape == (3, 77)
    np.testing.assert_array_equal(ids, ref.input_ids)
    np.testing.assert_array_equal(mask, ref.attention_mask)
    n = mask.sum(1)
    assert n[2] == 1 and (ids[np.arange(3), n - 1] == 1).all()  # "" is </s> alone; every prompt ends in </s>
    assert (ids[mask == 0] == 0).all()  # padded with <pad>
    np.testing.assert_array_equal(encode_prompts(tokenizer, "a photo of a sks dog")[0], ids[:1])  # lowercased
    with pytest.warns(UserWarning, match="more than the text encoder's limit of 77"):
        long_ids, long_mask = encode_prompts(tokenizer, " ".join(["a photo of a dog"] * 30))
    assert long_mask.all() and long_ids[0, -1] == 1  # cut, </s> kept
    return ids


def test_tokenizer_json_folder(tmp_path):
    """A tokenizer.json folder (as transformers 5 saves it), from a vocabulary list: no sentencepiece."""
    pieces = ["▁a", "▁photo", "▁of", "▁sks", "▁dog", "▁the", "▁lazy", "▁fox", "▁on", "▁chair", "▁"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, -1.0 - i) for i, p in enumerate(pieces)]
    vocab += [(c, -20.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    transformers.T5Tokenizer(vocab=vocab).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and not (tmp_path / "spiece.model").exists()
    ids = _check_if_encoding(load_t5_tokenizer(tmp_path))
    np.testing.assert_array_equal(ids[0, :7], [3, 4, 5, 3, 6, 7, 1])  # ▁a ▁photo ▁of ▁a ▁sks ▁dog </s>


def test_spiece_model_folder(tmp_path):
    """IF's tokenizer/ holds spiece.model: a SentencePiece unigram model trained here (T5's ids:
    <pad> 0, </s> 1, <unk> 2, no <s>) tokenizes as sentencepiece itself does, plus </s>."""
    spm = pytest.importorskip("sentencepiece", reason="reading spiece.model needs sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=60,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "spiece.model").write_bytes(buf.getvalue())
    tokenizer = load_t5_tokenizer(folder)
    ids = _check_if_encoding(tokenizer)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    for row, prompt in zip(ids, PROMPTS):
        expected = sp.encode(prompt.lower().strip()) + [1]
        np.testing.assert_array_equal(row[: len(expected)], expected)
    tokenizer.save_pretrained(tmp_path / "saved")  # -> tokenizer.json: same ids
    (tmp_path / "saved" / "spiece.model").unlink(missing_ok=True)
    np.testing.assert_array_equal(encode_prompts(load_t5_tokenizer(tmp_path / "saved"), PROMPTS)[0], ids)


def test_tokenizer_folder_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="neither spiece.model nor tokenizer.json"):
        load_t5_tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"\0")
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
    with pytest.raises(CheckpointError, match=r"spiece\.model: reading a SentencePiece model needs the sentencepiece"):
        load_t5_tokenizer(tmp_path)
