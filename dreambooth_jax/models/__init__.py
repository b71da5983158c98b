"""Flax NNX models of the Stable Diffusion families and their diffusers-layout loading/export."""

from dreambooth_jax.models.clip import CLIPTextConfig, CLIPTextModel
from dreambooth_jax.models.export import export_pipeline, pipeline_dtype, save_component
from dreambooth_jax.models.hub import resolve_model_path
from dreambooth_jax.models.loading import (Pipeline, default_tokenizer, load_pretrained, load_text_encoder,
                                           load_tokenizer, load_unet, load_vae, tokenize)
from dreambooth_jax.models.options import ModelOptions
from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "ModelOptions", "Pipeline", "UNet2DConditionModel",
    "UNetConfig", "VAEConfig", "default_tokenizer", "export_pipeline", "load_pretrained",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "pipeline_dtype", "resolve_model_path",
    "save_component", "tokenize",
]
