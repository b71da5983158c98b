"""Flax NNX models of the Stable Diffusion families and their diffusers-layout loading/export."""

from dreambooth_jax.models.clip import CLIPTextConfig, CLIPTextModel
from dreambooth_jax.models.loading import (Pipeline, default_tokenizer, export_pipeline, load_pretrained,
                                           load_text_encoder, load_tokenizer, load_unet, load_vae,
                                           save_component, tokenize)
from dreambooth_jax.models.options import ModelOptions
from dreambooth_jax.models.unet import UNet2DConditionModel, UNetConfig
from dreambooth_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "ModelOptions", "Pipeline", "UNet2DConditionModel",
    "UNetConfig", "VAEConfig", "default_tokenizer", "export_pipeline", "load_pretrained",
    "load_text_encoder", "load_tokenizer", "load_unet", "load_vae", "save_component", "tokenize",
]
