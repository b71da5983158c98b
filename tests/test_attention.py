"""Attention kernels vs torch.nn.functional.scaled_dot_product_attention (values and gradients).

Error bound (``_bounds``). Both sides compute the same exact function of the same float32 inputs
in float32, each with its own summation order (blocked online softmax here, torch's kernels
there), so they never agree bit for bit. Each element of the difference is checked against a bound
that follows from float32 rounding, evaluated in float64 on the test's data, not read off one
machine's output:

* every rounding is an error of at most u = 2**-24 times the rounded value (exp and log: 4 ulp);
  a partial sum of an n-term sum, in whatever order a kernel adds, is at most the sum of |terms|;
* the errors are treated as independent (the standard probabilistic model of rounding, Higham &
  Mary, SIAM J. Sci. Comput. 41 (2019)) and propagated to first order through the formula:
  scores s = q.k/sqrt(D) (D + 1 roundings), exp(s - m) (absolute error of the argument = relative
  error of p), the sums l and acc over Lk keys and their online rescalings, the division; then
  P = exp(s - lse), dP = dO V^T, Delta = rowsum(dO * O), dS = P (dP - Delta) and the three
  gradient matmuls (Lk or Lq terms). Errors that a whole row shares (its lse, Delta) enter once,
  with their summed coefficient;
* by Hoeffding's inequality the error exceeds LAMBDA * sqrt(sum of squared per-rounding bounds)
  with probability at most 2 exp(-LAMBDA**2 / 2) = 2.5e-14 for LAMBDA = 8; the two implementations
  round independently: sqrt(2) times that.

The dominant term is the summation over Lk keys: ~ sqrt(Lk) * u * sum_j p_j |v_j|, i.e. the
"sqrt(Lk) * 2**-24 * few" of a different summation order. The bound is elementwise and relative
to the magnitudes the rounding acts on rather than to max|ref| (softmax averages over many keys,
so |O| is often far below P|V|); for the shapes here it is 1e-5..5e-4 of max|ref| (asserted, so it
cannot silently grow vacuous) and the measured errors are 1-6% of it.
``test_bound_has_teeth`` shows that rounding the softmax weights to bf16, or a 2**-12 relative
bias in the scores, fails it by 10-200x.

bf16 inputs: both sides get the same bf16-rounded q, k, v, dO (torch upcast to float32), so the
only extra error allowed is the final rounding of our float32 result to bf16, 2**-8 * |value|
(round to nearest). This checks that statistics and accumulation are float32: bf16 accumulation
over Lk keys would err by ~sqrt(Lk) * 2**-8 of P|V|.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dreambooth_jax.models import attention as A

LAMBDA = 8.0
U = 2.0 ** -24  # float32 unit roundoff
EXP_ULP = 4.0  # float32 exp / log error in ulp (numpy SIMD, torch Sleef/MKL, XLA: all below this)
BF16_U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits)


def _bounds(q, k, v, g, mask, rows: int = 512, lowp: float = 0.0):
    """Elementwise error bounds (float64) on O, dQ, dK, dV for inputs (N, L, D) float32 numpy.

    Every rounding r of either implementation is an independent error |e_r| <= c_r, where c_r
    is u times the magnitude of the rounded value (4 ulp = 8u relative for exp and log) and
    partial sums of an n-term sum are bounded by the sum of |terms| (true in every summation
    order). Linearised, an output's error is sum_r e_r * d(output)/d(r), so by Hoeffding's
    inequality |error| <= LAMBDA * sqrt(sum_r (c_r * |d output / d r|)**2) except with probability
    2 * exp(-LAMBDA**2 / 2) (< 3e-14 for LAMBDA = 8). Below, ``c2_*`` are those sums of squares for
    intermediate quantities, propagated to the outputs; a rounding that every element of a row
    shares (the row's log-sum-exp, Delta) enters as one variable with its summed coefficient.
    The two implementations' roundings are independent: their difference gets sqrt(2) times it.

    ``lowp``: unit roundoff of low-precision matmul operands in a fused kernel (cuDNN's bf16 flash
    attention rounds P before P V and P^T dO, dS before dS K and dS^T Q, and computes Delta from
    the bf16 output): those roundings are added the same way.
    """
    q, k, v, g = (np.asarray(t, np.float64) for t in (q, k, v, g))
    n, lq, d = q.shape
    lk, dv = k.shape[1], v.shape[2]
    u2 = U * U
    e2 = (2 * EXP_ULP * U) ** 2
    scale = d ** -0.5
    kt, vt = k.transpose(0, 2, 1), v.transpose(0, 2, 1)
    aq, ak, av, ag = (np.abs(t) for t in (q, k, v, g))
    c2 = {"o": np.zeros((n, lq, dv)), "dq": np.zeros((n, lq, d)), "dk": np.zeros((n, lk, d)),
          "dv": np.zeros((n, lk, dv))}
    dk_abs, dv_abs, dk, dvv = (np.zeros((n, lk, d)), np.zeros((n, lk, dv)), np.zeros((n, lk, d)),
                               np.zeros((n, lk, dv)))
    for r0 in range(0, lq, rows):
        r = slice(r0, min(lq, r0 + rows))
        qr, gr, aqr, agr = q[:, r], g[:, r], aq[:, r], ag[:, r]
        s = qr @ kt * scale
        on = np.ones_like(s, bool) if mask is None else np.broadcast_to(mask[:, r], s.shape)
        s = np.where(on, s, -np.inf)
        m = s.max(-1, keepdims=True)
        ex = np.exp(s - m)
        lsum = ex.sum(-1, keepdims=True)
        p = ex / lsum
        lse = m + np.log(lsum)
        sm = np.where(on, s - m, 0)
        a_qk = aqr @ ak.transpose(0, 2, 1) * scale
        # forward: relative error of exp(s - m): score dot (d terms + scale), subtraction, exp
        cr2 = np.where(on, (d + 1) * u2 * a_qk ** 2 + u2 * sm ** 2 + e2, 0)
        o = p @ v
        pv = p @ av
        w2 = p * p * cr2
        c2_o = (w2 @ (v * v) - 2 * o * (w2 @ v) + o * o * w2.sum(-1, keepdims=True)  # sum_j w^2 (v_j - o)^2 cr2
                + 2 * lk * u2 * (o * o + pv * pv)  # sums l and acc, and their online rescalings (nk <= Lk)
                + u2 * o * o)  # the division
        c_o = np.sqrt(c2_o)
        c2["o"][:, r] = c2_o
        # backward: P = exp(s - lse) with lse's error eps (one per row), dP = dO V^T, Delta, dS = P (dP - Delta)
        c2_lse = 2 * lk * u2 + u2 * lse ** 2 + e2 * np.log(lsum) ** 2
        crb2 = np.where(on, (d + 1) * u2 * a_qk ** 2 + u2 * np.where(on, s - lse, 0) ** 2 + e2, 0)
        dp = gr @ vt
        c2_dp = (dv + 1) * u2 * (agr @ av.transpose(0, 2, 1)) ** 2
        delta = (gr * o).sum(-1, keepdims=True)
        c_delta = np.sqrt((dv + 1) * u2) * (agr * np.abs(o)).sum(-1, keepdims=True) + (agr * c_o).sum(-1, keepdims=True)
        x = dp - delta
        ds = p * x
        c2_ds = p * p * (x * x * crb2 + c2_dp + u2 * x * x) + u2 * ds * ds  # independent per element
        dq = scale * (ds @ k)
        c2["dq"][:, r] = (scale ** 2 * (c2_ds @ (k * k)) + c2_lse * dq * dq + (c_delta * scale * np.abs(p @ k)) ** 2
                          + lk * u2 * (scale * (np.abs(ds) @ ak)) ** 2 + 4 * u2 * dq * dq)
        c2["dk"] += scale ** 2 * ((c2_ds + (p * x) ** 2 * c2_lse + p * p * c_delta ** 2).transpose(0, 2, 1) @ (qr * qr))
        dk_abs += scale * np.abs(ds).transpose(0, 2, 1) @ aqr
        dk += scale * ds.transpose(0, 2, 1) @ qr
        c2["dv"] += (p * p * (crb2 + c2_lse)).transpose(0, 2, 1) @ (gr * gr)
        if lowp:
            lp2 = lowp * lowp
            c_delta_lp = lowp * (agr * np.abs(o)).sum(-1, keepdims=True)
            c2["o"][:, r] += lp2 * ((p * p) @ (v * v))
            c2["dv"] += lp2 * ((p * p).transpose(0, 2, 1) @ (gr * gr))
            c2["dq"][:, r] += scale ** 2 * (lp2 * ((ds * ds) @ (k * k)) + (c_delta_lp * np.abs(p @ k)) ** 2)
            c2["dk"] += scale ** 2 * ((lp2 * ds * ds + p * p * c_delta_lp ** 2).transpose(0, 2, 1) @ (qr * qr))
        dv_abs += p.transpose(0, 2, 1) @ agr
        dvv += p.transpose(0, 2, 1) @ gr
    c2["dk"] += lq * u2 * dk_abs ** 2 + 4 * u2 * dk * dk
    c2["dv"] += lq * u2 * dv_abs ** 2 + u2 * dvv * dvv
    return {key: LAMBDA * math.sqrt(2) * np.sqrt(x) for key, x in c2.items()}


def _torch_ref(q, k, v, g, mask):
    """torch SDPA in float32 on (B, H, L, D) arrays: O, dQ, dK, dV as numpy."""
    tq, tk, tv = (torch.tensor(np.asarray(t, np.float32), requires_grad=True) for t in (q, k, v))
    tm = None if mask is None else torch.tensor(np.asarray(mask))
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tm)
    o.backward(torch.tensor(np.asarray(g, np.float32)))
    return {"o": o.detach().numpy(), "dq": tq.grad.numpy(), "dk": tk.grad.numpy(), "dv": tv.grad.numpy()}


def _inputs(b, h, lq, lk, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    mk = lambda l: rng.standard_normal((b, h, l, d)).astype(np.float32)
    q, k, v, g = mk(lq), mk(lk), mk(lk), mk(lq)
    q *= 1.5  # a less flat softmax: wider exp arguments
    if dtype != np.float32:  # the same rounded values on both sides
        q, k, v, g = (np.asarray(jnp.asarray(t, dtype).astype(jnp.float32)) for t in (q, k, v, g))
    return q, k, v, g


def _ours(fn, q, k, v, g, dtype=jnp.float32):
    """fn on (B, H, L, D) jax arrays -> (B, H, L, D); returns O, dQ, dK, dV as float32 numpy."""
    args = [jnp.asarray(t, dtype) for t in (q, k, v)]
    o, vjp = jax.vjp(fn, *args)
    assert o.dtype == dtype
    grads = vjp(jnp.asarray(g, dtype))
    for t, x in zip(grads, args):
        assert t.dtype == x.dtype
    return {key: np.asarray(t, np.float32) for key, t in zip(("o", "dq", "dk", "dv"), (o, *grads))}


def _ref_and_bound(q, k, v, g, mask, lowp: float = 0.0):
    """torch's values and gradients, and the elementwise bound, for (B, H, L, D) inputs."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    ref = _torch_ref(q, k, v, g, mask)
    fm = None if mask is None else np.broadcast_to(mask, (b, h, lq, lk)).reshape(b * h, lq, lk)
    bound = _bounds(*(t.reshape(b * h, -1, t.shape[-1]) for t in (q, k, v, g)), fm, lowp=lowp)
    return ref, {key: x.reshape(ref[key].shape) for key, x in bound.items()}


def _check(ours, ref, bound, extra_rel: float = 0.0, meaningful: float = 1e-3):
    for key in ("o", "dq", "dk", "dv"):
        scale = np.abs(ref[key]).max()
        allowed = bound[key] + extra_rel * (np.abs(ref[key]) + bound[key]) + 1e-30
        err = np.abs(ours[key].astype(np.float64) - ref[key])
        worst = float((err / allowed).max())
        assert worst <= 1.0, (f"{key}: max |ours - torch| {err.max():.3g} exceeds its float32 bound "
                              f"(worst element at {worst:.3g}x the bound; max|ref| {scale:.3g})")
        # the bound must stay meaningful: far below the values themselves
        assert bound[key].max() <= meaningful * scale, f"{key}: bound {bound[key].max():.3g} vs max|ref| {scale:.3g}"


def _via_attention(impl, mask=None):
    """Our public entry point, in the (B, H, L, D) layout of the references."""
    def fn(q, k, v):
        t = lambda x: x.transpose(0, 2, 1, 3)
        return t(A.attention(t(q), t(k), t(v), impl=impl, mask=mask))
    return fn


def _causal(lq, lk):
    return np.tril(np.ones((lq, lk), bool))[None, None]


CASES = [  # (B, H, Lq, Lk, D, mask)
    (2, 2, 77, 77, 64, "causal"),  # CLIP text encoder
    (2, 3, 100, 100, 8, None),
    (1, 2, 100, 77, 40, None),  # cross-attention, odd Lq
    (1, 2, 256, 77, 64, None),
    (1, 2, 1024, 1024, 8, None),  # the small config's top UNet level (2 of its 8 heads)
    (1, 2, 300, 300, 40, "causal"),
]


def _parity_params():
    """Every case on the flash path; the matmul and xla paths on the short cases only (their long
    cases hold the whole score matrix and add nothing the short ones do not check); auto, which is
    one of the other paths, on one short (matmul) and one long (flash) case."""
    for case in CASES:
        cid = "x".join(str(x) for x in case[:5]) + (f"-{case[5]}" if case[5] else "")
        impls = ["flash"] + (["matmul", "xla"] if case[2] * case[3] <= 100 * 100 else [])
        impls += ["auto"] if case in (CASES[0], CASES[4]) else []
        for impl in impls:
            yield pytest.param(impl, case, id=f"{cid}-{impl}")


@pytest.mark.parametrize("impl,case", list(_parity_params()))
def test_fp32_parity(impl, case):
    b, h, lq, lk, d, masked = case
    mask = _causal(lq, lk) if masked else None
    q, k, v, g = _inputs(b, h, lq, lk, d)
    ref, bound = _ref_and_bound(q, k, v, g, mask)
    _check(_ours(_via_attention(impl, mask), q, k, v, g), ref, bound)


SCHEDULES = [A.FlashBlocks("k", 32, "k", 32), A.FlashBlocks("q", 32, "q", 48), A.FlashBlocks("k", 48, "q", 32)]
# (all with remainder blocks: 100 queries, 90 keys; single blocks are covered by the cross-attention cases)


@pytest.mark.parametrize("blocks", SCHEDULES, ids=lambda s: f"{s.fwd}{s.fwd_block}-{s.bwd}{s.bwd_block}")
@pytest.mark.parametrize("mask_kind", [None, "causal", "per-batch-keys", "per-head"])
def test_flash_schedules_and_masks(blocks, mask_kind):
    """Every block schedule, with remainders, against torch; masks sliced along either axis or broadcast."""
    b, h, lq, lk, d = 2, 3, 100, 90, 8
    q, k, v, g = _inputs(b, h, lq, lk, d, seed=1)
    rng = np.random.default_rng(2)
    mask = {None: None, "causal": _causal(lq, lk),
            "per-batch-keys": rng.random((b, 1, 1, lk)) < 0.7,  # key padding: broadcast over heads and queries
            "per-head": rng.random((1, h, lq, lk)) < 0.5}[mask_kind]
    if mask is not None and mask_kind != "causal":
        mask[..., 0] = True  # no fully masked row (torch gives NaN there)
    ref, bound = _ref_and_bound(q, k, v, g, mask)
    jm = None if mask is None else jnp.asarray(mask)
    _check(_ours(lambda q, k, v: A._flash(q, k, v, jm, blocks), q, k, v, g), ref, bound)


@pytest.mark.parametrize("case", [(1, 2, 256, 77, 40, None), (1, 2, 300, 300, 64, "causal"),
                                  (1, 2, 1024, 1024, 8, None)], ids=["cross", "causal", "self1024"])
def test_bf16_inputs_float32_statistics(case):
    b, h, lq, lk, d, masked = case
    mask = _causal(lq, lk) if masked else None
    q, k, v, g = _inputs(b, h, lq, lk, d, seed=3, dtype=jnp.bfloat16)
    ref, bound = _ref_and_bound(q, k, v, g, mask)
    _check(_ours(_via_attention("flash", mask), q, k, v, g, jnp.bfloat16), ref, bound, extra_rel=BF16_U)


@pytest.mark.parametrize("b,h,lq,d", [(1, 2, 4096, 40)])
def test_flash_long_sequence(b, h, lq, d):
    """SD1.5 at 512 px, two of its eight heads (the bound's float64 work grows with H; with a single
    head torch's CPU backward takes seconds)."""
    q, k, v, g = _inputs(b, h, lq, lq, d, seed=4)
    ref, bound = _ref_and_bound(q, k, v, g, None)
    _check(_ours(_via_attention("flash"), q, k, v, g), ref, bound)


def test_chunked_path():
    """The chunked path (1024-query blocks); it falls back to the matmul path otherwise."""
    b, h, l, d = 1, 2, 2048, 8
    q, k, v, g = _inputs(b, h, l, 100, d, seed=5)
    ref, bound = _ref_and_bound(q, k, v, g, None)
    _check(_ours(_via_attention("chunked"), q, k, v, g), ref, bound)


def test_bound_has_teeth():
    """Negative control: softmax weights rounded to bf16, or a 2**-12 relative score bias, fail."""
    b, h, l, d = 2, 3, 100, 8
    q, k, v, g = _inputs(b, h, l, l, d)
    ref, bound = _ref_and_bound(q, k, v, g, None)

    def bf16_weights(q, k, v):
        s = jnp.matmul(q, k.swapaxes(-1, -2)) * d ** -0.5
        return jax.nn.softmax(s, -1).astype(jnp.bfloat16).astype(jnp.float32) @ v

    def biased_scores(q, k, v):
        s = jnp.matmul(q, k.swapaxes(-1, -2)) * d ** -0.5
        return jax.nn.softmax(s + jnp.abs(s) * 2.0 ** -12, -1) @ v

    for fn in (bf16_weights, biased_scores):
        ours = _ours(fn, q, k, v, g)
        for key in ("o", "dq", "dk", "dv"):
            assert (np.abs(ours[key] - ref[key]) / bound[key]).max() > 5, (fn.__name__, key)
    # ... and the bound's low-precision-operand terms (used for cuDNN) do cover bf16 weights
    _, lowp_bound = _ref_and_bound(q, k, v, g, None, lowp=BF16_U)
    ours = _ours(bf16_weights, q, k, v, g)
    for key in ("o", "dv"):
        assert (np.abs(ours[key] - ref[key]) / lowp_bound[key]).max() <= 1, key


def _fwd_bwd_temp_bytes(impl, shape):
    q = jax.ShapeDtypeStruct(shape, jnp.float32)

    def loss(q, k, v):
        return jnp.sum(A.attention(q, k, v, impl=impl) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_flash_never_holds_the_score_matrix():
    """fwd+bwd at SD1.5 512 px (B=1, H=8, L=4096, D=40): one (Lq, Lk) score matrix is 512 MiB."""
    shape = (1, 4096, 8, 40)
    score_matrix = 4096 * 4096 * 8 * 4
    flash = _fwd_bwd_temp_bytes("flash", shape)
    matmul = _fwd_bwd_temp_bytes("matmul", shape)
    print(f"temp bytes fwd+bwd: flash {flash / 2**20:.1f} MiB, matmul {matmul / 2**20:.1f} MiB, "
          f"score matrix {score_matrix / 2**20:.0f} MiB")
    assert flash < score_matrix / 4
    assert matmul > score_matrix


# ------------------------------------------------------------------------------------------
# kernel choice


def test_attention_plan_routes():
    plan = A.attention_plan
    # CPU: tiny score matrices -> matmul; long sequences, cross-attention -> flash
    assert plan((2, 16, 8, 40), (2, 16, 8, 40), jnp.float32, "cpu")[0] == "matmul"
    assert plan((1, 4096, 8, 40), (1, 4096, 8, 40), jnp.float32, "cpu")[0] == "flash"
    assert plan((4, 1024, 8, 8), (4, 77, 8, 8), jnp.float32, "cpu")[0] == "flash"
    # GPU: cuDNN for bf16/fp16 without mask and a supported head dim, else ours / XLA
    assert plan((1, 4096, 8, 40), (1, 4096, 8, 40), jnp.bfloat16, "gpu")[0] == "cudnn"
    assert plan((1, 4096, 8, 40), (1, 4096, 8, 40), jnp.float32, "gpu")[0] == "xla"
    assert plan((1, 4096, 8, 40), (1, 4096, 8, 40), jnp.bfloat16, "gpu", mask=(1, 1, 4096, 4096))[0] == "xla"
    assert plan((1, 4096, 1, 512), (1, 4096, 1, 512), jnp.bfloat16, "gpu")[0] == "xla"  # head dim 512
    assert plan((2, 77, 12, 64), (2, 77, 12, 64), jnp.float32, "gpu")[0] == "xla"
    assert plan((4, 9216, 10, 64), (4, 9216, 10, 64), jnp.float32, "gpu")[0] == "flash"  # 12.7 GiB of scores
    # TPU: Pallas kernel for long aligned unmasked sequences, XLA otherwise
    assert plan((1, 4096, 8, 40), (1, 4096, 8, 40), jnp.bfloat16, "tpu")[0] == "pallas_tpu"
    assert plan((1, 4096, 8, 40), (1, 77, 8, 40), jnp.bfloat16, "tpu")[0] == "xla"
    for args in [((1, 4096, 8, 40), (1, 4096, 8, 40), jnp.float32, "cpu")]:
        impl, reason = plan(*args)
        assert isinstance(reason, str) and reason


def test_auto_logs_its_choice_once_per_shape(caplog):
    A._logged.clear()
    q = jnp.zeros((1, 300, 2, 8))
    with caplog.at_level(logging.INFO, logger="dreambooth_jax.attention"):
        for _ in range(3):
            A.attention(q, q, q)
        A.attention(q[:, :20], q[:, :20], q[:, :20])
    lines = [r.getMessage() for r in caplog.records if r.name == "dreambooth_jax.attention"]
    assert len(lines) == 2, lines
    for line, shape in zip(lines, [(1, 300, 2, 8), (1, 20, 2, 8)]):
        impl, reason = A.attention_plan(shape, shape, jnp.float32, jax.default_backend())
        assert f": {impl} ({reason})" in line
    if jax.default_backend() == "cpu":
        assert "flash" in lines[0] and "matmul" in lines[1]


def test_impls_are_valid_config_values():
    assert {"auto", "matmul", "chunked", "xla", "flash"} <= set(A.IMPLS)
    with pytest.raises(ValueError, match="unknown attention impl"):
        A.attention(jnp.zeros((1, 4, 1, 8)), jnp.zeros((1, 4, 1, 8)), jnp.zeros((1, 4, 1, 8)), impl="cudnn")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the fallback where cuDNN is absent")
def test_accelerator_paths_fall_back_on_cpu(monkeypatch):
    """cuDNN and the Pallas TPU kernel cannot run here: the plan's choice must fall back cleanly."""
    q = jax.random.normal(jax.random.key(0), (1, 256, 2, 64), jnp.bfloat16)
    want = A.attention(q, q, q, impl="xla")  # where cuDNN refuses: XLA (the flash path above 2 GiB of scores)
    assert A._try_cudnn(q, q, q) is None  # refused at trace time (no cuDNN on CPU)
    monkeypatch.setattr(A, "attention_plan", lambda *a, **k: ("cudnn", "test"))
    np.testing.assert_array_equal(np.asarray(A.attention(q, q, q), np.float32), np.asarray(want, np.float32))


def test_pallas_tpu_call_traces():
    """The Pallas TPU flash-attention call is well-formed (traced, not run: no TPU here), on one
    device and per shard under a mesh of all devices (scale_report --target tpu-v5e compiles it)."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.flash_attention")
    from jax.sharding import Mesh

    n = jax.device_count()
    for devices, batch in ((jax.devices()[:1], 1), (jax.devices(), n)):
        q = jax.ShapeDtypeStruct((batch, 1024, 2, 40), jnp.bfloat16)
        with jax.set_mesh(Mesh(np.asarray(devices), ("data",))):
            out = jax.eval_shape(A._try_tpu_flash, q, q, q)
        assert out is not None and out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU with cuDNN")
@pytest.mark.parametrize("case", [(1, 4, 1024, 1024, 64), (2, 8, 4096, 77, 40)], ids=["self", "cross"])
def test_cudnn_on_gpu(case):
    """auto on a GPU with bf16 inputs runs cuDNN's fused kernel, within the bound for its bf16 P and dS."""
    b, h, lq, lk, d = case
    assert A.attention_plan((b, lq, h, d), (b, lk, h, d), jnp.bfloat16, "gpu")[0] == "cudnn"
    q, k, v, g = _inputs(b, h, lq, lk, d, seed=6, dtype=jnp.bfloat16)
    fn = _via_attention("auto")
    hlo = jax.jit(fn).lower(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v))).compile().as_text()
    assert "cudnn" in hlo.lower()
    ref, bound = _ref_and_bound(q, k, v, g, None, lowp=BF16_U)
    # bf16 P: one dominant key already gives LAMBDA * sqrt(2) * 2**-8 = 4.4% of |v|; Delta from the bf16
    # output (summed linearly over D) puts dQ's bound at up to ~17% of max|dQ| with 77 keys
    _check(_ours(fn, q, k, v, g, jnp.bfloat16), ref, bound, extra_rel=BF16_U, meaningful=0.25)


def test_per_shard_runs_an_unpartitionable_kernel_on_each_devices_slice():
    """Pallas kernels (TPU flash attention) cannot be partitioned by XLA: under a mesh they run in
    shard_map on each device's batch slice; here a plain kernel stands in and must give the same
    result as one call on the whole batch, up to float32 rounding (XLA may block a batch-2 matmul
    differently from a batch-8 one: a few ulp of the O(1) outputs)."""
    import numpy as np
    from jax.sharding import Mesh

    from dreambooth_jax.models.attention import current_backend, per_shard, target_backend

    if jax.device_count() < 4:
        pytest.skip("needs several simulated devices, as make test sets")  # justified: a run without XLA_FLAGS
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(8, 64, 2, 16)), jnp.float32) for _ in range(3))
    kernel = lambda a, b, c: A.attention(a, b, c, impl="matmul")  # noqa: E731
    want = kernel(q, k, v)
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda a, b, c: per_shard(kernel, a, b, c))(q, k, v)
        assert jax.jit(lambda a, b, c: per_shard(kernel, a, b, c) is None)(q[:3], k[:3], v[:3])  # 3 over 4 devices
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=16 * 2.0 ** -23)
    # several devices, no mesh in context: the inputs' sharding is unknown while tracing -> None (XLA fallback)
    assert per_shard(kernel, q, k, v) is None
    with target_backend("tpu"):
        assert current_backend() == "tpu"
    assert current_backend() == jax.default_backend()
