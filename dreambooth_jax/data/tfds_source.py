"""Image sets stored as TensorFlow Datasets (TFDS) in the array_record format, without TensorFlow.

A large class-prior image set is best kept as a prepared TFDS dataset (on a TPU VM's disk or in a
GCS bucket): one file per shard, random access by index. :func:`build_image_dataset` writes one
from a folder of images; :func:`open_image_source` reads it back from a ``tfds:NAME[/SPLIT]`` spec.

Why this layout works without TensorFlow: images are stored as ``tfds.features.Tensor`` (uint8,
zlib-compressed) rather than ``tfds.features.Image`` (PNG/JPEG, decoded by TensorFlow), and the
files are array_record, read with ``tfds`` data sources (pure NumPy), not ``tf.data``.
``tfds.ImageFolder`` would need TensorFlow.

``tensorflow_datasets`` is imported inside the functions only, so importing this module (or the
package) costs nothing for users that do not use TFDS.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dreambooth_jax.data.images import DataError, list_images, load_image_uint8

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

#: The version written by :func:`build_image_dataset`: TFDS lays a dataset out as
#: ``DATA_DIR/NAME/VERSION/``.
DEFAULT_VERSION = "1.0.0"

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+")
_SPLIT_RE = re.compile(r"[A-Za-z0-9_\-]+(\[[^\]]*\])?")
_SPEC_RE = re.compile(
    r"tfds:(?P<name>[^/:]+)(:(?P<version>[^/]+))?(/(?P<split>.+))?"
)
SPEC_FORMAT = "tfds:NAME, tfds:NAME/SPLIT or tfds:NAME:VERSION/SPLIT (e.g. tfds:dog_class/train)"


def _tfds() -> Any:
    """The ``tensorflow_datasets`` module, or a DataError saying how to install it."""
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise DataError(f"TFDS image sources need the tensorflow-datasets package ({e}); install it with "
                        "`pip install tensorflow-datasets array-record` (TensorFlow itself is not needed)"
                        ) from None
    return tensorflow_datasets


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise DataError(f"invalid TFDS dataset name {name!r}: use lower-case letters, digits and '_', "
                        "starting with a letter (e.g. dog_class_images)")


def build_image_dataset(
    image_folder: str | Path,
    data_dir: str | Path,
    name: str,
    size: int,
    split: str = "train",
    *,
    captions: str | Mapping[str, str] | None = None,
    crop: str = "center",
    seed: int = 0,
    min_size: int | None = None,
    version: str = DEFAULT_VERSION,
    overwrite: bool = False,
) -> tfds.core.DatasetInfo:
    """Encode every image of ``image_folder`` into the TFDS dataset ``data_dir/name/version``.

    Each example holds ``image`` (uint8 ``(size, size, 3)``, exactly :func:`load_image_uint8`
    of the file), ``file_name`` (the file's name, no folder) and ``caption``. Examples keep the
    sorted file order (shuffling disabled), so index ``i`` is the ``i``-th file of
    :func:`list_images`.

    Args:
        split: the one split written (a name of letters, digits, '_' or '-').
        captions: one caption for every image, or ``{file name: caption}`` (files missing from
            the mapping get ""). When ``None``, a sidecar text file with the image's stem
            ("dog01.txt" for "dog01.jpg") is used if present, else "".
        crop, seed, min_size: as :func:`load_image_uint8` (``seed`` seeds random crops).
        overwrite: replace an existing dataset of that name and version; otherwise that is an
            error, so one cannot silently mix two image sets.

    Returns:
        The written dataset's ``tfds.core.DatasetInfo`` (``.splits[split].num_examples`` etc.).

    Raises:
        DataError: a bad folder or image (every image is validated before anything is written),
            an invalid name/version/split, or an existing dataset without ``overwrite``.
    """
    _check_name(name)
    if not _VERSION_RE.fullmatch(version):
        raise DataError(f"invalid dataset version {version!r}: expected MAJOR.MINOR.PATCH, e.g. 1.0.0")
    if not _SPLIT_RE.fullmatch(split) or "[" in split:
        raise DataError(f"invalid split name {split!r}: use letters, digits, '_' or '-' (e.g. train)")
    paths = list_images(image_folder)
    texts = _captions(paths, captions)
    # Validate everything first: a bad file found halfway would leave a half-written dataset.
    rng = np.random.default_rng(seed)
    images = [load_image_uint8(p, size, crop=crop, rng=rng, min_size=min_size) for p in paths]

    tfds = _tfds()
    from etils import epath

    out_dir = epath.Path(data_dir) / name / version
    if (out_dir / "dataset_info.json").exists() and not overwrite:
        raise DataError(f"TFDS dataset {name} {version} already exists in {out_dir}; pass overwrite=True "
                        "(or another name/version) to replace it")

    features = tfds.features.FeaturesDict({
        # Tensor + zlib, not tfds.features.Image: decoding Image features needs TensorFlow.
        "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding="zlib"),
        "file_name": tfds.features.Text(),
        "caption": tfds.features.Text(),
    })
    examples = [{"image": im, "file_name": p.name, "caption": t} for p, im, t in zip(paths, images, texts)]
    description = (f"{len(paths)} images from {Path(image_folder).name}, {size}x{size} RGB uint8, "
                   "written by dreambooth_jax.data.tfds_source.build_image_dataset")

    dataset_name = name

    class _ImageFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        # Defined per call: TFDS takes a builder's name and version from class attributes.
        # skip_registration keeps it out of TFDS's global registry (no clash on the next call).
        name = dataset_name
        VERSION = tfds.core.Version(version)
        # TFDS looks for a checksums file next to a builder's source; this builder downloads
        # nothing, and locating its package breaks under some editable installs.
        code_path = None

        def _info(self) -> tfds.core.DatasetInfo:
            # DatasetInfo directly: dataset_info_from_configs would look for metadata files
            # next to this module.
            return tfds.core.DatasetInfo(
                builder=self, description=description, features=features,
                disable_shuffling=True,  # index i == i-th sorted file
                metadata=tfds.core.MetadataDict(size=size, source_folder=str(image_folder)),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
            return {split: self._generate_examples()}

        def _generate_examples(self) -> Iterator[tuple[int, dict]]:
            yield from enumerate(examples)

    builder = _ImageFolderBuilder(data_dir=str(data_dir), file_format="array_record")
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    config = tfds.download.DownloadConfig(try_download_gcs=False, download_mode=mode)
    with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keep data_dir clean
        builder.download_and_prepare(download_dir=downloads, download_config=config)
    return builder.info


def _captions(paths: Sequence[Path], captions: str | Mapping[str, str] | None) -> list[str]:
    if isinstance(captions, str):
        return [captions] * len(paths)
    if captions is not None:
        unknown = set(captions) - {p.name for p in paths}
        if unknown:
            raise DataError(f"captions name files that are not images of {paths[0].parent}: "
                            f"{', '.join(sorted(unknown))}")
        return [captions.get(p.name, "") for p in paths]
    out = []
    for p in paths:
        side = p.with_suffix(".txt")
        out.append(side.read_text(encoding="utf-8").strip() if side.is_file() else "")
    return out


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``tfds:NAME[:VERSION][/SPLIT]`` spec (``version`` None = newest on disk)."""

    name: str
    split: str = "train"
    version: str | None = None


def parse_spec(spec: str) -> SourceSpec:
    """Parse ``tfds:NAME``, ``tfds:NAME/SPLIT`` or ``tfds:NAME:VERSION/SPLIT``.

    SPLIT may carry a TFDS slice, e.g. ``train[:100]``. The default split is "train".

    Raises:
        DataError: ``spec`` does not have that form (the message shows the accepted forms).
    """
    def malformed(why: str) -> DataError:
        return DataError(f"malformed image source {spec!r}: {why}expected {SPEC_FORMAT}")

    m = _SPEC_RE.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise malformed("")
    name, version, split = m["name"], m["version"], m["split"] or "train"
    if not _NAME_RE.fullmatch(name):
        raise malformed(f"dataset name {name!r} must be lower-case letters, digits and '_' starting with a "
                        "letter; ")
    if version is not None and not _VERSION_RE.fullmatch(version):
        raise malformed(f"version {version!r} is not MAJOR.MINOR.PATCH; ")
    if not _SPLIT_RE.fullmatch(split):
        raise malformed(f"split {split!r} is not a split name (optionally sliced, e.g. train[:100]); ")
    return SourceSpec(name=name, split=split, version=version)


class ImageSource(Sequence):
    """Random access to the examples of a TFDS split: ``len(src)``, ``src[i]``, iteration.

    ``src[i]`` is a dict with ``"image"`` (uint8 ``(H, W, 3)``) and the dataset's other
    features, with text decoded to ``str`` (``"file_name"``, ``"caption"`` for datasets written
    by :func:`build_image_dataset`).
    """

    def __init__(self, source: Sequence, info: Any, spec: SourceSpec, directory: str) -> None:
        self._source = source
        self.info = info
        self.spec = spec
        self.directory = directory

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"ImageSource indices must be integers, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {n} examples of {self.spec.name}/{self.spec.split}")
        return self._decode(self._source[i])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    @staticmethod
    def _decode(example: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in example.items()}
        out["image"] = np.asarray(out["image"], dtype=np.uint8)
        return out

    def __repr__(self) -> str:
        return f"ImageSource(tfds:{self.spec.name}/{self.spec.split}, {len(self)} examples, {self.directory})"


def open_image_source(spec: str, data_dir: str | Path | None = None) -> ImageSource:
    """Open the split named by ``spec`` (see :func:`parse_spec`) of a prepared TFDS dataset.

    Reads ``data_dir/NAME/VERSION`` directly (the newest version with a ``dataset_info.json``
    unless the spec names one), so a dataset name that is also in the TFDS catalogue never
    triggers a download. ``data_dir`` defaults to TFDS's (``$TFDS_DATA_DIR`` or
    ``~/tensorflow_datasets``); ``gs://`` paths work where TFDS can read them.

    Raises:
        DataError: a malformed spec, no such dataset or version in ``data_dir`` (the message
            names the folder and what it holds), no such split (the message lists the splits),
            or a dataset without an ``image`` feature.
    """
    parsed = parse_spec(spec)
    tfds = _tfds()
    from etils import epath
    from tensorflow_datasets.core import constants

    root = epath.Path(data_dir if data_dir is not None else constants.get_default_data_dir())
    ds_dir = root / parsed.name
    if not ds_dir.is_dir():
        have = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        where = f"TFDS data dir {root}" + ("" if root.is_dir() else " (which does not exist)")
        raise DataError(f"no TFDS dataset {parsed.name!r} in {where}"
                        + (f"; it holds: {', '.join(have)}" if have else "")
                        + "; build one with dreambooth_jax.data.tfds_source.build_image_dataset")
    versions = sorted((p.name for p in ds_dir.iterdir()
                       if _VERSION_RE.fullmatch(p.name) and (p / "dataset_info.json").exists()),
                      key=lambda v: tuple(int(x) for x in v.split(".")))
    if parsed.version is not None and parsed.version not in versions:
        raise DataError(f"TFDS dataset {parsed.name} has no prepared version {parsed.version} in {ds_dir} "
                        f"(prepared: {', '.join(versions) or 'none'})")
    if not versions:
        raise DataError(f"TFDS dataset folder {ds_dir} holds no prepared version (no VERSION/dataset_info.json; "
                        "was the build interrupted?)")
    version_dir = ds_dir / (parsed.version or versions[-1])
    try:
        builder = tfds.builder_from_directory(version_dir)
    except Exception as e:  # TFDS raises assorted types for unreadable metadata
        raise DataError(f"cannot read the TFDS dataset in {version_dir}: {e}") from e
    splits = list(builder.info.splits.keys())
    base_split = parsed.split.split("[", 1)[0]
    if base_split not in splits:
        raise DataError(f"TFDS dataset {parsed.name} in {version_dir} has no split {base_split!r} "
                        f"(splits: {', '.join(splits) or 'none'})")
    if "image" not in builder.info.features:
        raise DataError(f"TFDS dataset {parsed.name} in {version_dir} has no 'image' feature "
                        f"(features: {', '.join(builder.info.features.keys())})")
    try:
        source = builder.as_data_source(split=parsed.split)
    except Exception as e:  # e.g. a bad slice "train[5:x]", or a tf.data-only file format
        raise DataError(f"cannot open split {parsed.split!r} of TFDS dataset {parsed.name} in {version_dir} "
                        f"as a random-access source: {e}") from e
    return ImageSource(source, builder.info, parsed, str(version_dir))


__all__ = ("DEFAULT_VERSION", "ImageSource", "SourceSpec", "build_image_dataset", "open_image_source",
           "parse_spec")
