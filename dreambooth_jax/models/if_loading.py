"""Load DeepFloyd IF pipeline folders (diffusers layout) into our Flax models.

Stage I (``IFPipeline``: text -> 64x64 pixels) and stage II (``IFSuperResolutionPipeline``:
64 -> 256 pixels) folders hold ``model_index.json``, ``unet/``, ``text_encoder/`` (transformers'
T5EncoderModel), ``tokenizer/`` (T5: ``spiece.model`` or ``tokenizer.json``), ``scheduler/``, and
for stage II ``image_noising_scheduler/`` (how the low-res image is noised before upscaling).
``feature_extractor/``, ``safety_checker/`` and ``watermarker/`` are not read.

The text encoder is T5-XXL's encoder (4.7 B parameters). Stage II folders often name none
(``"text_encoder": [null, null]`` in model_index.json, as IF-II is saved when loaded with
``text_encoder=None``); a stage loaded without one takes precomputed prompt embeddings, e.g.
stage I's. Sampling: ``dreambooth_jax.diffusion.if_pipeline``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dreambooth_jax.errors import ConfigError
from dreambooth_jax.models.hub import resolve_model_path
from dreambooth_jax.models.loading import _component_dir, _read_json, load_unet
from dreambooth_jax.models.options import ModelOptions
from dreambooth_jax.models.t5 import T5EncoderModel, load_t5_encoder, load_t5_tokenizer
from dreambooth_jax.models.unet import UNet2DConditionModel

# model_index.json's _class_name -> stage. The img2img / inpainting pipelines use the same
# checkpoints (a folder saved from one of them names it), so they load as their stage.
KINDS = {
    "IFPipeline": "I", "IFImg2ImgPipeline": "I", "IFInpaintingPipeline": "I",
    "IFSuperResolutionPipeline": "II", "IFImg2ImgSuperResolutionPipeline": "II",
    "IFInpaintingSuperResolutionPipeline": "II",
}
IF_COMPONENTS = ("unet", "text_encoder", "tokenizer", "scheduler")
# What model_index.json may name for each component we read (library, class).
_EXPECTED = {"unet": ("diffusers", "UNet2DConditionModel"), "text_encoder": ("transformers", "T5EncoderModel"),
             "tokenizer": ("transformers", ("T5Tokenizer", "T5TokenizerFast")),
             "scheduler": ("diffusers", "DDPMScheduler"), "image_noising_scheduler": ("diffusers", "DDPMScheduler")}


def if_kind(index: dict) -> str | None:
    """"I" / "II" for a DeepFloyd IF pipeline's model_index.json, None for another family; ConfigError
    for an ``IF*`` class we do not read."""
    name = index.get("_class_name")
    if not (isinstance(name, str) and name.startswith("IF")):
        return None
    if name not in KINDS:
        raise ConfigError(f"_class_name {name!r} is not a DeepFloyd IF pipeline we read (expected "
                          f"{', '.join(KINDS)})")
    return KINDS[name]


@dataclasses.dataclass
class IFPipeline:
    """The components of a DeepFloyd IF stage folder, as our models (None: not loaded, or absent
    from the folder: ``model_index.json`` names it null)."""

    path: Path
    model_index: dict
    kind: str  # "I" (text -> 64x64) or "II" (super-resolution, conditioned on the noised low-res image)
    unet: UNet2DConditionModel | None = None
    text_encoder: T5EncoderModel | None = None
    tokenizer: Any = None
    scheduler_config: dict | None = None  # the denoising scheduler (DDPM, learned_range, thresholding)
    image_noising_scheduler_config: dict | None = None  # stage II: noise added to the upscaled low-res image

    @property
    def is_super_resolution(self) -> bool:
        return self.kind == "II"


def _entry(index: dict, name: str, index_path: Path) -> bool:
    """Whether model_index.json names component ``name`` (False for null / absent); ConfigError
    when it names a class we do not load as that component."""
    value = index.get(name)
    if value is None or (isinstance(value, (list, tuple)) and all(v is None for v in value)):
        return False
    library, classes = _EXPECTED[name]
    classes = classes if isinstance(classes, tuple) else (classes,)
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and value[1] in classes):
        raise ConfigError(f"{index_path}: component '{name}' is {value!r}; DeepFloyd IF's loader reads "
                          f"{' or '.join(repr([library, c]) for c in classes)}")
    return True


def load_if(path_or_hub_id: str | Path, opts: ModelOptions = ModelOptions(), *,
            components: tuple[str, ...] = IF_COMPONENTS, variant: str | None = None, allow_pickle: bool = False,
            text_encoder_opts: ModelOptions | None = None) -> IFPipeline:
    """Load a DeepFloyd IF stage I or stage II folder (or hub id).

    components: which parts to load, from IF_COMPONENTS ("scheduler" also reads stage II's
    image_noising_scheduler). A text encoder or tokenizer that model_index.json names null is left
    None: the stage then needs prompt embeddings. variant: e.g. "fp16" (IF ships
    ``diffusion_pytorch_model.fp16.safetensors`` and T5 shards ``model.fp16-0000N-of-0000M``).
    text_encoder_opts: options for T5 if they differ from the UNet's (e.g. bfloat16 compute).

    ConfigError (naming model_index.json) for a folder that is not an IF pipeline (a Stable
    Diffusion folder: use ``load_pretrained``) or names components we do not read as such;
    CheckpointError for missing files.
    """
    root = resolve_model_path(path_or_hub_id)
    index_path = root / "model_index.json"
    index = _read_json(index_path)
    class_name = index.get("_class_name")
    if class_name not in KINDS:
        hint = ("; Stable Diffusion folders load with load_pretrained"
                if isinstance(class_name, str) and class_name.startswith("StableDiffusion") else "")
        raise ConfigError(f"{index_path}: _class_name {class_name!r} is not a DeepFloyd IF pipeline "
                          f"(expected {', '.join(KINDS)}){hint}")
    kind = KINDS[class_name]
    if (kind == "II") != _entry(index, "image_noising_scheduler", index_path):
        raise ConfigError(f"{index_path}: a {class_name} folder {'needs' if kind == 'II' else 'has no'} "
                          "'image_noising_scheduler' (stage II noises the upscaled image with it)")
    pipe = IFPipeline(path=root, model_index=index, kind=kind)
    for name in components:
        if name not in IF_COMPONENTS:
            raise ValueError(f"unknown component {name!r}; choose from {IF_COMPONENTS}")
        if not _entry(index, name, index_path):
            if name in ("unet", "scheduler"):
                raise ConfigError(f"{index_path}: names no '{name}'; an IF stage needs one")
            continue  # no text encoder / tokenizer in this folder: prompt embeddings must be given
        folder = _component_dir(root, name)
        if name == "unet":
            pipe.unet = load_unet(folder, opts, allow_pickle=allow_pickle, variant=variant)
        elif name == "text_encoder":
            pipe.text_encoder = load_t5_encoder(folder, text_encoder_opts or opts, variant=variant,
                                                allow_pickle=allow_pickle)
        elif name == "tokenizer":
            pipe.tokenizer = load_t5_tokenizer(folder)
        else:
            pipe.scheduler_config = _read_json(folder / "scheduler_config.json")
            if kind == "II":
                pipe.image_noising_scheduler_config = _read_json(
                    _component_dir(root, "image_noising_scheduler") / "scheduler_config.json")
    if pipe.unet is not None:
        _check_unet(pipe, index_path)
    return pipe


def _check_unet(pipe: IFPipeline, index_path: Path) -> None:
    """Stage II's UNet takes the noisy sample and the upscaled image (2x the channels) and the
    noise level as class labels; stage I's only the sample, without labels."""
    cfg = pipe.unet.config
    source = pipe.path / "unet" / "config.json"
    if pipe.kind == "II" and (cfg.in_channels % 2 or cfg.class_embed_type is None and cfg.num_class_embeds is None):
        raise ConfigError(f"{source}: in_channels={cfg.in_channels}, class_embed_type={cfg.class_embed_type!r}: "
                          f"not a super-resolution UNet ({index_path} names a stage II pipeline, whose UNet takes "
                          "the sample and the upscaled image, twice the channels, and the noise level as labels)")
    if pipe.kind == "I" and (cfg.class_embed_type is not None or cfg.num_class_embeds is not None):
        raise ConfigError(f"{source}: a stage I UNet has no class embedding, this one has "
                          f"class_embed_type={cfg.class_embed_type!r} ({index_path} names a stage I pipeline)")
