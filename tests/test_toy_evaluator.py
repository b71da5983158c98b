"""The toy evaluator: the shipped weights judge fresh renders correctly; metrics are hand-checkable."""

from __future__ import annotations

import numpy as np
import pytest

from dreambooth_jax.errors import CheckpointError
from dreambooth_jax.evaluation import toy
from dreambooth_jax.toy import world

HELD_OUT_SEED = 424242  # neither the training pools (seed + 100/200) nor held_out_accuracy's seed
UNSEEN = tuple(c for c in world.CONTEXTS if c not in world.SUBJECT_PHOTO_CONTEXTS)


@pytest.fixture(scope="module")
def shipped():
    return toy.load_evaluator()


def _render(scenes, size=32):
    images = np.stack([world.render(sc, 128) for sc in scenes])
    return world.downsample(images, size) if size != 128 else images


def test_shipped_evaluator_classifies_fresh_renders(shipped):
    rng = np.random.default_rng(HELD_OUT_SEED)
    scenes = [world.random_scene(rng) for _ in range(60)]
    out = toy.evaluate(shipped, _render(scenes))
    assert set(out) == {"cls", "color", "context", "subject", "embedding", "map0", "map1", "map2"}
    assert out["embedding"].shape == (60, 64)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=-1), 1.0, atol=1e-5)
    cls_acc = np.mean([world.CLASSES[i] == sc.cls for i, sc in zip(out["cls"].argmax(-1), scenes)])
    ctx_acc = np.mean([list(world.CONTEXTS)[i] == sc.context for i, sc in zip(out["context"].argmax(-1), scenes)])
    assert cls_acc >= 0.9 and ctx_acc >= 0.9, (cls_acc, ctx_acc)
    assert toy.subject_fidelity(out) < 0.1  # no subject among random scenes


def test_subject_detector_in_unseen_contexts(shipped):
    subject = world.subject_scenes(20, HELD_OUT_SEED, contexts=UNSEEN)
    rng = np.random.default_rng(HELD_OUT_SEED + 1)
    boxes = [world.random_scene(rng, cls="box", context=UNSEEN[i % len(UNSEEN)]) for i in range(20)]
    # 128 px inputs exercise evaluate's own anti-aliased resize
    out_s, out_b = toy.evaluate(shipped, _render(subject, 128)), toy.evaluate(shipped, _render(boxes, 128))
    assert toy.subject_fidelity(out_s) > 0.9
    assert toy.subject_fidelity(out_b) < 0.1
    assert toy.class_fidelity(out_s, "box") > 0.9 and toy.class_fidelity(out_b, "box") > 0.9
    assert toy.context_fidelity(out_s, [sc.context for sc in subject]) > 0.9
    # the subject's embedding is closer to the shipped subject photos than plain boxes are
    photos = world.downsample(np.stack([world.render(sc) for sc in world.subject_scenes(5, world.SUBJECT_SEED)]), 32)
    ref = toy.evaluate(shipped, photos)
    assert toy.subject_similarity(out_s, ref) > toy.subject_similarity(out_b, ref) + 0.2


def _out(emb, **probs):
    return {"embedding": np.asarray(emb, np.float64), **{k: np.asarray(v, np.float64) for k, v in probs.items()}}


def test_metrics_on_constructed_inputs():
    same = _out(np.tile([[1.0, 0, 0]], (4, 1)))
    ortho = _out(np.eye(3))
    assert toy.div([same]) == pytest.approx(0.0)
    assert toy.div([ortho]) == pytest.approx(1.0)
    assert toy.div([same, ortho]) == pytest.approx(0.5)  # mean over prompts
    # pairs (a, b), (a, -a), (b, -a) with a ⟂ b: distances 1, 2, 1 -> mean 4/3
    assert toy.div([_out([[1, 0], [0, 1], [-1, 0]])]) == pytest.approx(4 / 3)
    with pytest.raises(ValueError):
        toy.div([_out([[1.0, 0]])])

    ref = _out([[1.0, 0], [0, 1.0]])  # mean direction (1, 1)/sqrt(2)
    assert toy.subject_similarity(_out([[1.0, 0], [0, 2.0]]), ref) == pytest.approx(np.sqrt(0.5))
    assert toy.subject_similarity(ref, _out([[3.0, 3.0]])) == pytest.approx(np.sqrt(0.5))

    subj = _out(np.eye(2), subject=[[0.2, 0.8], [0.6, 0.4]])
    assert toy.subject_fidelity(subj) == pytest.approx(0.6)
    assert toy.pres(subj) == toy.subject_fidelity(subj)

    n_ctx = len(world.CONTEXTS)
    ctx = np.full((2, n_ctx), 0.0)
    ctx[0, list(world.CONTEXTS).index("beach")] = 0.9
    ctx[1, list(world.CONTEXTS).index("snow")] = 0.5
    out = _out(np.eye(2), context=ctx)
    assert toy.context_fidelity(out, ["beach", "snow"]) == pytest.approx(0.7)
    assert toy.context_fidelity(out, "beach") == pytest.approx(0.45)
    with pytest.raises(ValueError):
        toy.context_fidelity(out, ["beach"])

    cls = np.zeros((2, len(world.CLASSES)))
    cls[:, world.CLASSES.index("box")] = [1.0, 0.5]
    assert toy.class_fidelity(_out(np.eye(2), cls=cls), "box") == pytest.approx(0.75)


def test_save_load_round_trip_is_exact(shipped, tmp_path):
    toy.save_evaluator(shipped, tmp_path / "ev")
    again = toy.load_evaluator(tmp_path / "ev")
    from flax import nnx

    a = nnx.to_flat_state(nnx.state(shipped, nnx.Param))
    b = dict(nnx.to_flat_state(nnx.state(again, nnx.Param)))
    assert len(a) == len(b)
    for path, v in a:
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(b[path].get_value()))
    images = (np.random.default_rng(0).random((3, 32, 32, 3)) * 255).astype(np.uint8)
    o1, o2 = toy.evaluate(shipped, images), toy.evaluate(again, images)
    for k in o1:
        np.testing.assert_array_equal(o1[k], o2[k])


def test_missing_or_corrupt_folder_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere"):
        toy.load_evaluator(missing)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        toy.load_evaluator(corrupt)


def test_perceptual_div_on_constructed_maps():
    """DIV with the LPIPS-style distance: unit-normalised channel vectors per position; identical
    maps are 0 apart, opposite unit vectors 4 (squared distance), averaged over positions/stages."""
    one = np.zeros((1, 2, 2, 3), np.float32)
    one[..., 0] = 1.0
    a = {"map0": one, "embedding": np.ones((1, 4))}
    b = {"map0": -one * 5.0, "embedding": np.ones((1, 4))}  # scale does not matter, direction does
    assert toy.perceptual_distance(a, a)[0] == pytest.approx(0.0)
    assert toy.perceptual_distance(a, b)[0] == pytest.approx(4.0)
    half = one.copy()
    half[:, 0, :, 0] = -1.0  # one of two rows flipped: half the positions at distance 4
    group = {k: np.concatenate([a[k], {"map0": half, "embedding": np.ones((1, 4))}[k]]) for k in a}
    assert toy.perceptual_div([group]) == pytest.approx(2.0)
    assert toy.perceptual_div([{k: np.concatenate([v, v]) for k, v in a.items()}]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least two samples"):
        toy.perceptual_div([a])
