"""The one attention function every model calls, so kernels can be swapped in one place.

``attention(q, k, v, impl=..., mask=...)`` with q: (B, Lq, H, D), k, v: (B, Lk, H, D) and an
optional bool mask broadcastable to (B, H, Lq, Lk) (True = may attend). ``impl`` is one of
:data:`IMPLS`:

* ``"matmul"``: scores (B, H, Lq, Lk) by batched matmul in (B, H, L, D) layout, softmax, matmul;
  autodiff backward. On XLA:CPU this layout is 2.5-6x faster than a mixed-layout einsum.
* ``"chunked"``: the matmul path a block of 1024 queries at a time (lax.map), autodiff backward.
* ``"xla"``: ``jax.nn.dot_product_attention`` (XLA's own composition).
* ``"flash"``: the FlashAttention-style kernel below, in pure JAX, on any backend.
* ``"auto"``: per backend and shape, see :func:`attention_plan`.

Flash path (``_flash``). Inputs go to (B, H, L, D); the softmax scale is folded into q. One
``lax.scan`` walks the sequence in blocks; two schedules are implemented, for each pass:

* key blocks (``"k"``): the carry is the running max m, running sum l and unnormalised output acc
  (B, H, Lq, D) in float32; each step computes the (Lq, bk) scores of one key block, rescales
  ``acc`` by exp(m_old - m_new) and adds exp(s - m_new) @ v_block (online softmax); the output is
  normalised once at the end, and lse = m + log(l) is kept for the backward. Backward
  (FlashAttention-2): D = rowsum(dO * O); per key block P = exp(s - lse), dP = dO V_j^T,
  dS = P * (dP - D), dV_j = P^T dO, dK_j = dS^T Q, and dQ += dS K_j in the carry.
* query blocks (``"q"``): each step holds the (bq, Lk) scores of a block of queries against all
  keys (plain softmax, no rescaling); backward carries dK, dV and emits dQ per block.

Neither pass ever holds a (Lq, Lk) matrix: the largest temporary is one block of scores. A length
that is not a multiple of the block is not padded: the scan covers the whole blocks and the
remainder is one more step of the same function on a shorter block (so cross-attention's 77 keys
need neither padding nor a key mask). A short sequence is a single block, i.e. no loop at all.
Softmax statistics and all accumulation are float32 whatever the input dtype (bf16/fp16 inputs
are upcast before the matmuls, and the forward keeps its float32 output for the backward's D);
the output is in v's dtype, gradients in the inputs'.
Masks: the mask block is sliced along the scanned axis (or broadcast when the mask is constant
along it) and masked scores are set to float32's lowest value, as on the matmul path, so a fully
masked row gives the same uniform average on both paths.

Block sizes (``_cpu_plan``, with the measured table) were chosen on a 2-core AVX-512 EPYC
(XLA:CPU, float32; scripts/bench_attention.py compares the paths with torch): key blocks of 64-128
keys for both passes, 512 for head dims >= 256 (the VAE mid-block). On XLA:CPU the key-block
schedule with the whole query range per step wins: every matmul is a large batched (B, H) one, the
per-step overhead is paid Lk/bk times only, and a 64-128 key block of one head's scores
(Lq x bk x 4 bytes, 0.25-1 MiB) stays in the core's L2 between the matmul and the exp.

Backend choice for ``"auto"`` (:func:`attention_plan`, logged once per distinct call shape on the
``dreambooth_jax.attention`` logger at INFO):

* GPU: cuDNN's fused flash attention (``jax.nn.dot_product_attention(implementation="cudnn")``)
  for bf16/fp16 inputs without a mask and a head dim that is a multiple of 8 up to 128 (256 from
  Hopper). Other dtypes/shapes, and wherever cuDNN refuses at trace time: XLA's attention
  (measured faster than the flash path on an H200), the flash path only where the score matrix
  would exceed 2 GiB.
* TPU: the Pallas flash-attention kernel (``jax.experimental.pallas.ops.tpu.flash_attention``,
  as maxdiffusion uses) for unmasked sequences that are multiples of 128 and >= 1024 long, head
  dims zero-padded to a multiple of 128; an import or trace failure falls back to XLA.
* CPU: the flash path from 32768 score elements per head (576x77 cross-attention, 256x256
  self-attention) on, the matmul path below that and, for head dims >= 128, up to 1024x1024
  (measurements above ``attention_plan``; block sizes in ``_cpu_plan``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

IMPLS = ("auto", "matmul", "chunked", "xla", "flash")
_CHUNK = 1024  # queries per block on the chunked path

logger = logging.getLogger("dreambooth_jax.attention")
# The backend ``impl="auto"`` plans for: the default backend, unless a compile for another target
# (ahead-of-time, e.g. a TPU topology compiled on a CPU host) says otherwise via target_backend().
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("attention_target_backend", default=None)


@contextlib.contextmanager
def target_backend(backend: str):
    """Within this block ``impl="auto"`` chooses kernels for ``backend`` ('cpu', 'gpu', 'tpu')
    instead of ``jax.default_backend()``: for ahead-of-time compiles for another platform
    (scripts/scale_report.py --target tpu-v5e traces on a CPU host for a TPU topology)."""
    token = _TARGET.set(backend)
    try:
        yield
    finally:
        _TARGET.reset(token)


def current_backend() -> str:
    """The backend ``impl="auto"`` plans for now."""
    return _TARGET.get() or jax.default_backend()
_F32 = jnp.float32
_NEG = float(jnp.finfo(jnp.float32).min)  # masked score (same as the matmul path)


class FlashBlocks(NamedTuple):
    """Schedule of the flash path: for each pass, the scanned axis ('k' or 'q') and its block."""

    fwd: str
    fwd_block: int
    bwd: str
    bwd_block: int


# ------------------------------------------------------------------------------------------
# public entry point


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto",
              mask: jax.Array | None = None) -> jax.Array:
    """Multi-head scaled dot-product attention.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D); mask: optional bool, broadcastable to
    (B, H, Lq, Lk), True where attention is allowed. Returns (B, Lq, H, D) in v's dtype.
    Scores and softmax are computed in float32 whatever the input dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"attention mask must be bool, got {mask.dtype}")
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    requested = impl
    if impl == "auto":
        impl, reason = attention_plan(q.shape, k.shape, q.dtype, current_backend(), mask)
        _log_once(requested, impl, reason, q.shape, k.shape, q.dtype, mask)
    if impl == "cudnn":
        out = _try_cudnn(q, k, v)
        if out is not None:
            return out
        impl = "flash" if _score_bytes(q.shape, k.shape) > _GPU_FLASH_BYTES else "xla"
    if impl == "pallas_tpu":
        out = _try_tpu_flash(q, k, v)
        if out is not None:
            return out
        impl = "xla"
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, L, D)
    if impl == "flash":
        blocks = flash_blocks(q.shape, k.shape, v.shape[-1])
        out = _flash(q, k, v, mask, blocks)
    elif impl == "chunked" and q.shape[2] % _CHUNK == 0 and mask is None:
        b, h, lq, d = q.shape
        qc = q.reshape(b, h, lq // _CHUNK, _CHUNK, d).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda qi: _core(qi, k, v, None), qc)  # (n, B, H, chunk, D)
        out = out.transpose(1, 2, 0, 3, 4).reshape(b, h, lq, v.shape[-1])
    else:
        out = _core(q, k, v, mask)
    return out.transpose(0, 2, 1, 3)


def _core(q, k, v, mask):
    scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jnp.matmul(jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


# ------------------------------------------------------------------------------------------
# kernel choice


# CPU routing, from scripts/bench_attention.py on a quiet 2-core AVX-512 EPYC (fwd / fwd+bwd ms):
#   self-attention, 576x576 and longer: flash fastest everywhere, e.g. (4,8,1024,1024,8) 14/97
#     (matmul 20/245), (1,8,4096,4096,40) 142/567 (matmul 387/1617), (1,20,576,576,64) 10/35 (12/56);
#   cross-attention (77 keys, one block: plain softmax + the recomputing backward), e.g.
#     (1,20,576,77,64) 1.3/4.0 (matmul 2.4/7.6), (1,8,1024,77,80) 2.1/4.8 (2.6/9.0);
#   wide heads: (1,8,256,256,160) matmul 2.7/6.9, flash 3.0/8.1; (1,1,1024,1024,512) matmul 10/28,
#     flash 10/37; (1,1,4096,4096,512) matmul 126/358, flash 87/351 (and 1/64 of the memory);
#   short: (4,8,64,64,32) matmul 0.1/0.4, flash 0.1/0.5; (4,8,256,77,16) 0.6/1.9 vs 0.5/2.0.
# The flash path's recomputing backward saves the autodiff softmax's passes over the scores, which
# matters when the head dim is small; with wide heads the matmuls dominate and recomputing the
# scores costs more than it saves until the score matrix outgrows the caches.
_CPU_FLASH_MIN = 32768  # Lq * Lk from which the flash path is used ...
_CPU_FLASH_MIN_WIDE = 1024 * 1024 + 1  # ... and from which with head dims >= 128


def attention_plan(q_shape, k_shape, dtype, backend: str, mask=None) -> tuple[str, str]:
    """The implementation ``impl="auto"`` uses for these shapes, and why.

    q_shape: (B, Lq, H, D); k_shape: (B, Lk, H, D); dtype: the inputs' dtype; backend: 'cpu',
    'gpu'/'cuda'/'rocm' or 'tpu'; mask: None, an array or its shape (only its presence matters).
    Returns (impl, reason) with impl one of 'matmul', 'flash', 'xla', 'cudnn', 'pallas_tpu'.
    """
    b, lq, h, d = q_shape
    lk = k_shape[1]
    dtype = jnp.dtype(dtype)
    has_mask = mask is not None
    if backend in ("gpu", "cuda", "rocm"):
        if backend != "rocm" and dtype in (jnp.bfloat16, jnp.float16) and not has_mask and d % 8 == 0 \
                and d <= _cudnn_max_head_dim():
            return "cudnn", f"GPU, {dtype.name}, no mask, head dim {d}: cuDNN fused flash attention"
        why = "mask" if has_mask else (f"dtype {dtype.name}" if dtype not in (jnp.bfloat16, jnp.float16)
                                        else f"head dim {d}")
        score_bytes = _score_bytes(q_shape, k_shape)
        if score_bytes > _GPU_FLASH_BYTES:
            return "flash", f"GPU, not cuDNN ({why}), {score_bytes / 2**30:.1f} GiB of scores: flash path bounds memory"
        return "xla", f"GPU, not cuDNN ({why}), {score_bytes / 2**20:.0f} MiB of scores: XLA attention"
    if backend == "tpu":
        if not has_mask and lq % 128 == 0 and lk % 128 == 0 and min(lq, lk) >= 1024:
            return "pallas_tpu", f"TPU, {lq}x{lk}, no mask: Pallas flash attention kernel"
        return "xla", f"TPU, {'mask' if has_mask else 'short or unaligned sequence'} ({lq}x{lk}): XLA attention"
    if lq * lk < _CPU_FLASH_MIN:
        return "matmul", f"CPU, {lq}x{lk} scores per head: matmul path (short sequences)"
    if d >= 128 and lq * lk < _CPU_FLASH_MIN_WIDE:
        return "matmul", f"CPU, head dim {d}, {lq}x{lk} scores per head: matmul path (matmul-bound)"
    return "flash", f"CPU, {lq}x{lk} scores per head: flash path ({flash_blocks((0, h, lq, d), (0, h, lk, d), d)})"


# GPU (H200, jax 0.11.2, medians of 10; scripts/bench_attention.py), fwd+bwd ms, XLA vs our flash
# path (not tuned for GPUs: its CPU block table means many small steps): fp32 (4,8,1024,1024,8)
# 0.6 vs 0.8, (1,8,4096,4096,40) 2.2 vs 4.7, (1,1,4096,4096,512) 0.7 vs 1.5; bf16 VAE (head dim 512,
# no cuDNN) 0.6 vs 1.5. cuDNN (bf16): (1,8,4096,4096,40) 0.8 (torch's SDPA 1.1), (1,5,9216,9216,64)
# 1.6 (torch 1.5). So XLA's attention unless its score matrix would take more than this:
_GPU_FLASH_BYTES = 2 * 2 ** 30


def _score_bytes(q_shape, k_shape) -> int:
    """Bytes of the float32 (B, H, Lq, Lk) score matrix for (B, L, H, D) shapes."""
    return q_shape[0] * q_shape[2] * q_shape[1] * k_shape[1] * 4

_logged: set = set()


def _log_once(requested, impl, reason, q_shape, k_shape, dtype, mask):
    key = (requested, tuple(q_shape), tuple(k_shape), jnp.dtype(dtype).name,
           None if mask is None else tuple(mask.shape), current_backend())
    if key not in _logged:
        _logged.add(key)
        logger.info("attention q%s k%s %s mask=%s: %s (%s)", tuple(q_shape), tuple(k_shape),
                    jnp.dtype(dtype).name, key[4], impl, reason)


def _cudnn_max_head_dim() -> int:
    try:
        cc = getattr(jax.devices()[0], "compute_capability", "0.0")
        return 256 if tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0) else 128
    except Exception:  # noqa: BLE001 - no GPU information: the conservative limit
        return 128


def _try_cudnn(q, k, v):
    try:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError, TypeError) as e:
        logger.info("cuDNN attention refused q%s k%s %s (%s): XLA attention or the flash path instead",
                    q.shape, k.shape, q.dtype, e)
        return None


def per_shard(kernel, *arrays):
    """``kernel(*arrays)`` for a kernel XLA cannot partition (a Pallas/Mosaic custom call): with a
    mesh in context (``jax.set_mesh``, as the train step and the samplers trace) it runs once per
    device on that device's slice of the leading (batch) axis, inside ``shard_map``; with one device
    it runs as is. None where neither is possible: several devices but no mesh in context (the
    inputs' sharding is unknown while tracing), or a batch the mesh does not divide."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(*arrays) if jax.device_count() == 1 else None
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    if n == 1:
        return kernel(*arrays)
    if arrays[0].shape[0] % n:
        return None
    spec = P(axes)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * len(arrays), out_specs=spec, check_vma=False)(*arrays)


def _try_tpu_flash(q, k, v):
    """Pallas TPU flash attention on (B, L, H, D) inputs; None where it cannot be used."""
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention as fa
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        logger.info("Pallas TPU flash attention unavailable (%s): XLA attention instead", e)
        return None
    d = q.shape[-1]
    pad = (-d) % 128  # the kernel wants lane-aligned head dims; zeros change no score
    qt, kt, vt = (jnp.pad(t, ((0, 0), (0, 0), (0, 0), (0, pad))).transpose(0, 2, 1, 3) for t in (q, k, v))
    lq, lk = q.shape[1], k.shape[1]
    bq, bk = min(512, lq), min(512, lk)
    try:
        sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                              block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                              block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
        out = per_shard(lambda a, b, c: fa.flash_attention(a, b, c, sm_scale=d ** -0.5, block_sizes=sizes),
                        qt, kt, vt)
    except Exception as e:  # noqa: BLE001 - the kernel's own shape checks
        logger.info("Pallas TPU flash attention refused q%s k%s (%s): XLA attention instead", q.shape,
                    k.shape, e)
        return None
    if out is None:
        logger.info("Pallas TPU flash attention q%s: several devices and no mesh in context (or a batch it does "
                    "not divide), and a Pallas kernel cannot be partitioned by XLA: XLA attention instead", q.shape)
        return None
    return out.transpose(0, 2, 1, 3)[..., :d].astype(v.dtype)


# ------------------------------------------------------------------------------------------
# flash path: block schedule


def flash_blocks(q_shape, k_shape, dv: int) -> FlashBlocks:
    """Schedule for the flash path; q_shape (B, H, Lq, D), k_shape (B, H, Lk, D).

    The CPU table serves every backend: "auto" sends GPUs/TPUs to the flash path only for score
    matrices above 2 GiB (or never), and nobody measured larger GPU blocks.
    """
    return _cpu_plan(q_shape[1], q_shape[2], k_shape[2], q_shape[3], dv)


def _cpu_plan(h: int, lq: int, lk: int, d: int, dv: int) -> FlashBlocks:
    """Measured on XLA:CPU (2-core AVX-512 EPYC, 1 MiB L2 per core, float32; medians of
    interleaved runs, +-10% noise from a shared machine). ms of the candidates: forward alone, and
    forward (k128) + backward for the backward's schedules:

    ======================  ==========================  ===============================
    (B, H, Lq, Lk, D)       forward                     backward schedule (fwd k128)
    ======================  ==========================  ===============================
    4, 8, 1024, 1024, 8     k64 14  k128 12  q64 12     k64 88  k128 63  q32 89  q64 159
    1, 8, 4096, 4096, 40    k32 275 k64 189 k128 233    k64 800 k128 858 q64 1230 (loaded)
                            k64 100 k128 124 q128 121   k64 524 k128 449 q128 660 (quiet)
    1, 8, 1024, 1024, 80    k64 18  k128 18  k256 18    k64 76  k128 72  q128 98
    1, 20, 576, 576, 64     k64 12  k128 11  k256 25    k64 62  k128 70  q64 61
    1, 10, 2304, 2304, 64   k64 90  k128 114 q128 94    k64 500 k128 396 q64 422
    1, 5, 9216, 9216, 64    k64 454 k128 470 q128 447   k64 1917 k128 1821 k256 1839
    1, 1, 4096, 4096, 512   k256 170 q256 163 q512 152  k128 700 k512 637 q512 646
    ======================  ==========================  ===============================

    So: key blocks of 64 (Lq >= 2048) or 128 keys forward, 128 keys backward; with wide heads
    (D >= 256: the VAE mid-block) the matmuls dominate and bigger blocks win (q512 / k512).
    Cross-attention (Lk = 77 <= block) is a single block: no loop, only the recomputing backward.
    """
    if max(d, dv) >= 256:
        return FlashBlocks("q", min(512, lq), "k", min(512, lk))
    bk = 64 if lq >= 2048 else 128
    return FlashBlocks("k", min(bk, lk), "k", min(128, lk))


# ------------------------------------------------------------------------------------------
# flash path: kernels, in (B, H, L, D) layout


def _dot_nt(a, b):
    """a @ b^T over the two leading batch dims, float32 result."""
    return lax.dot_general(a, b, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=_F32)


def _dot_nn(a, b):
    return lax.dot_general(a, b, (((3,), (2,)), ((0, 1), (0, 1))), preferred_element_type=_F32)


def _dot_tn(a, b):
    """a^T @ b (contract the sequence axis)."""
    return lax.dot_general(a, b, (((2,), (2,)), ((0, 1), (0, 1))), preferred_element_type=_F32)


def _split(t, axis: int, block: int):
    """t's ``axis`` cut into whole blocks stacked in front (n, ..., block, ...) and the remainder."""
    if t is None:
        return None, None
    n = t.shape[axis] // block
    if t.shape[axis] == 1:  # broadcast mask axis: same for every block
        return None, t
    main = lax.slice_in_dim(t, 0, n * block, axis=axis)
    main = main.reshape(t.shape[:axis] + (n, block) + t.shape[axis + 1:])
    main = jnp.moveaxis(main, axis, 0)
    tail = lax.slice_in_dim(t, n * block, t.shape[axis], axis=axis) if t.shape[axis] % block else None
    return main, tail


def _unsplit(main, tail, axis: int):
    """Inverse of ``_split`` for outputs: (n, ..., block, ...) + remainder -> whole axis."""
    out = jnp.moveaxis(main, 0, axis)
    out = out.reshape(out.shape[:axis] + (out.shape[axis] * out.shape[axis + 1],) + out.shape[axis + 2:])
    return out if tail is None else jnp.concatenate([out, tail], axis=axis)


def _masked(s, mask):
    return s if mask is None else jnp.where(mask, s, _NEG)


def _scan_blocks(step, carry, xs, tails, n):
    """Scan ``step`` over n stacked blocks, then once over the remainder (if any).

    xs / tails: tuples of stacked blocks (or None: the same array each step, given in ``tails``)
    and of remainders/constants. Returns (carry, stacked ys, tail ys or None).
    """
    consts = tuple(t if x is None else None for x, t in zip(xs, tails))

    def body(c, xb):
        args = tuple(b if b is not None else cst for b, cst in zip(xb, consts))
        return step(c, *args)

    ys = tail_ys = None
    if n:
        carry, ys = lax.scan(body, carry, xs)
    if any(x is not None and t is not None for x, t in zip(xs, tails)):  # a remainder block
        carry, tail_ys = step(carry, *tails)
    return carry, ys, tail_ys


def _key_blocks(k, v, mask, block: int):
    """k, v and the mask split along the key axis: ((main, tail), ...) for each, see _split."""
    return _split(k, 2, block), _split(v, 2, block), _split(mask, 3, block)


def _flash_forward(q, k, v, mask, blocks: FlashBlocks):
    """Returns out (B, H, Lq, Dv) float32 and lse (B, H, Lq) float32; q is pre-scaled, float32."""
    b, h, lq, _ = q.shape
    lk, dv = k.shape[2], v.shape[3]
    if blocks.fwd == "k":
        bk = blocks.fwd_block
        (ks, kt), (vs, vt), (ms, mt) = _key_blocks(k, v, mask, bk)

        def step(carry, kj, vj, mj):
            m, l, acc = carry
            s = _masked(_dot_nt(q, kj), mj)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            return (m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + _dot_nn(p, vj)), None

        init = (jnp.full((b, h, lq), _NEG, _F32), jnp.zeros((b, h, lq), _F32), jnp.zeros((b, h, lq, dv), _F32))
        if lk <= bk:  # one block: plain softmax
            s = _masked(_dot_nt(q, k), mask)
            m = s.max(-1)
            p = jnp.exp(s - m[..., None])
            l = p.sum(-1)
            return _dot_nn(p, v) / l[..., None], m + jnp.log(l)
        (m, l, acc), _, _ = _scan_blocks(step, init, (ks, vs, ms), (kt, vt, mt), lk // bk)
        return acc / l[..., None], m + jnp.log(l)
    bq = blocks.fwd_block
    qs, qt = _split(q, 2, bq)
    ms, mt = _split(mask, 2, bq)

    def qstep(carry, qi, mi):
        s = _masked(_dot_nt(qi, k), mi)
        m = s.max(-1)
        p = jnp.exp(s - m[..., None])
        l = p.sum(-1)
        return carry, (_dot_nn(p, v) / l[..., None], m + jnp.log(l))

    if lq <= bq:
        return qstep(None, q, mask)[1]
    _, ys, tail = _scan_blocks(qstep, None, (qs, ms), (qt, mt), lq // bq)
    out = _unsplit(ys[0], None if tail is None else tail[0], 2)
    lse = _unsplit(ys[1], None if tail is None else tail[1], 2)
    return out, lse


def _flash_backward(q, k, v, mask, out, lse, dout, blocks: FlashBlocks):
    """FlashAttention-2 backward; q pre-scaled float32. Returns dq (w.r.t. scaled q), dk, dv."""
    delta = jnp.sum(dout * out, axis=-1)  # D = rowsum(dO * O), (B, H, Lq)
    lk = k.shape[2]
    lq = q.shape[2]
    if blocks.bwd == "k":
        bk = blocks.bwd_block
        (ks, kt), (vs, vt), (ms, mt) = _key_blocks(k, v, mask, bk)

        def step(dq, kj, vj, mj):
            p = jnp.exp(_masked(_dot_nt(q, kj), mj) - lse[..., None])
            ds = p * (_dot_nt(dout, vj) - delta[..., None])
            return dq + _dot_nn(ds, kj), (_dot_tn(ds, q), _dot_tn(p, dout))

        if lk <= bk:
            dq, (dk, dv) = step(jnp.zeros(q.shape, _F32), k, v, mask)
            return dq, dk, dv
        dq, ys, tail = _scan_blocks(step, jnp.zeros(q.shape, _F32), (ks, vs, ms), (kt, vt, mt), lk // bk)
        dk = _unsplit(ys[0], None if tail is None else tail[0], 2)
        dv = _unsplit(ys[1], None if tail is None else tail[1], 2)
        return dq, dk, dv
    bq = blocks.bwd_block
    qs, qt = _split(q, 2, bq)
    ds_, dt_ = _split(dout, 2, bq)
    ls, lt = _split(lse[..., None], 2, bq)
    es, et = _split(delta[..., None], 2, bq)
    ms, mt = _split(mask, 2, bq)

    def qstep(carry, qi, doi, li, ei, mi):
        dk, dv = carry
        p = jnp.exp(_masked(_dot_nt(qi, k), mi) - li)
        ds = p * (_dot_nt(doi, v) - ei)
        return (dk + _dot_tn(ds, qi), dv + _dot_tn(p, doi)), _dot_nn(ds, k)

    init = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32))
    if lq <= bq:
        (dk, dv), dq = qstep(init, q, dout, lse[..., None], delta[..., None], mask)
        return dq, dk, dv
    (dk, dv), ys, tail = _scan_blocks(qstep, init, (qs, ds_, ls, es, ms), (qt, dt_, lt, et, mt), lq // bq)
    return _unsplit(ys, tail, 2), dk, dv


def _prep(q, k, v):
    scale = q.shape[-1] ** -0.5
    return q.astype(_F32) * scale, k.astype(_F32), v.astype(_F32), scale


def _flash_impl(q, k, v, mask, blocks):
    qs, kf, vf, _ = _prep(q, k, v)
    return _flash_forward(qs, kf, vf, mask, blocks)  # float32 out, lse


_flash = jax.custom_vjp(lambda q, k, v, mask, blocks: _flash_impl(q, k, v, mask, blocks)[0].astype(v.dtype),
                        nondiff_argnums=(4,))


def _flash_fwd(q, k, v, mask, blocks):
    out, lse = _flash_impl(q, k, v, mask, blocks)
    # the float32 output is kept for Delta = rowsum(dO * O): a bf16-rounded O would put its 2**-8
    # rounding into every dS (it costs B*H*Lq*Dv floats, a fraction of q, k and v's own size)
    return out.astype(v.dtype), (q, k, v, mask, out, lse)


def _flash_bwd(blocks, res, dout):
    q, k, v, mask, out, lse = res
    qs, kf, vf, scale = _prep(q, k, v)
    dq, dk, dv = _flash_backward(qs, kf, vf, mask, out, lse, dout.astype(_F32), blocks)
    return (dq * scale).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)
