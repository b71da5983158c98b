"""dreambooth-jax: DreamBooth subject-driven fine-tuning of text-to-image diffusion in JAX/Flax."""

__version__ = "0.1.0"
