"""Random-weight pipeline folders in the diffusers layout, made with diffusers/transformers.

No model hub is reachable here, so parity tests and benchmarks build small models of the real
architectures with the PyTorch reference classes, save them with ``save_pretrained`` (the same
layout as real Stable Diffusion folders), and load that folder on both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"

# Scheduler configs as found in real checkpoints.
SD1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                     steps_offset=1)
UPSCALER_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                          num_train_timesteps=1000, prediction_type="v_prediction",
                          set_alpha_to_one=False, steps_offset=1, clip_sample=False)
UPSCALER_LOW_RES = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        num_train_timesteps=1000, variance_type="fixed_small", clip_sample=False)

# Architectures. "sd1"/"sd2"/"upscaler" are tiny test variants of each family; "tiny"/"small" are
# the benchmark configs of shared/BENCHMARKS.md.
UNETS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=8, cross_attention_dim=32, sample_size=8),
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True,
                cross_attention_dim=32, sample_size=8),
    "upscaler": dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8,
                     in_channels=7, out_channels=4, num_class_embeds=1000,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     only_cross_attention=(True, True, False), attention_head_dim=8,
                     use_linear_projection=True, cross_attention_dim=32, sample_size=16),
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=8, cross_attention_dim=32, sample_size=16),
    "small": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                  attention_head_dim=8, cross_attention_dim=256, sample_size=32),
}
VAES = {
    "sd1": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                latent_channels=4, sample_size=32),
    "sd2": dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                latent_channels=4, sample_size=32),
    "upscaler": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                     latent_channels=4, scaling_factor=0.08333, sample_size=32),
    "tiny": dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, sample_size=64),
    "small": dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4,
                  sample_size=256),
}
TEXT = {
    "sd1": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                hidden_act="quick_gelu"),
    "sd2": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                hidden_act="gelu"),
    "upscaler": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     hidden_act="gelu"),
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 hidden_act="quick_gelu"),
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  hidden_act="quick_gelu"),
}
FAMILY = {"sd1": "sd", "sd2": "sd", "tiny": "sd", "small": "sd", "upscaler": "upscaler"}


def _perturb(module, seed: int, scale: float) -> None:
    """Add noise to every parameter so zero/one-initialised ones (norms, biases) are tested too."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def build_torch_components(name: str, seed: int = 0, perturb: float = 0.0):
    """(unet, vae, text_encoder) PyTorch modules of architecture ``name`` with seeded weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNETS[name])
    nlev = len(VAES[name]["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * nlev,
                        up_block_types=("UpDecoderBlock2D",) * nlev, **VAES[name])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                        **TEXT[name]))
    if perturb:
        for i, m in enumerate((unet, vae, text)):
            _perturb(m, seed + i + 1, perturb)
    return unet.eval(), vae.eval(), text.eval()


def make_pipeline_folder(out: str | Path, name: str = "sd1", seed: int = 0, perturb: float = 0.0,
                         prediction_type: str = "epsilon") -> Path:
    """Save a random-weight pipeline of architecture ``name`` with ``save_pretrained``.

    SD families get a PNDM scheduler config (as SD 1.x ships); the upscaler gets DDIM +
    its DDPM low-res noise schedule and ``max_noise_level`` 350.
    """
    from diffusers import (DDIMScheduler, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           StableDiffusionUpscalePipeline)
    from transformers import CLIPTokenizer

    out = Path(out)
    unet, vae, text = build_torch_components(name, seed, perturb)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    if FAMILY[name] == "upscaler":
        pipe = StableDiffusionUpscalePipeline(
            vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
            low_res_scheduler=DDPMScheduler(**UPSCALER_LOW_RES),
            scheduler=DDIMScheduler(**UPSCALER_SCHEDULER), max_noise_level=350)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
            scheduler=PNDMScheduler(prediction_type=prediction_type, **SD1_SCHEDULER),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return out


def max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| relative to the reference output's scale (max |ref|, at least 1e-6)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))
