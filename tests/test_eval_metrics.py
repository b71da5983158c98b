"""The paper's metric formulas by hand, and its prompt lists (checked against the dataset's file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.evaluation.metrics import (LIVE_PROMPTS, OBJECT_PROMPTS, clip_t_text, diversity, fill,
                                               matched_cosine, pairs, pairwise_cosine, paper_prompts,
                                               read_prompt_file)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambooth" / "prompts_and_classes.txt"


def test_identical_images_score_one_and_zero_diversity():
    e = np.tile(np.random.default_rng(0).normal(size=(1, 16)), (4, 1))  # one image, four times
    assert pairwise_cosine(e, e) == pytest.approx(1.0, abs=1e-12)
    assert matched_cosine(e, 3 * e) == pytest.approx(1.0, abs=1e-12)  # scale-free
    i, j = pairs(4)
    assert len(i) == 6 and np.all(i < j)
    assert diversity([np.zeros(len(i))]) == 0.0


def test_small_cases_by_hand():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    b = np.array([[1.0, 1.0]])
    # cos((1,0),(1,1)) = cos((0,1),(1,1)) = 1/sqrt(2)
    assert pairwise_cosine(a, b) == pytest.approx(2 ** -0.5, abs=1e-12)
    # all 4 pairs of a with itself: 1, 0, 0, 1 -> 0.5
    assert pairwise_cosine(a, a) == pytest.approx(0.5, abs=1e-12)
    assert matched_cosine(a, np.array([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5, abs=1e-12)
    assert matched_cosine(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert diversity([np.array([0.2, 0.4]), np.array([0.9])]) == pytest.approx((0.3 + 0.9) / 2)
    with pytest.raises(ValueError, match="two images"):
        pairs(1)
    with pytest.raises(ValueError, match="equal shapes"):
        matched_cosine(a, b)


def test_prompts():
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    assert paper_prompts("Dog") == LIVE_PROMPTS and paper_prompts("teapot") == OBJECT_PROMPTS
    assert fill(OBJECT_PROMPTS[1], "sks", "teapot") == "a sks teapot in the snow"
    assert clip_t_text(OBJECT_PROMPTS[20], "teapot") == "a red teapot"


@pytest.mark.skipif(not SHARED.is_file(), reason="the dataset's prompts_and_classes.txt is not beside the repo")
def test_prompt_lists_equal_the_dataset_file(tmp_path):
    text = SHARED.read_text()
    obj = text[text.index("Object Prompts"):text.index("Live Subject Prompts")].split("\n", 1)[1]
    live = text[text.index("Live Subject Prompts"):].split("\n", 1)[1]
    for section, ref in ((obj, OBJECT_PROMPTS), (live, LIVE_PROMPTS)):
        (tmp_path / "p.txt").write_text(section)
        assert read_prompt_file(tmp_path / "p.txt") == ref


def test_prompt_file_forms_and_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# mine\n\na [V] [class] on the moon\n{identifier} {class} in a box\na {0} {1}\n")
    assert read_prompt_file(f) == ["a {0} {1} on the moon", "{0} {1} in a box", "a {0} {1}"]
    f.write_text("a dog on the moon\n")
    with pytest.raises(ConfigError, match="line 1.*no identifier"):
        read_prompt_file(f)
    f.write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompt_file(f)
    with pytest.raises(ConfigError, match="no such file"):
        read_prompt_file(tmp_path / "missing.txt")
