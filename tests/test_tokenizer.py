"""The shipped CLIP BPE tokenizer reproduces OpenAI/SD token ids, offline."""

from __future__ import annotations

import pytest

from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.models import default_tokenizer, load_pretrained, load_tokenizer, tokenize


def test_shipped_tokenizer_ids():
    tok = default_tokenizer()
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert tok.model_max_length == 77 and len(tok) == 49408
    with pytest.warns(UserWarning, match="limit of 77"):
        ids = tokenize(tok, ["a photo of sks dog", "x " * 200])
    assert ids.shape == (2, 77) and ids.dtype.name == "int32"
    assert ids[0, 7:].tolist() == [49407] * 70  # padded with <|endoftext|> like SD 1.x
    assert ids[1, -1] == 49407  # truncated long prompts still end with EOS


def test_tokenizer_from_pipeline_folder(pipeline_dirs):
    # transformers 5 saves tokenizer.json only; real SD folders have vocab.json + merges.txt.
    pipe = load_pretrained(pipeline_dirs("sd1"), components=("tokenizer",))
    assert pipe.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]


def test_empty_tokenizer_folder(tmp_path):
    with pytest.raises(CheckpointError, match="neither vocab.json"):
        load_tokenizer(tmp_path)
