"""TFDS image sources (dreambooth_jax.data.tfds_source): build an array_record dataset from a folder
and read it back, without TensorFlow."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_jax.data.images import DataError, list_images, load_image, load_image_uint8, to_uint8
from dreambooth_jax.data.tfds_source import build_image_dataset, open_image_source, parse_spec


def shared_dreambooth_dir() -> Path | None:
    """The DreamBooth subject photos in ``../shared/data/dreambooth`` next to the repo, if present."""
    d = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambooth"
    return d if d.is_dir() else None


def photo(seed: int, shape: tuple[int, int]) -> Image.Image:
    """A smooth, photo-like RGB image (random gradients plus noise)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3) + np.stack([x * rng.uniform(-1, 1), y * rng.uniform(-1, 1), x - y], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """4 images, mixed png/jpg and sizes; two are real subject photos when shared/ is present."""
    folder = tmp_path / "images"
    folder.mkdir()
    shared = shared_dreambooth_dir()
    if shared is not None and (shared / "cat").is_dir():
        for i, src in enumerate(list_images(shared / "cat")[:2]):
            (folder / f"c{i}.jpg").write_bytes(src.read_bytes())
    else:
        photo(10, (120, 90)).save(folder / "c0.jpg", quality=90)
        photo(11, (90, 160)).save(folder / "c1.jpg", quality=90)
    photo(1, (80, 100)).save(folder / "a.png")
    rgba = photo(2, (70, 70)).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "b.png")
    (folder / "b.txt").write_text("a photo of sks cat\n")  # sidecar caption for b.png
    return folder


def test_round_trip_pixel_exact_without_tensorflow(image_folder, tmp_path):
    data_dir = tmp_path / "tfds"
    info = build_image_dataset(image_folder, data_dir, "cat_prior", 32)
    assert info.splits["train"].num_examples == 4
    assert (data_dir / "cat_prior" / "1.0.0" / "dataset_info.json").is_file()
    assert not (data_dir / "downloads").exists()  # nothing left behind but the dataset

    src = open_image_source("tfds:cat_prior", data_dir)
    paths = list_images(image_folder)
    assert len(src) == 4
    assert [src[i]["file_name"] for i in range(4)] == [p.name for p in paths]  # sorted file order
    for item, path in zip(src, paths):
        assert item["image"].dtype == np.uint8 and item["image"].shape == (32, 32, 3)
        np.testing.assert_array_equal(item["image"], to_uint8(load_image(path, 32)))
        np.testing.assert_array_equal(item["image"], load_image_uint8(path, 32))
    assert src[1]["caption"] == "a photo of sks cat" and src[0]["caption"] == ""
    np.testing.assert_array_equal(src[-1]["image"], src[3]["image"])
    with pytest.raises(IndexError):
        src[4]

    explicit = open_image_source("tfds:cat_prior:1.0.0/train[1:3]", str(data_dir))
    assert [explicit[i]["file_name"] for i in range(len(explicit))] == [paths[1].name, paths[2].name]

    # All of that ran on NumPy and array_record alone.
    assert "tensorflow" not in sys.modules
    assert importlib.util.find_spec("tensorflow") is None


def test_captions_argument_and_overwrite(image_folder, tmp_path):
    data_dir = tmp_path / "tfds"
    build_image_dataset(image_folder, data_dir, "prior", 16, captions="a photo of a cat")
    assert {item["caption"] for item in open_image_source("tfds:prior/train", data_dir)} == {"a photo of a cat"}
    with pytest.raises(DataError, match="already exists.*overwrite"):
        build_image_dataset(image_folder, data_dir, "prior", 16)
    build_image_dataset(image_folder, data_dir, "prior", 24, split="val", captions={"a.png": "x"}, overwrite=True)
    src = open_image_source("tfds:prior/val", data_dir)
    assert src[0]["image"].shape == (24, 24, 3)
    assert [item["caption"] for item in src] == ["x", "", "", ""]
    with pytest.raises(DataError, match="nope.png"):
        build_image_dataset(image_folder, data_dir, "other", 16, captions={"nope.png": "x"})


@pytest.mark.parametrize("spec", ["cat_prior", "tfds:", "tfds:Cat", "tfds:cat/train/x", "tfds:cat:1.0/train",
                                  "tfds:cat/tr ain"])
def test_malformed_spec(spec, tmp_path):
    with pytest.raises(DataError, match="malformed image source") as e:
        open_image_source(spec, tmp_path)
    assert "tfds:NAME" in str(e.value)


def test_spec_parsing():
    assert parse_spec("tfds:dog") == parse_spec("tfds:dog/train")
    s = parse_spec("tfds:dog_2:1.2.3/test[:10%]")
    assert (s.name, s.version, s.split) == ("dog_2", "1.2.3", "test[:10%]")


def test_missing_dataset_split_and_version(image_folder, tmp_path):
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError, match=f"no TFDS dataset 'mnist' in .*{data_dir.name}.*does not exist"):
        open_image_source("tfds:mnist", data_dir)  # a catalogue name: must not try to download
    build_image_dataset(image_folder, data_dir, "have", 16)
    with pytest.raises(DataError) as e:
        open_image_source("tfds:other", data_dir)
    assert str(data_dir) in str(e.value) and "have" in str(e.value)
    with pytest.raises(DataError, match="no split 'test'.*splits: train"):
        open_image_source("tfds:have/test", data_dir)
    with pytest.raises(DataError, match="no prepared version 2.0.0.*1.0.0"):
        open_image_source("tfds:have:2.0.0", data_dir)


def test_build_validates_before_writing(image_folder, tmp_path):
    (image_folder / "zz.jpg").write_bytes(b"not a jpeg")
    data_dir = tmp_path / "tfds"
    with pytest.raises(DataError, match="zz.jpg"):
        build_image_dataset(image_folder, data_dir, "broken", 16)
    assert not (data_dir / "broken").exists()
    with pytest.raises(DataError, match="invalid TFDS dataset name"):
        build_image_dataset(image_folder, data_dir, "Bad-Name", 16)
