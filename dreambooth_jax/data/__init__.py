"""Training data: instance/class image loading (:mod:`.images`) and TFDS image sources
(:mod:`.tfds_source`, imported on first use so that TFDS is only loaded when needed)."""

from __future__ import annotations

from typing import Any

from dreambooth_jax.data.images import (
    EXTENSIONS,
    DataError,
    FewImagesWarning,
    InstanceDataset,
    batch_indices,
    from_uint8,
    list_images,
    load_image,
    load_image_uint8,
    save_image_grid,
    to_uint8,
)

_LAZY = ("ImageSource", "build_image_dataset", "open_image_source", "parse_spec")


def __getattr__(attr: str) -> Any:
    # tfds_source itself imports tensorflow_datasets lazily, but keep even that module out of
    # `import dreambooth_jax.data` until one of its names is used.
    if attr in _LAZY:
        from dreambooth_jax.data import tfds_source

        return getattr(tfds_source, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = [
    "EXTENSIONS", "DataError", "FewImagesWarning", "InstanceDataset", "batch_indices", "from_uint8",
    "list_images", "load_image", "load_image_uint8", "save_image_grid", "to_uint8", *_LAZY,
]
