"""A prompt longer than the text encoder takes is cut as SD pipelines cut it, with a warning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from dreambooth_jax.models import default_tokenizer, tokenize


def test_long_prompt_warns_with_what_is_dropped():
    tok = default_tokenizer()
    words = [f"word{i}" for i in range(40)]  # "wordN" is two tokens: 80 + 2 in all
    long_prompt = "a photo of sks dog " + " ".join(words) + " in the snow at night"
    with pytest.warns(UserWarning) as rec:
        ids = tokenize(tok, ["a photo of sks dog", long_prompt])
    assert len(rec) == 1
    msg = str(rec[0].message)
    n = len(tok(long_prompt).input_ids)
    assert n > 77
    assert f"is {n} tokens long" in msg and "limit of 77" in msg
    assert "'a photo of sks dog word0 word1" in msg and "...'" in msg  # the prompt, shortened
    assert msg.rstrip("'").endswith("in the snow at night")  # the words dropped
    dropped = msg.split("dropped")[1]
    assert "word0 " not in dropped and "word3" in dropped and " ... " in dropped
    # the ids are those of the tokenizer's own truncation
    ref = tok([long_prompt], padding="max_length", max_length=77, truncation=True).input_ids[0]
    np.testing.assert_array_equal(ids[1], ref)
    assert ids.shape == (2, 77)


def test_short_prompts_and_custom_limit():
    tok = default_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tokenize(tok, ["a photo of sks dog", ""], 16)
    assert ids.shape == (2, 16)
    with pytest.warns(UserWarning, match=r"limit of 8; its end is dropped: 'on the beach'"):
        tokenize(tok, "a photo of a red cup on the beach", 8)
