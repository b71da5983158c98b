"""Image loading/validation (dreambooth_jax.data.images): EXIF, colour modes, resize/crop, errors,
the instance dataset with flips, and the resumable batch order."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from dreambooth_jax.data.images import (
    DataError,
    FewImagesWarning,
    InstanceDataset,
    batch_indices,
    from_uint8,
    list_images,
    load_image,
    load_image_uint8,
    save_image_grid,
    to_rgb,
    to_uint8,
)
from dreambooth_jax.errors import DreamboothError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def shared_dreambooth_dir() -> Path | None:
    """The DreamBooth subject photos in ``../shared/data/dreambooth`` next to the repo, if present."""
    d = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambooth"
    return d if d.is_dir() else None


def synthetic_photo(path: Path, seed: int = 0, size: int = 512) -> Path:
    """A photo-like JPEG (smooth gradients, a blob, sensor noise) for when shared/ is absent."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.stack([x, y, 1 - x * y], -1) * 200
    cy, cx = rng.uniform(0.3, 0.7, 2)
    img[(y - cy) ** 2 + (x - cx) ** 2 < 0.04] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=92)
    return path


def subject_photos(tmp_path: Path, subject: str = "dog") -> list[Path]:
    """Real photos of ``subject`` from shared/, else 5 synthetic ones."""
    shared = shared_dreambooth_dir()
    if shared is not None and (shared / subject).is_dir():
        return list_images(shared / subject)
    folder = tmp_path / f"synthetic_{subject}"
    folder.mkdir()
    return [synthetic_photo(folder / f"{i:02d}.jpg", seed=i) for i in range(5)]


def quadrants(size: int = 64) -> np.ndarray:
    """uint8 image: top-left red, top-right green, bottom-left blue, bottom-right white."""
    h = size // 2
    a = np.zeros((size, size, 3), np.uint8)
    a[:h, :h], a[:h, h:], a[h:, :h], a[h:, h:] = RED, GREEN, BLUE, WHITE
    return a


def quadrant_colors(img: np.ndarray) -> list[tuple[int, ...]]:
    """Mean colour (rounded) at the centre of the [TL, TR, BL, BR] quadrants of a uint8 image."""
    s = img.shape[0]
    q, r = s // 4, max(1, s // 16)
    centres = [(q, q), (q, 3 * q), (3 * q, q), (3 * q, 3 * q)]
    return [tuple(int(v) for v in np.round(img[y - r:y + r, x - r:x + r].reshape(-1, 3).mean(0)))
            for y, x in centres]


def close(c1, c2, tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(c1, c2))


def save_png(tmp_path: Path, name: str, im: Image.Image) -> Path:
    path = tmp_path / name
    im.save(path)
    return path


# ---------------------------------------------------------------------------------- listing


def test_list_images_filters_and_sorts(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.webp", "notes.txt", "model.bin", ".hidden.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "0.jpg").write_bytes(b"x")  # not searched
    (tmp_path / "dir.jpg").mkdir()  # a folder with an image suffix is not an image
    from dreambooth_jax.data.images import SkippedFilesWarning

    with pytest.warns(SkippedFilesWarning, match="dir.jpg/, sub/ .*model.bin, notes.txt"):
        assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JPEG", "d.webp"]


def test_list_images_errors_name_the_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="nope.*does not exist"):
        list_images(missing)
    a_file = tmp_path / "file.jpg"
    a_file.write_bytes(b"x")
    with pytest.raises(DataError, match="file.jpg is not a folder"):
        list_images(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        list_images(empty)
    assert str(empty) in str(e.value) and ".jpg" in str(e.value) and ".png" in str(e.value)
    assert isinstance(e.value, DreamboothError)  # the CLI prints these without a traceback


# ------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize(("orientation", "k"), [(1, 0), (3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, k):
    """Orientation 6 = 'rotate 90 deg clockwise to display', 8 = counter-clockwise, 3 = 180."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(quadrants(64)).save(path, exif=exif, quality=95)
    assert Image.open(path).getexif()[0x0112] == orientation
    got = quadrant_colors(load_image_uint8(path, 64))
    want = quadrant_colors(np.rot90(quadrants(64), k))
    assert all(close(g, w) for g, w in zip(got, want)), (got, want)
    if orientation == 6:  # spelled out: the blue bottom-left quadrant ends up top-left
        assert close(got[0], BLUE) and close(got[1], RED)


# --------------------------------------------------------------------------- colour modes


def test_rgba_and_la_composite_on_white(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[:16, :16] = (255, 0, 0, 0)  # fully transparent red -> white
    a[:16, 16:] = (0, 0, 255, 255)  # opaque blue
    a[16:, :16] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    a[16:, 16:] = (0, 200, 0, 255)
    got = load_image_uint8(save_png(tmp_path, "rgba.png", Image.fromarray(a, "RGBA")), 32)
    assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
    assert tuple(got[0, 0]) == WHITE and tuple(got[0, 31]) == BLUE and tuple(got[31, 31]) == (0, 200, 0)
    assert all(abs(int(v) - 127) <= 1 for v in got[31, 0])

    la = np.zeros((32, 32, 2), np.uint8)
    la[:, :16] = (0, 0)  # transparent -> white
    la[:, 16:] = (100, 255)
    got = load_image_uint8(save_png(tmp_path, "la.png", Image.fromarray(la, "LA")), 32)
    assert tuple(got[5, 5]) == WHITE and tuple(got[5, 20]) == (100, 100, 100)


def test_palette_grey_and_bilevel(tmp_path):
    p = Image.new("P", (32, 32))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.paste(1, (16, 0, 32, 32))
    got = load_image_uint8(save_png(tmp_path, "p.png", p), 32)
    assert tuple(got[0, 0]) == (10, 20, 30) and tuple(got[0, 31]) == (200, 100, 50)

    p.info["transparency"] = 1  # index 1 transparent -> white
    got = load_image_uint8(save_png(tmp_path, "p_t.png", p), 32)
    assert tuple(got[0, 0]) == (10, 20, 30) and tuple(got[0, 31]) == WHITE

    g = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    got = load_image_uint8(save_png(tmp_path, "l.png", Image.fromarray(g, "L")), 32)
    np.testing.assert_array_equal(got, np.repeat(g[..., None], 3, -1))

    b = Image.new("1", (32, 32), 0)
    b.paste(1, (0, 0, 32, 16))
    got = load_image_uint8(save_png(tmp_path, "1.png", b), 32)
    assert tuple(got[0, 0]) == WHITE and tuple(got[31, 0]) == (0, 0, 0)


def test_16bit_and_32bit_grey_scale_by_range(tmp_path):
    # PIL's own "I;16" -> "L" conversion clips at 255; ours maps 0..65535 to 0..255.
    a = np.zeros((32, 32), np.uint16)
    a[:, 8:16], a[:, 16:24], a[:, 24:] = 32896, 65535, 257 * 10  # -> 128, 255, 10
    path = save_png(tmp_path, "g16.png", Image.fromarray(a))
    assert Image.open(path).mode == "I;16"
    got = load_image_uint8(path, 32)
    assert [tuple(got[0, x]) for x in (0, 8, 16, 24)] == [(0, 0, 0), (128,) * 3, (255,) * 3, (10,) * 3]

    as_int32 = Image.fromarray(a.astype(np.int32))  # mode "I", as older Pillow opens 16-bit PNGs
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb(as_int32)), got)


def test_cmyk(tmp_path):
    # The plain CMYK -> RGB conversion: R = (255 - C) * (255 - K) / 255, etc.
    c, m, y, k = 0, 255, 0, 64
    want = (191, 0, 191)
    cmyk = Image.new("CMYK", (32, 32), (c, m, y, k))
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == want
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=100)
    assert Image.open(path).mode == "CMYK"
    got = load_image_uint8(path, 32)
    assert close(tuple(got[16, 16]), want, tol=3), tuple(got[16, 16])


def test_embedded_srgb_profile_keeps_colours(tmp_path):
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    q = quadrants(32)
    path = tmp_path / "icc.png"
    Image.fromarray(q).save(path, icc_profile=srgb)
    assert Image.open(path).info.get("icc_profile")
    got = load_image_uint8(path, 32)
    assert np.abs(got.astype(int) - q).max() <= 2


# -------------------------------------------------------------------------- resize and crop


def bands(w: int, h: int) -> np.ndarray:
    """Vertical colour bands (R, G, B, white) across a w x h image."""
    a = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate((RED, GREEN, BLUE, WHITE)):
        a[:, i * w // 4:(i + 1) * w // 4] = c
    return a


def test_center_crop_resizes_short_side(tmp_path):
    path = save_png(tmp_path, "wide.png", Image.fromarray(bands(256, 128)))
    out = load_image(path, 32)
    assert out.dtype == np.float32 and out.shape == (32, 32, 3)
    assert out.min() >= -1.0 and out.max() <= 1.0
    # 256x128 -> 64x32, centre crop = columns 16..47: the green and blue bands.
    resized = np.asarray(Image.fromarray(bands(256, 128)).resize((64, 32), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(to_uint8(out), resized[:, 16:48])
    assert close(tuple(to_uint8(out)[16, 4]), GREEN, 2) and close(tuple(to_uint8(out)[16, 28]), BLUE, 2)

    tall = save_png(tmp_path, "tall.png", Image.fromarray(bands(128, 256).transpose(1, 0, 2).copy()))
    assert load_image(tall, 32).shape == (32, 32, 3)


def test_random_crop_is_a_seeded_window(tmp_path):
    src = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    path = save_png(tmp_path, "noise.png", Image.fromarray(src))
    # size == short side: no resampling, so a crop is an exact window of the source.
    offsets = set()
    for seed in range(8):
        crop = load_image_uint8(path, 64, crop="random", rng=np.random.default_rng(seed))
        matches = [x for x in range(65) if np.array_equal(src[:, x:x + 64], crop)]
        assert len(matches) == 1
        offsets.add(matches[0])
        again = load_image_uint8(path, 64, crop="random", rng=seed)  # an int seed is the same
        np.testing.assert_array_equal(crop, again)
    assert len(offsets) > 1  # not always the same window
    np.testing.assert_array_equal(load_image_uint8(path, 64), src[:, 32:96])  # centre


def test_bad_crop_or_size_is_a_config_error(tmp_path):
    path = save_png(tmp_path, "x.png", Image.fromarray(quadrants(32)))
    with pytest.raises(DreamboothError, match="crop"):
        load_image(path, 32, crop="top")
    with pytest.raises(DreamboothError, match="size"):
        load_image(path, 0)


# --------------------------------------------------------------------------------- errors


def test_too_small_names_file_and_size(tmp_path):
    path = save_png(tmp_path, "tiny.png", Image.new("RGB", (10, 40), RED))
    with pytest.raises(DataError) as e:
        load_image(path, 64)  # default minimum: 64 / 4 = 16 px
    msg = str(e.value)
    assert "tiny.png" in msg and "10x40" in msg and "16" in msg
    assert load_image(path, 64, min_size=8).shape == (64, 64, 3)  # configurable
    assert load_image(path, 40).shape == (40, 40, 3)  # 10 >= 40 / 4


def test_corrupt_truncated_and_missing_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="garbage.jpg"):
        load_image(garbage, 32)

    text = tmp_path / "text.png"
    text.write_text("not a picture")
    with pytest.raises(DataError, match="text.png"):
        load_image(text, 32)

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DataError, match="truncated.jpg.*truncated"):
        load_image(truncated, 32)

    with pytest.raises(DataError, match="missing.png"):
        load_image(tmp_path / "missing.png", 32)


def test_dataset_checks_every_file(tmp_path):
    for i in range(3):
        Image.fromarray(quadrants(32)).save(tmp_path / f"{i}.png")
    (tmp_path / "3.jpg").write_bytes(b"\xff\xd8\xff broken")
    with pytest.raises(DataError, match="3.jpg"):
        InstanceDataset(tmp_path, 32)


# ------------------------------------------------------------------------ InstanceDataset


def make_folder(tmp_path: Path, n: int, name: str = "inst") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(n)
    for i in range(n):
        a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"img{i}.{'png' if i % 2 else 'jpg'}")
    return folder


def test_instance_dataset_flip_and_order(tmp_path):
    folder = make_folder(tmp_path, 4)
    plain = InstanceDataset(folder, 32)
    assert len(plain) == 4 and plain.images.shape == (4, 32, 32, 3) and plain.images.dtype == np.float32
    assert [p.name for p in plain.paths] == ["img0.jpg", "img1.png", "img2.jpg", "img3.png"]
    for i, p in enumerate(plain.paths):
        np.testing.assert_array_equal(plain[i], load_image(p, 32))

    flipped = InstanceDataset(folder, 32, flip=True)
    assert len(flipped) == 8 and isinstance(flipped.images, np.ndarray)
    np.testing.assert_array_equal(flipped.images[:4], plain.images)
    np.testing.assert_array_equal(flipped.images[4:], plain.images[:, :, ::-1])
    assert list(flipped.source_index) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert list(flipped.flipped) == [False] * 4 + [True] * 4


def test_instance_dataset_random_crops_are_seeded_and_mirrored(tmp_path):
    folder = make_folder(tmp_path, 3)
    a = InstanceDataset(folder, 32, crop="random", flip=True, seed=5)
    b = InstanceDataset(folder, 32, crop="random", flip=True, seed=5)
    c = InstanceDataset(folder, 32, crop="random", flip=True, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    np.testing.assert_array_equal(a.images[3:], a.images[:3, :, ::-1])  # mirror of the same crop


def test_fewer_than_three_images_warns(tmp_path):
    with pytest.warns(FewImagesWarning, match=r"only 2 instance image\(s\)"):
        ds = InstanceDataset(make_folder(tmp_path, 2, "two"), 32)
    assert len(ds) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewImagesWarning)
        assert len(InstanceDataset(make_folder(tmp_path, 3, "three"), 32)) == 3


def test_empty_instance_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no images in"):
        InstanceDataset(tmp_path, 32)


# ---------------------------------------------------------------------------- batch order


def test_batch_indices_resume_sees_the_same_data():
    n, b, seed = 5, 2, 7
    straight = [batch_indices(n, b, s, seed) for s in range(6)]
    # A "resumed" run: a fresh computation starting at step 3, in another order.
    resumed = {s: batch_indices(n, b, s, seed) for s in (5, 4, 3)}
    for s in (3, 4, 5):
        np.testing.assert_array_equal(resumed[s], straight[s])
    flat = np.concatenate(straight)  # 12 draws: epochs 0 and 1, then 2 items of epoch 2
    assert flat.dtype == np.int64 and flat.min() >= 0 and flat.max() < n
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # per-epoch permutations
    assert not np.array_equal(flat[:5], flat[5:10])  # each epoch is reshuffled
    other = np.concatenate([batch_indices(n, b, s, seed + 1) for s in range(6)])
    assert not np.array_equal(flat, other)


def test_batch_indices_larger_than_dataset_and_errors():
    out = batch_indices(3, 7, 0, 0)  # spans 3 epochs
    assert len(out) == 7 and sorted(out[:3]) == [0, 1, 2] and sorted(out[3:6]) == [0, 1, 2]
    assert list(batch_indices(1, 4, 9, 0)) == [0, 0, 0, 0]
    with pytest.raises(DataError, match="no examples"):
        batch_indices(0, 2, 0, 0)
    for args in [(3, 0, 0, 0), (3, 2, -1, 0), (3, 2, 0, -1)]:
        with pytest.raises(ValueError):
            batch_indices(*args)


# ------------------------------------------------------------------------- uint8 and grids


def test_uint8_round_trip_and_clipping():
    v = np.arange(256, dtype=np.uint8)
    f = from_uint8(v)
    assert f.dtype == np.float32 and f[0] == -1.0 and f[255] == 1.0
    np.testing.assert_array_equal(to_uint8(f), v)
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, 0.0, 2.5])), [0, 128, 255])


def test_save_image_grid(tmp_path):
    imgs = np.stack([np.full((8, 6, 3), 40 * (i + 1), np.uint8) for i in range(5)])
    path = save_image_grid(imgs, tmp_path / "out" / "grid.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 8, 3 * 6, 3)  # ceil(sqrt(5)) = 3 columns
    assert grid[0, 0, 0] == 40 and grid[0, 6, 0] == 80 and grid[8, 6, 0] == 200 and grid[8, 12, 0] == 0
    grid = np.asarray(Image.open(save_image_grid(imgs, tmp_path / "row.png", cols=5)))
    assert grid.shape == (8, 30, 3)
    with pytest.raises(ValueError, match="uint8"):
        save_image_grid(imgs.astype(np.float32), tmp_path / "bad.png")


# ------------------------------------------------------------------------------ real photos


def test_real_photo_loads_at_64(tmp_path):
    photos = subject_photos(tmp_path, "dog")
    assert len(photos) >= 3
    x = load_image(photos[0], 64)
    assert x.shape == (64, 64, 3) and x.dtype == np.float32
    assert -1.0 <= x.min() < x.max() <= 1.0 and x.std() > 0.05  # a picture, not a flat fill
    ds = InstanceDataset(photos[0].parent, 64, flip=True)
    assert len(ds) == 2 * len(photos) and np.isfinite(ds.images).all()


# ------------------------------------------------------------ skipped files, limits, names


def _one_warning(record, category) -> str:
    msgs = [str(w.message) for w in record if issubclass(w.category, category)]
    assert len(msgs) == 1, msgs
    assert "\n" not in msgs[0]
    return msgs[0]


def test_list_images_reports_skipped_files_in_one_warning(tmp_path):
    from dreambooth_jax.data.images import SkippedFilesWarning

    for name in ["a.jpg", "b.png", "anim.gif", "IMG_1.HEIC", "notes.md", "README"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a.txt").write_text("a caption")  # caption sidecar of a.jpg: used, not reported
    for name in [".DS_Store", "._a.jpg", "Thumbs.db"]:  # OS metadata: not reported
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "more").mkdir()
    with pytest.warns(SkippedFilesWarning) as rec:
        assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    msg = _one_warning(rec, SkippedFilesWarning)
    assert msg.startswith(f"skipped 6 file(s) in {tmp_path}: "), msg
    assert "anim.gif (GIF" in msg and "IMG_1.HEIC (HEIC" in msg and "convert it to JPEG" in msg
    assert "broken.jpg (dangling symlink)" in msg and "more/ (sub-folder, not searched)" in msg
    assert "notes.md" in msg and "README" in msg and "accepted: .jpg" in msg
    for quiet in (".DS_Store", "._a.jpg", "Thumbs.db", "a.txt"):
        assert quiet not in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list_images(tmp_path, warn=False)) == 2


def test_list_images_without_skipped_files_is_silent_and_long_lists_are_cut(tmp_path):
    from dreambooth_jax.data.images import SkippedFilesWarning

    Image.fromarray(quadrants(32)).save(tmp_path / "a.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list_images(tmp_path)
    for i in range(12):
        (tmp_path / f"clip{i:02d}.gif").write_bytes(b"x")
    with pytest.warns(SkippedFilesWarning) as rec:
        list_images(tmp_path)
    msg = _one_warning(rec, SkippedFilesWarning)
    assert "skipped 12 file(s)" in msg and "clip04.gif and 7 more (GIF" in msg and "clip05" not in msg


def test_instance_dataset_warns_once_about_skipped_files(tmp_path):
    from dreambooth_jax.data.images import SkippedFilesWarning

    folder = make_folder(tmp_path, 3)
    (folder / "x.heic").write_bytes(b"x")
    with pytest.warns(SkippedFilesWarning) as rec:
        ds = InstanceDataset(folder, 32)
    assert len(ds) == 3
    assert "x.heic (HEIC" in _one_warning(rec, SkippedFilesWarning)


def test_folder_of_only_unsupported_files_says_what_was_skipped(tmp_path):
    (tmp_path / "b.heic").write_bytes(b"x")
    (tmp_path / "c.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(DataError) as e:
        list_images(tmp_path)
    msg = str(e.value)
    assert "no images in" in msg and "b.heic (HEIC" in msg and "c.jpg (dangling symlink)" in msg


def test_decompression_bomb_limit_is_reported_as_too_large(tmp_path, monkeypatch):
    path = save_png(tmp_path, "huge.png", Image.fromarray(quadrants(64)))  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2 x 1000 pixels
    with pytest.raises(DataError) as e:
        load_image(path, 32)
    msg = str(e.value)
    assert "huge.png" in msg and "4,096 pixels" in msg and "limit of 2,000 pixels" in msg
    assert "resize it" in msg and "corrupt" not in msg and "\n" not in msg


def test_webp_non_ascii_names_and_very_long_sides_still_load(tmp_path):
    folder = tmp_path / "фото café"
    folder.mkdir()
    Image.fromarray(quadrants(64)).save(folder / "hund_ß.webp", lossless=True)
    Image.fromarray(quadrants(64)).save(folder / "日本.PNG")
    wide = np.zeros((40, 12000, 3), np.uint8)  # 12000 px long side: resized, centre-cropped
    wide[:, 5980:6020] = RED
    Image.fromarray(wide).save(folder / "pano.jpg", quality=95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing to say
        paths = list_images(folder)
    assert sorted(p.name for p in paths) == sorted(["hund_ß.webp", "日本.PNG", "pano.jpg"])
    webp = load_image_uint8(folder / "hund_ß.webp", 64)
    np.testing.assert_array_equal(webp, quadrants(64))
    pano = load_image_uint8(folder / "pano.jpg", 40)
    assert pano.shape == (40, 40, 3) and close(tuple(int(v) for v in pano[20, 20]), RED, 40)
