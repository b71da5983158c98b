"""The toy world: deterministic renders and captions, the subject kept out of the prior's data,
the shipped subject photos, and the shipped prior loading like any diffusers checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dreambooth_jax.toy import world

ASSETS = Path(__file__).resolve().parents[1] / "dreambooth_jax" / "assets" / "toy"


def test_render_is_deterministic_and_varied():
    a, scenes, caps = world.sample_dataset(24, seed=3, size=64)
    b, _, caps_b = world.sample_dataset(24, seed=3, size=64)
    assert a.shape == (24, 64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert caps == caps_b
    c, _, _ = world.sample_dataset(24, seed=4, size=64)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 10  # another seed, other photos
    # A class noun is a distribution: the same class in several colors and contexts.
    assert len({(s.color, s.context) for s in scenes}) > 10


def test_captions():
    sc = world.Scene(cls="cup", color="red", context="beach")
    assert world.caption(sc) == "a photo of a red cup on the beach"
    assert world.caption(sc, with_color=False, with_context=False) == "a photo of a cup"
    subj = world.Scene(cls="box", color=world.SUBJECT, context="snow")
    assert world.caption(subj) == "a photo of a sks box in the snow"
    rng = np.random.default_rng(0)
    caps = {world.random_caption(sc, rng) for _ in range(200)}
    assert caps == {"a photo of a red cup on the beach", "a photo of a cup on the beach",
                    "a photo of a red cup", "a photo of a cup"}


def test_the_prior_never_sees_the_subject():
    _, scenes, caps = world.sample_dataset(300, seed=0, size=32)
    assert all(s.color != world.SUBJECT for s in scenes)
    assert not any("sks" in c for c in caps)


def test_subject_photos_are_shipped_and_reproducible(tmp_path):
    shipped = sorted((ASSETS / "subject").glob("*.png"))
    assert len(shipped) == 5
    fresh = world.write_subject_photos(tmp_path)
    from PIL import Image

    for a, b in zip(shipped, fresh):
        x, y = np.asarray(Image.open(a)).astype(int), np.asarray(Image.open(b)).astype(int)
        assert x.shape == (128, 128, 3) and np.abs(x - y).mean() < 1.0  # same renderer (PIL versions may round)
    contexts = {s.context for s in world.subject_scenes(5, world.SUBJECT_SEED)}
    assert contexts == set(world.SUBJECT_PHOTO_CONTEXTS)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown context 'moon'"):
        world.render(world.Scene(cls="cup", color="red", context="moon"), 32)
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        world.render(world.Scene(cls="dog", color="red", context="snow"), 32)
