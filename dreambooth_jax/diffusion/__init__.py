"""Diffusion core: noise schedules (``schedules``), samplers (``samplers``) and the jitted
sampling pipelines (``pipeline``). Pure jnp at runtime; numerically matched to diffusers."""
