"""Image preprocessing of the metric encoders, equal to transformers' image processors.

What ``ViTImageProcessorPil`` (DINO) and ``CLIPImageProcessorPil`` (CLIP) compute, value for value:
these are transformers' PIL backend (``AutoImageProcessor.from_pretrained(..., backend="pil")``,
formerly ``use_fast=False``), the processing of transformers 4's default ("slow") processors.
transformers 5 defaults to a torchvision backend ("fast") whose resize is torch's interpolation,
not bit-identical to PIL's, and which needs torchvision, a dependency we do not have.

Steps, as there: RGB conversion (alpha composited onto white) if ``do_convert_rgb``; PIL resize of
the 8-bit image; center crop (zero padding where the image is smaller); rescale in float64, cast to
float32; ``(x - mean) / std`` in float32. The settings come from the checkpoint folder's
``preprocessor_config.json`` over the processor class's defaults, as ``from_pretrained`` reads it;
without one, from the file published with the checkpoints (facebook/dino-vits16 and dino-vitb16
share theirs; so do openai/clip-vit-base-patch32 and clip-vit-large-patch14).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.options import parse_config
from dreambooth_jax.models.vit import read_json_config

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# preprocessor_config.json as published with the checkpoints (the legacy feature-extractor form:
# int sizes, no rescale keys, which the class defaults below fill in)
PUBLISHED = {
    "vit": {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
            "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "resample": 2, "size": 224},
    "clip": {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
             "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
             "resample": 3, "size": 224},
}
# the processor classes' defaults (ViTImageProcessorPil, CLIPImageProcessorPil and their base)
_CLASS_DEFAULTS = {
    "vit": dict(do_convert_rgb=False, do_resize=True, size={"height": 224, "width": 224}, default_to_square=True,
                resample=2, do_center_crop=False, crop_size=None, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3),
    "clip": dict(do_convert_rgb=True, do_resize=True, size={"shortest_edge": 224}, default_to_square=False,
                 resample=3, do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
                 rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD),
}
_CLASS_NAMES = {"vit": ("ViTImageProcessor", "ViTFeatureExtractor"),
                "clip": ("CLIPImageProcessor", "CLIPFeatureExtractor")}
_FIXED = dict(do_pad=(False,), pad_size=(None,), use_square_size=(False,))
_IGNORED = {"image_processor_type", "feature_extractor_type", "processor_class", "return_tensors", "data_format",
            "input_data_format", "device", "disable_grouping", "image_seq_length"}
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"})


@dataclasses.dataclass(frozen=True)
class ImagePreprocessor:
    """Images -> (B, H, W, 3) float32 model inputs, as the reference processor of ``kind`` does."""

    kind: str  # "vit" (ViTImageProcessor) or "clip" (CLIPImageProcessor)
    do_convert_rgb: bool
    do_resize: bool
    size: dict  # {"height", "width"} or {"shortest_edge"}
    resample: int  # a PIL.Image.Resampling value
    do_center_crop: bool
    crop_size: dict | None  # {"height", "width"}
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple
    image_std: tuple

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], kind: str, source: str) -> "ImagePreprocessor":
        """From a preprocessor_config.json dict; ConfigError naming ``source`` and the key for
        settings we do not implement (or a config of the other processor)."""
        if kind not in _CLASS_DEFAULTS:
            raise ValueError(f"unknown preprocessor kind {kind!r}; choose 'vit' or 'clip'")
        for key in ("image_processor_type", "feature_extractor_type"):
            name = raw.get(key)
            if name is not None and name.removesuffix("Fast").removesuffix("Pil") not in _CLASS_NAMES[kind]:
                raise ConfigError(f"{source}: {key} is {name!r}; expected a {_CLASS_NAMES[kind][0]} config here")
        # a null value means the class default (transformers' _set_attributes)
        c = parse_config({k: v for k, v in raw.items() if v is not None}, _CLASS_DEFAULTS[kind], source,
                         fixed=_FIXED, ignored=_IGNORED)
        size = _size_dict(c["size"], c["default_to_square"], "size", source)
        crop = _size_dict(c["crop_size"], True, "crop_size", source)
        for flag, key in (("do_resize", "size"), ("do_center_crop", "crop_size"), ("do_rescale", "rescale_factor")):
            if c[flag] and c[key] is None:
                raise ConfigError(f"{source}: {flag} is set but {key} is not")
        if c["do_center_crop"] and set(crop) != {"height", "width"}:
            raise ConfigError(f"{source}: crop_size must have 'height' and 'width', got {c['crop_size']!r}")
        if c["resample"] not in range(6):
            raise ConfigError(f"{source}: resample {c['resample']!r} is not a PIL resampling filter (0-5)")
        return cls(kind=kind, do_convert_rgb=bool(c["do_convert_rgb"]), do_resize=bool(c["do_resize"]), size=size,
                   resample=c["resample"], do_center_crop=bool(c["do_center_crop"]), crop_size=crop,
                   do_rescale=bool(c["do_rescale"]), rescale_factor=c["rescale_factor"],
                   do_normalize=bool(c["do_normalize"]), image_mean=_per_channel(c["image_mean"], "image_mean", source),
                   image_std=_per_channel(c["image_std"], "image_std", source))

    def __call__(self, images: Iterable[Image.Image | np.ndarray]) -> np.ndarray:
        """PIL images or (H, W, 3) uint8 arrays -> (B, H, W, 3) float32 (the reference's
        ``pixel_values`` are the same values, channels first)."""
        out = [self.one(im) for im in images]
        if len({x.shape for x in out}) > 1:
            raise ValueError(f"preprocessed images differ in size ({sorted({x.shape for x in out})}): this "
                             "preprocessor neither resizes to a fixed size nor crops")
        return np.stack(out)

    def one(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """One image -> (H, W, 3) float32."""
        image = self._rgb(image)
        if self.do_resize:
            image = image.resize(self._resized_size(*image.size), resample=self.resample)
        x = np.asarray(image)
        if self.do_center_crop:
            x = _center_crop(x, self.crop_size["height"], self.crop_size["width"])
        # transformers' rescale multiplies in float64 and rounds once to float32
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.do_rescale else x.astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x

    def _rgb(self, image) -> Image.Image:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"image arrays must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
            image = Image.fromarray(image)
        if self.do_convert_rgb:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            return image.convert("RGB")
        if image.mode != "RGB":
            raise ValueError(f"a {image.mode} image: this preprocessor config does not convert to RGB "
                             "(do_convert_rgb is off, as in the reference processor, which fails on it too); "
                             "convert it with image.convert('RGB') first")
        return image

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """PIL (width, height) after the resize, as transformers' get_resize_output_image_size."""
        if "shortest_edge" not in self.size:
            return self.size["width"], self.size["height"]
        s = self.size["shortest_edge"]
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(s * long / short)
        return (s, new_long) if width <= height else (new_long, s)


def _size_dict(value, default_to_square: bool, key: str, source: str) -> dict | None:
    """transformers' get_size_dict for the forms we implement."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return {"height": value[0], "width": value[1]}
    if isinstance(value, dict) and set(value) in _SIZE_KEYS:
        return dict(value)
    raise ConfigError(f"{source}: {key} {value!r} is not implemented (an int, [height, width], "
                      "{'height', 'width'} or {'shortest_edge'})")


def _per_channel(value, key: str, source: str) -> tuple:
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ConfigError(f"{source}: {key} must be a number or 3 numbers (RGB), got {value!r}")
    return tuple(float(v) for v in values)


def _center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """transformers' center_crop on (H, W, C): the centered window, zero-padded where the image is smaller."""
    h, w = x.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return x[top:top + height, left:left + width]
    nh, nw = max(height, h), max(width, w)
    pad_top, pad_left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    padded = np.zeros((nh, nw) + x.shape[2:], x.dtype)
    padded[pad_top:pad_top + h, pad_left:pad_left + w] = x
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top):min(nh, top + height), max(0, left):min(nw, left + width)]


def load_preprocessor(folder: str | Path | None, kind: str) -> ImagePreprocessor:
    """The preprocessing of a checkpoint folder (its preprocessor_config.json); the published one
    of the DINO (kind 'vit') or CLIP (kind 'clip') checkpoints when there is no such file or no folder."""
    path = None if folder is None else Path(folder) / "preprocessor_config.json"
    if path is not None and path.exists():
        return ImagePreprocessor.from_config(read_json_config(path), kind, str(path))
    return ImagePreprocessor.from_config(PUBLISHED.get(kind, {}), kind,
                                         f"the published {kind} preprocessor_config.json")
