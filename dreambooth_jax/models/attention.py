"""The one attention function every model calls, so kernels can be swapped in one place.

On CPU, computing scores for a block of queries at a time (flash-style, without the online
softmax: each block sees all keys) is ~2.5x faster than materializing the full score matrix for
the 32x32-token latents (see shared/BENCHMARKS.md). On GPU/TPU, ``jax.nn.dot_product_attention``
lets XLA pick a fused kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "einsum", "chunked", "xla")
_CHUNK = 256  # queries per block for the chunked path


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto",
              mask: jax.Array | None = None) -> jax.Array:
    """Multi-head scaled dot-product attention.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D); mask: optional bool, broadcastable to
    (B, H, Lq, Lk), True where attention is allowed. Returns (B, Lq, H, D) in q's dtype.
    Scores and softmax are computed in float32 whatever the input dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if impl == "auto":
        on_cpu = jax.default_backend() == "cpu"
        if not on_cpu:
            impl = "xla"
        elif q.shape[1] > _CHUNK and q.shape[1] % _CHUNK == 0 and mask is None:
            impl = "chunked"
        else:
            impl = "einsum"
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if impl == "chunked":
        return _chunked(q, k, v)
    return _einsum(q, k, v, mask)


def _einsum(q, k, v, mask=None):
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _chunked(q, k, v):
    b, lq, h, d = q.shape
    n = lq // _CHUNK
    qc = q.reshape(b, n, _CHUNK, h, d).swapaxes(0, 1)  # (n, B, chunk, H, D)
    out = jax.lax.map(lambda qi: _einsum(qi, k, v), qc)
    return out.swapaxes(0, 1).reshape(b, lq, h, d)
