"""Helpers for tests and benchmarks that build reference checkpoints with diffusers/transformers
(PyTorch). They need the ``test`` extra installed; the library itself never imports them."""
