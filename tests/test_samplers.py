"""Whole-trajectory parity of our jitted samplers against diffusers' PyTorch schedulers.

A deterministic stand-in model (the same formula in torch and jnp) replaces the UNet; both sides
start from the same latents, and the ancestral noise our step draws for step i is fed to the
diffusers scheduler through its module's ``randn_tensor``.

Every float comparison with diffusers uses a bound derived from float32 arithmetic
(tests/numerics.py), never a tolerance read off one machine: integer timesteps must be equal;
Euler's float timesteps, init_noise_sigma and the sigmas come from a Twin evaluation of the
host-side formulas; the final sample from a first-order error analysis of the whole loop.
"""

from __future__ import annotations

import math
from typing import Sequence

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete

from dreambooth_jax.diffusion import samplers, schedules
from dreambooth_jax.errors import ConfigError
from numerics import CR, SQRT_ULP, F, Twin, assert_ints_from, assert_within, torch_linspace32, trajectory_bound, ulp32

SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SD21 = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}
SAMPLE = {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "sample", "clip_sample": True,
          "clip_sample_range": 1.5}
ZSNR = {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
COSINE = {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2", "clip_sample": True}
X4_LOW_RES = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
              "num_train_timesteps": 1000, "variance_type": "fixed_small", "clip_sample": False}

REFERENCE = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
             "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler,
             "euler_a": diffusers.EulerAncestralDiscreteScheduler}
NOISE_MODULE = {"ddpm": scheduling_ddpm, "ddim": scheduling_ddim, "euler_a": scheduling_euler_ancestral_discrete}
SHAPE = (2, 8, 8, 4)

# (id, sampler, config, steps, eta, options)
CASES = [
    ("ddim-sd15-10", "ddim", SD15, 10, 0.0, {}),
    ("ddim-v-25", "ddim", SD21, 25, 0.0, {}),
    ("ddim-eta0.7-25", "ddim", SD15, 25, 0.7, {}),
    ("ddim-v-trailing-eta1", "ddim", SD21, 10, 1.0, {"timestep_spacing": "trailing"}),
    ("ddim-sample-clip-linspace-alpha1", "ddim", SAMPLE, 10, 0.5,
     {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
    ("ddim-zero-snr", "ddim", ZSNR, 10, 0.0, {}),
    ("ddim-cosine-clip", "ddim", COSINE, 10, 0.0, {}),
    ("ddpm-fixed_small-10", "ddpm", SD15, 10, 0.0, {}),
    ("ddpm-v-small_log-trailing-25", "ddpm", SD21, 25, 0.0,
     {"variance_type": "fixed_small_log", "timestep_spacing": "trailing"}),
    ("ddpm-sample-fixed_large-linspace", "ddpm", SAMPLE, 10, 0.0,
     {"variance_type": "fixed_large", "timestep_spacing": "linspace"}),
    ("ddpm-x4-low-res-1000", "ddpm", X4_LOW_RES, 1000, 0.0, {}),
    ("ddpm-zero-snr", "ddpm", ZSNR, 10, 0.0, {}),
    ("ddpm-variance-null", "ddpm", {**SD15, "_class_name": "DPMSolverMultistepScheduler", "variance_type": None},
     10, 0.0, {}),
    ("dpmpp_2m-sd15-10", "dpmpp_2m", SD15, 10, 0.0, {}),
    ("dpmpp_2m-v-karras-25", "dpmpp_2m", SD21, 25, 0.0, {"use_karras_sigmas": True}),
    ("dpmpp_2m-sample-leading-25", "dpmpp_2m", SAMPLE, 25, 0.0, {"timestep_spacing": "leading"}),
    ("dpmpp_2m-trailing-karras-10", "dpmpp_2m", SD15, 10, 0.0,
     {"timestep_spacing": "trailing", "use_karras_sigmas": True}),
    ("dpmpp_2m-sigma_min-20", "dpmpp_2m", SD15, 20, 0.0, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m-sigma_min-10", "dpmpp_2m", SD15, 10, 0.0, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m-cosine-karras", "dpmpp_2m", COSINE, 10, 0.0, {"use_karras_sigmas": True}),
    ("dpmpp_2m-cosine-lambda-clip", "dpmpp_2m", COSINE, 10, 0.0, {"lambda_min_clipped": -5.1}),
    ("dpmpp_2m-zero-snr", "dpmpp_2m", ZSNR, 10, 0.0, {}),
    ("dpmpp_2m-exponential", "dpmpp_2m", SD15, 10, 0.0, {"use_exponential_sigmas": True}),
    ("euler-sd15-10", "euler", SD15, 10, 0.0, {}),
    ("euler-v-karras-25", "euler", SD21, 25, 0.0, {"use_karras_sigmas": True}),
    ("euler-sample-leading", "euler", SAMPLE, 10, 0.0, {"timestep_spacing": "leading"}),
    ("euler-v-trailing", "euler", SD21, 10, 0.0, {"timestep_spacing": "trailing"}),
    ("euler-zero-snr", "euler", ZSNR, 10, 0.0, {}),
    ("euler-log-linear", "euler", SD15, 10, 0.0, {"interpolation_type": "log_linear"}),
    ("euler-v-continuous", "euler", SD21, 10, 0.0, {"timestep_type": "continuous"}),
    ("euler-karras-pinned", "euler", SD15, 10, 0.0, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler_a-sd15-10", "euler_a", SD15, 10, 0.0, {}),
    ("euler_a-v-leading-25", "euler_a", SD21, 25, 0.0, {"timestep_spacing": "leading"}),
    ("euler_a-v-trailing", "euler_a", SD21, 10, 0.0, {"timestep_spacing": "trailing"}),
    ("euler_a-zero-snr", "euler_a", ZSNR, 10, 0.0, {}),
]


def torch_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * x * torch.cos(t / 300) + 0.05 * torch.sin(x)


def jax_model(x: jax.Array, t: jax.Array) -> jax.Array:
    return 0.1 * x * jnp.cos(t / 300) + 0.05 * jnp.sin(x)


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def run_case(name: str, config: dict, steps: int, eta: float, options: dict) -> dict:
    """Both trajectories; returns our and diffusers' final samples (NHWC) plus the sampler."""
    sampler = samplers.make_sampler(name, schedules.schedule_from_config(config), steps, **options)
    fixed = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"} \
        if name == "dpmpp_2m" else {}
    ref = REFERENCE[name].from_config(config, **fixed, **options)
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        # diffusers finds its first step by looking the timestep up; with repeated timesteps
        # (cosine + karras) it starts one late. We always start at step 0.
        ref.set_begin_index(0)
    latents = np.asarray(jax.random.normal(jax.random.key(1), SHAPE))
    key = jax.random.key(7)
    x = _nchw(latents) * ref.init_noise_sigma
    current = {}
    with pytest.MonkeyPatch.context() as patch:
        if name in NOISE_MODULE:
            def fake_randn(shape, **kwargs):
                assert tuple(shape) == tuple(current["noise"].shape)
                return current["noise"]
            patch.setattr(NOISE_MODULE[name], "randn_tensor", fake_randn)
        for i, t in enumerate(ref.timesteps):
            current["noise"] = _nchw(samplers.ancestral_noise(key, i, SHAPE))
            out = torch_model(ref.scale_model_input(x, t), t)
            x = ref.step(out, t, x, **({"eta": eta} if name == "ddim" else {})).prev_sample
    run = jax.jit(lambda lat, k, e: samplers.sample_loop(sampler, jax_model, lat * sampler.init_noise_sigma, k, eta=e))
    ours = np.asarray(run(jnp.asarray(latents), key, jnp.float32(eta)))
    return {"ours": ours, "ref": x.numpy().transpose(0, 2, 3, 1), "sampler": sampler, "scheduler": ref}


# --------------------------------------------------------------------------------------------
# The float32 bounds (tests/numerics.py). Host side: alphas_cumprod -> sigma table -> sigmas and
# timesteps as Twins (both sides within v +- d). Device side: the step formula of each diffusers
# scheduler written once with F values, analysed to first order along the trajectory.


def _ac_twin(name: str, config: dict, ref) -> Twin:
    """The alphas_cumprod each side's sampler reads: ours and diffusers' (sigma samplers on a zero-SNR
    schedule replace the final 0 by 2**-24, both sides)."""
    ours = np.asarray(schedules.schedule_from_config(config).alphas_cumprod, np.float32).copy()
    if config.get("rescale_betas_zero_snr") and name in ("dpmpp_2m", "euler", "euler_a"):
        ours[-1] = np.float32(2.0 ** -24)
    return Twin.measured(ours, ref.alphas_cumprod.numpy())


def _sigma_table(ac: Twin) -> Twin:
    """((1 - abar) / abar) ** 0.5: correctly rounded, then torch's faithful sqrt (numpy's is exact)."""
    return ((1 - ac) / ac).sqrt(SQRT_ULP)


def _karras(hi: Twin, lo: Twin, n: int) -> Twin:
    """(hi^(1/7) + ramp (lo^(1/7) - hi^(1/7)))^7 in float64 (libm pow; ramp = np.linspace(0, 1, n),
    exact on both sides). Written as the convex combination (1 - ramp) hi' + ramp lo', the same value,
    so hi's radius is not counted twice; the float64 roundings are charged per operation either way."""
    ramp = Twin(np.linspace(0, 1, n), f64=True)
    return ((1 - ramp) * hi.pow(1 / 7) + ramp * lo.pow(1 / 7)).pow(7.0)


def _sigma_to_t(sig: Twin, log_table: Twin) -> Twin:
    """diffusers' _sigma_to_t: the fractional train timestep whose log sigma (interpolated linearly in
    the float32 log table) is log(sig), in float64. t is continuous and piecewise linear in log(sig),
    slope 1 / |L[j+1] - L[j]| on segment j, and moves by at most ((1 - w) d[j] + w d[j+1]) / |L[j+1] - L[j]|
    when the table entries move by d; near a knot the neighbouring segment may be the one used, so
    the worst of the three segments around it is taken. diffusers forms L[j] - L[j+1] in float32
    (ours in float64): <= 2**-24 relative on w, <= 2**-24 on t; plus ~10 float64 operations."""
    ls = sig.maximum(1e-10).log()
    L, dL = log_table.v, log_table.d
    n = len(L)
    low = np.clip(np.searchsorted(L, ls.v, side="right") - 1, 0, n - 2)
    a, b = L[low], L[low + 1]
    w = np.clip((a - ls.v) / (a - b), 0.0, 1.0)
    t = (1 - w) * low + w * (low + 1)
    js = np.clip(low[None, :] + np.array([-1, 0, 1])[:, None], 0, n - 2)
    gap = np.abs(L[js + 1] - L[js]) - dL[js] - dL[js + 1]
    assert np.all(gap > 0), ("a log-sigma table step is below its radius: ours and diffusers' alphas_cumprod "
                             "differ far beyond rounding (see tests/test_schedules.py)")
    slope = (1.0 / gap).max(axis=0)
    d = slope * (np.maximum(dL[js], dL[js + 1]).max(axis=0) + ls.d) + 2.0 ** -24 + 10 * 2.0 ** -50 * n
    return Twin(t, d, f64=True)


def _final_sigma(cfg, ac: Twin) -> Twin:
    if getattr(cfg, "final_sigmas_type", "zero") == "sigma_min":
        return _sigma_table(ac[:1])
    return Twin(np.zeros(1, np.float32))


def _spacing_timesteps(cfg, n: int) -> np.ndarray:
    """Euler's timesteps before any re-spacing: the same numpy expressions on both sides (exact: integers,
    or np.linspace's correctly rounded float64 operations and one conversion)."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + np.float32(cfg.steps_offset)
    return np.arange(T, 0, -T / n).round().astype(np.float32) - np.float32(1)


def _host_spec(name: str, config: dict, ref, n: int) -> dict:
    """The per-step numbers each sampler derives on the host, as Twins: ``ac``; for sigma samplers
    ``sig`` (one more than the steps); Euler's float ``ts``; DPM-Solver's fractional ``frac`` timesteps
    (with the rounding ``mode`` that makes them integers) when re-spaced; ``init`` (init_noise_sigma)."""
    cfg = ref.config
    ac = _ac_twin(name, config, ref)
    spec = {"ac": ac, "init": Twin(np.float32(1.0))}
    if name in ("ddpm", "ddim"):
        return spec
    table = _sigma_table(ac)
    log_table = table.log()  # numpy float32 log, both sides
    if name == "dpmpp_2m":
        hi, lo = table[-1].to_f64(), table[0].to_f64()
        if cfg.use_karras_sigmas or cfg.use_exponential_sigmas:
            if cfg.use_karras_sigmas:
                sig = _karras(hi, lo, n)
            else:  # np.exp(np.linspace(math.log(hi), math.log(lo), n)), float64
                step = (lo.log() - hi.log()) / (n - 1)
                sig = Twin.concat([hi.log() + Twin(np.arange(n - 1, dtype=np.float64), f64=True) * step,
                                   lo.log()]).exp()
            spec["frac"] = _sigma_to_t(sig, log_table)
            spec["mode"] = "round" if cfg.use_karras_sigmas and cfg.beta_schedule != "squaredcos_cap_v2" \
                else "trunc"
        else:  # np.interp at the integer timesteps returns the table entries themselves
            sig = table[ref.timesteps.numpy()]
        spec["sig"] = Twin.concat([sig.f32(), _final_sigma(cfg, ac)])
        if math.isfinite(cfg.lambda_min_clipped):
            # the first train step kept is found by comparing lambda = log sqrt(abar) - log sqrt(1 - abar)
            # with the threshold: the same on both sides unless the threshold is within a lambda's radius
            lam = ac.sqrt(SQRT_ULP).log() - (1 - ac).sqrt(SQRT_ULP).log()
            margin = np.abs(lam.v - cfg.lambda_min_clipped) - lam.d - ulp32(cfg.lambda_min_clipped)
            assert margin.min() > 0, "lambda_min_clipped falls within a lambda's rounding radius"
        return spec
    ts = _spacing_timesteps(cfg, n)
    t_tw = Twin(ts)
    if getattr(cfg, "interpolation_type", "linear") == "log_linear":
        # float32 torch.linspace between np.log of the end sigmas (scalars there, array elements in
        # ours: not necessarily the same log kernel), then exp
        sig = torch_linspace32(table[-1].log(), table[0].log(), n + 1).exp()
    else:
        sig = table.interp(ts)
    if getattr(cfg, "use_karras_sigmas", False):
        hi = Twin(cfg.sigma_max, f64=True) if cfg.sigma_max is not None else sig[0].to_f64()
        lo = Twin(cfg.sigma_min, f64=True) if cfg.sigma_min is not None else sig[-1].to_f64()
        sig = _karras(hi, lo, n)
        t_tw = _sigma_to_t(sig, log_table).f32()
    # the final sigma is appended in every mode (after log-linear's n + 1 sigmas too: the loop never
    # reads that last one)
    sig = Twin.concat([sig.f32(), _final_sigma(cfg, ac)])
    if getattr(cfg, "timestep_type", "discrete") == "continuous" and cfg.prediction_type == "v_prediction":
        t_tw = 0.25 * sig[:-1].log()  # torch: 0.25 * sigma.log(), 0-d tensors
    spec.update(sig=sig, ts=t_tw, init=sig.max())
    if cfg.timestep_spacing not in ("linspace", "trailing"):
        spec["init"] = (spec["init"].square() + 1).sqrt(SQRT_ULP)
    return spec


def _model(x: F, cos_t: F) -> F:
    """torch_model / jax_model on the tensor: 0.1 * x * cos(t / 300) + 0.05 * sin(x), cos(t / 300)
    being a per-step scalar (``_cos_t``)."""
    return 0.1 * x * cos_t + 0.05 * x.sin()


def _cos_t(t: Twin) -> Twin:
    return (t / 300).cos()


# Each sampler in two parts, as diffusers computes it: the per-step scalars (0-d tensors there,
# numpy float32 tables in ours: the same operations) as Twins, exact where both sides hold the same
# bits; and the tensor operations, written with F values for the first-order analysis.

def _ddpm_scalars(a_t: Twin, a_prev: Twin, variance_type: str | None) -> dict[str, Twin]:
    """DDPMScheduler.step / _get_variance: sqrt(abar_t), sqrt(1 - abar_t), the two posterior
    coefficients and the noise scale."""
    b_t, b_prev = 1 - a_t, 1 - a_prev
    cur_a = a_t / a_prev
    cur_b = 1 - cur_a
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    var = Twin.where(var.v > 1e-20, var, Twin(np.float32(1e-20)))  # torch.clamp(min=1e-20)
    std = {"fixed_small_log": lambda: (0.5 * var.log()).exp(),
           "fixed_large": lambda: (1 - a_t / a_prev).sqrt(SQRT_ULP)}.get(variance_type, lambda: var.sqrt(SQRT_ULP))()
    return {"sqrt_a": a_t.sqrt(SQRT_ULP), "sqrt_b": b_t.sqrt(SQRT_ULP),
            "c_x0": (a_prev.sqrt(SQRT_ULP) * cur_b) / b_t, "c_x": cur_a.sqrt(SQRT_ULP) * b_prev / b_t, "std": std}


def _ddim_scalars(a_t: Twin, a_prev: Twin, eta: float) -> dict[str, Twin]:
    """DDIMScheduler.step / _get_variance. Ours forms std and the direction's scale on the device,
    where XLA may fuse (1 - abar_prev) - std * std: not the same operations (``same=False``)."""
    b_t, b_prev = 1 - a_t, 1 - a_prev
    sqrt_var = ((b_prev / b_t) * (1 - a_t / a_prev)).sqrt(SQRT_ULP)
    std = sqrt_var.mul(np.float32(eta), same=False)
    direction = (1 - a_prev).sub(std.mul(std, same=False), same=False).sqrt(SQRT_ULP)
    return {"sqrt_a": a_t.sqrt(SQRT_ULP), "sqrt_b": b_t.sqrt(SQRT_ULP), "a_prev": a_prev,
            "sqrt_a_prev": a_prev.sqrt(SQRT_ULP), "sqrt_var": sqrt_var, "direction": direction, "std": std}


def _dpmpp_2m_tables(sig: Twin) -> dict[str, Twin]:
    """Per-sigma quantities of DPMSolverMultistepScheduler: alpha = 1 / sqrt(sigma^2 + 1),
    sigma_t = sigma * alpha and lambda = log alpha - log sigma_t (float32 log on each side:
    torch.log there, numpy's in ours). The final sigma 0 (lambda = inf) gets finite stand-ins: the
    step onto it is exactly x0 and does not read them."""
    alpha = 1 / (sig.square() + 1).sqrt(SQRT_ULP)
    sigma = sig * alpha
    zero = (sig.v == 0) & (sig.d == 0)
    safe = Twin.where(zero, Twin(np.ones(len(sig), np.float32)), sigma)
    lam = alpha.log() - safe.log()
    return {"alpha": alpha, "sigma": sigma, "lam": Twin.where(zero, Twin(np.zeros(len(sig), np.float32)), lam)}


def _dpmpp_2m_rows(sig: Twin, order1: Sequence[bool]) -> list[dict[str, Twin]]:
    """The per-step coefficients of the DPM-Solver++ 2M update from the per-sigma Twins, as our
    tables hold them (first-order steps: no second-order term, c_d1 = inv_r0 = 0)."""
    tab = _dpmpp_2m_tables(sig)
    alpha, sigma, lam = tab["alpha"], tab["sigma"], tab["lam"]
    zero32, rows = Twin(np.float32(0)), []
    for k, first in enumerate(order1):
        row = {"alpha_s": alpha[k], "sigma_s": sigma[k], "c_d1": zero32, "inv_r0": zero32}
        if sig.v[k + 1] == 0 and sig.d[k + 1] == 0:  # onto sigma 0: lambda = inf, exp(-h) = 0
            row.update(c_x=zero32, c_d0=Twin(np.float32(-1)))
        else:
            h = lam[k + 1] - lam[k]
            row.update(c_x=sigma[k + 1] / sigma[k], c_d0=alpha[k + 1] * ((-h).exp() - 1))
            if not first:
                row.update(c_d1=0.5 * row["c_d0"], inv_r0=1 / ((lam[k] - lam[k - 1]) / h))
        rows.append(row)
    return rows


def _euler_scalars(sig: Twin, nxt: Twin, ancestral: bool) -> dict[str, Twin]:
    """Euler(Ancestral)DiscreteScheduler: scale_model_input's sqrt(sigma^2 + 1), the v-prediction
    coefficients, and the step (ancestral: split into sigma_down and fresh noise sigma_up)."""
    s2p1 = sig.square() + 1
    out = {"sigma": sig, "in_scale": s2p1.sqrt(SQRT_ULP), "c_out": -sig / s2p1.sqrt(SQRT_ULP), "s2p1": s2p1}
    if not ancestral:
        return {**out, "dt": nxt - sig}
    up = (nxt.square() * (sig.square() - nxt.square()) / sig.square()).sqrt(SQRT_ULP)
    down = (nxt.square() - up.square()).sqrt(SQRT_ULP)
    return {**out, "dt": down - sig, "sigma_up": up}


def _x0_eps(kind: str, out: F, x: F, sqrt_a: F, sqrt_b: F) -> tuple[F, F]:
    if kind == "epsilon":
        return (x - sqrt_b * out) / sqrt_a, out
    if kind == "v_prediction":
        return sqrt_a * x - sqrt_b * out, sqrt_a * out + sqrt_b * x
    return out, (x - sqrt_a * out) / sqrt_b


def _tensor_step(name: str, kind: str, clip: float | None, eta: float):
    """One step of diffusers' scheduler (and of ours) on the tensor, elementwise. ``tab(name)``:
    this step's scalars (DPM-Solver: per-sigma tables, ``tab(name, 1)`` the next sigma's)."""
    def step(s, tab, i):
        x = s["x"]
        if name in ("ddpm", "ddim"):
            out = _model(x, tab("cos_t"))
            x0, eps = _x0_eps(kind, out, x, tab("sqrt_a"), tab("sqrt_b"))
            if clip is not None:
                x0 = x0.clip(-clip, clip)
            if name == "ddpm":
                prev = tab("c_x0") * x0 + tab("c_x") * x
                return {"x": F.where(i["on"].x > 0, prev + tab("std") * i["noise"], prev)}  # no noise at t = 0
            prev = tab("sqrt_a_prev") * x0 + tab("direction") * eps
            return {"x": prev + tab("std") * i["noise"] if eta > 0 else prev}
        if name == "dpmpp_2m":
            out = _model(x, tab("cos_t"))
            a_s, s_s = tab("alpha"), tab("sigma")
            x0 = {"epsilon": lambda: (x - s_s * out) / a_s, "v_prediction": lambda: a_s * x - s_s * out,
                  "sample": lambda: out}[kind]()
            order1, zero = i["order1"].x > 0, i["zero"].x > 0
            h = tab("lam", 1) - tab("lam")
            coef = tab("alpha", 1) * ((-h).exp() - 1.0)
            first = (tab("sigma", 1) / s_s) * x - coef * x0
            r0 = F.where(order1, 1.0, (tab("lam") - tab("lam", -1)) / h)  # h0 = 0 at step 0, branch unused
            second = first - 0.5 * coef * ((1.0 / r0) * (x0 - s["m1"]))
            # onto sigma = 0: lambda = inf, exp(-h) = 0, so x_t = 0 * x - (1 * (0 - 1)) * x0 = x0 exactly
            return {"x": F.where(zero, x0, F.where(order1, first, second)), "m1": x0}
        out = _model(x / tab("in_scale"), tab("cos_t"))
        x0 = {"epsilon": lambda: x - tab("sigma") * out,
              "v_prediction": lambda: out * tab("c_out") + x / tab("s2p1"), "sample": lambda: out}[kind]()
        prev = x + (x - x0) / tab("sigma") * tab("dt")
        return {"x": prev + i["noise"] * tab("sigma_up") if name == "euler_a" else prev}
    return step


def _dpm_order1(cfg, m: int) -> list[bool]:
    """Which DPM-Solver++ 2M steps are first order: the first, and the last under lower_order_final."""
    last_first = cfg.euler_at_final or (cfg.lower_order_final and m < 15) or cfg.final_sigmas_type == "zero"
    return [k == 0 or (k == m - 1 and last_first) for k in range(m)]


def _step_rows(name: str, ref, spec: dict, eta: float) -> list[dict[str, Twin]]:
    """Each step's scalars as Twins (DPM-Solver: the per-sigma quantities are separate tables)."""
    cfg = ref.config
    ts = ref.timesteps.numpy()
    m = len(ts)
    rows: list[dict[str, Twin]] = []
    for k in range(m):
        if name in ("ddpm", "ddim"):
            ac, t = spec["ac"], ts[k]
            prev = (ts[k + 1] if k + 1 < m else -1) if name == "ddpm" else t - cfg.num_train_timesteps // m
            if prev >= 0:
                a_prev = ac[prev]
            elif name == "ddpm" or cfg.set_alpha_to_one:
                a_prev = Twin(np.float32(1.0))
            else:
                a_prev = ac[0]
            row = _ddpm_scalars(ac[t], a_prev, cfg.variance_type) if name == "ddpm" \
                else _ddim_scalars(ac[t], a_prev, eta)
            row["cos_t"] = _cos_t(Twin(np.float32(t)))
        elif name == "dpmpp_2m":
            row = {"cos_t": _cos_t(Twin(np.float32(ts[k])))}
        else:
            row = _euler_scalars(spec["sig"][k], spec["sig"][k + 1], ancestral=name == "euler_a")
            row["cos_t"] = _cos_t(spec["ts"][k])
        rows.append(row)
    return rows


def _trajectory_spec(name: str, ref, spec: dict, rows: list[dict[str, Twin]], eta: float, latents: np.ndarray,
                     key):
    """Arguments of ``trajectory_bound`` for one case: the step, the initial state and its error,
    the per-step scalar tables (Twins: value, radius) and the exact per-step inputs, elementwise over
    the flattened NHWC latents."""
    cfg = ref.config
    ts = ref.timesteps.numpy()
    m = len(ts)
    n_el = latents.size
    init = spec["init"]
    x_init = latents.reshape(-1).astype(np.float64) * init.v
    # latents * init_noise_sigma: the radius of init_noise_sigma, and one rounding unless it is exactly 1
    err0 = np.abs(latents.reshape(-1)) * init.d + (CR * ulp32(np.abs(x_init) + init.d) if init.v != 1.0 else 0.0)
    state, state_err = {"x": x_init}, {"x": err0}
    tables = {k: (np.array([float(r[k].v) for r in rows]), np.array([float(r[k].d) for r in rows])) for k in rows[0]}
    per_step = {}
    if name == "dpmpp_2m":
        tables.update({k: (tw.v, tw.d) for k, tw in _dpmpp_2m_tables(spec["sig"]).items()})
        sig = spec["sig"]
        per_step["order1"] = np.array([[float(first)] * n_el for first in _dpm_order1(cfg, m)])
        per_step["zero"] = np.array([[float(sig.v[k + 1] == 0 and sig.d[k + 1] == 0)] * n_el for k in range(m)])
        state["m1"], state_err["m1"] = np.zeros(n_el), np.zeros(n_el)
    noise = np.stack([np.asarray(samplers.ancestral_noise(key, k, SHAPE)).reshape(-1) for k in range(m)])
    if name == "ddpm":
        per_step.update(noise=noise, on=np.repeat((ts > 0).astype(np.float64)[:, None], n_el, axis=1))
    elif (name == "ddim" and eta > 0) or name == "euler_a":
        per_step["noise"] = noise
    clip = float(cfg.clip_sample_range) if name in ("ddpm", "ddim") and cfg.clip_sample else None
    return _tensor_step(name, cfg.prediction_type, clip, eta), state, state_err, tables, per_step, m


@pytest.mark.parametrize("case_id,name,config,steps,eta,options", CASES, ids=[c[0] for c in CASES])
def test_trajectory_matches_diffusers(case_id, name, config, steps, eta, options):
    """Timesteps, init_noise_sigma, the sigmas, our per-step coefficient tables and the final sample,
    each within the float32 bound derived in tests/numerics.py: the rounding model there propagated
    through the host-side arithmetic (Twins: a few ulp per entry, more where log sigma or lambda
    differences cancel) and then through every step of the loop (first-order analysis)."""
    r = run_case(name, config, steps, eta, options)
    sampler, ref = r["sampler"], r["scheduler"]
    spec = _host_spec(name, config, ref, steps)
    ours_ts, ref_ts = np.asarray(sampler.timesteps), ref.timesteps.numpy()
    assert sampler.num_steps == len(ref_ts) == len(ours_ts)
    if "ts" in spec:  # Euler's float timesteps
        assert_within(ours_ts, spec["ts"].v, spec["ts"].d, "our timesteps")
        assert_within(ref_ts, spec["ts"].v, spec["ts"].d, "diffusers timesteps")
    elif "frac" in spec:  # DPM-Solver's re-spaced timesteps: integers made from floats
        assert_ints_from(spec["frac"], spec["mode"], ours_ts, ref_ts, "timesteps")
    else:  # integer arithmetic
        np.testing.assert_array_equal(ours_ts, ref_ts)
    init = spec["init"]
    assert_within(sampler.init_noise_sigma, init.v, init.d, "our init_noise_sigma")
    assert_within(float(ref.init_noise_sigma), init.v, init.d, "diffusers init_noise_sigma")

    if "sig" in spec:
        assert_within(ref.sigmas.numpy()[:len(spec["sig"])], spec["sig"].v, spec["sig"].d, "diffusers sigmas")
    # our per-step coefficient tables, entry by entry (diffusers computes these inside step())
    rows = _step_rows(name, ref, spec, eta)
    checked = _dpmpp_2m_rows(spec["sig"], _dpm_order1(ref.config, len(ref_ts))) if name == "dpmpp_2m" else rows
    for key_, table in sampler.tables.items():
        v = np.array([float(row[key_].v) for row in checked])
        d = np.array([float(row[key_].d) for row in checked])
        table = np.asarray(table)
        if key_ == "std" and name == "ddpm":  # ours stores 0 where diffusers adds no noise (t = 0)
            v, d = np.where(ours_ts > 0, v, 0.0), np.where(ours_ts > 0, d, 0.0)
        assert_within(table, v, d, f"our {key_} table")

    ours, expected = r["ours"], r["ref"]
    assert np.isfinite(ours).all() and np.abs(expected).max() > 1e-2  # a real trajectory, not zeros
    latents = np.asarray(jax.random.normal(jax.random.key(1), SHAPE))
    final, err = trajectory_bound(*_trajectory_spec(name, ref, spec, rows, eta, latents, jax.random.key(7)))
    bound = 2 * err  # each side within err of the exact trajectory
    assert_within(ours.reshape(-1), expected.reshape(-1), bound, "final sample, ours vs diffusers")
    # the analysed formula is diffusers': its own float32 evaluation lands within the same bound
    assert_within(final["x"], expected.reshape(-1), bound, "final sample, analysed formula vs diffusers")


def _counted_loop(name: str, config: dict, steps: int):
    sampler = samplers.make_sampler(name, schedules.schedule_from_config(config), steps)
    traces = []

    def run(latents, key, eta):
        traces.append(1)  # runs once per trace (compilation), not per call
        return samplers.sample_loop(sampler, jax_model, latents * sampler.init_noise_sigma, key, eta=eta)

    return jax.jit(run), traces


def test_eta_and_key_are_runtime_values():
    run, traces = _counted_loop("ddim", SD15, 10)
    latents = jax.random.normal(jax.random.key(0), SHAPE)
    outs = [np.asarray(run(latents, jax.random.key(k), jnp.float32(eta)))
            for eta, k in ((0.0, 1), (0.5, 1), (1.0, 1), (1.0, 2))]
    assert len(traces) == 1 and run._cache_size() == 1
    assert np.abs(outs[0] - outs[1]).max() > 1e-3 and np.abs(outs[2] - outs[3]).max() > 1e-3
    deterministic = np.asarray(run(latents, jax.random.key(5), jnp.float32(0.0)))
    np.testing.assert_array_equal(deterministic, outs[0])  # eta = 0 ignores the noise exactly
    assert len(traces) == 1


def test_raw_key_data_equals_typed_key():
    run, _ = _counted_loop("euler_a", SD15, 5)
    latents = jax.random.normal(jax.random.key(0), SHAPE)
    key = jax.random.key(3)
    typed = np.asarray(run(latents, key, jnp.float32(0)))
    raw = np.asarray(run(latents, jax.random.key_data(key), jnp.float32(0)))
    np.testing.assert_array_equal(typed, raw)


def test_step_with_explicit_noise_equals_key_draw():
    sampler = samplers.make_sampler("ddpm", schedules.schedule_from_config(SD15), 10)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    out = jax_model(x, sampler.timesteps[3])
    key = jax.random.key(9)
    step = jax.jit(lambda i, noise: sampler.step({}, i, out, x, key, noise=noise))
    drawn, _ = jax.jit(lambda i: sampler.step({}, i, out, x, key))(3)
    given, _ = step(3, samplers.ancestral_noise(key, 3, SHAPE))
    other, _ = step(3, samplers.ancestral_noise(key, 4, SHAPE))
    # same noise; only XLA's fusion (FMA or not) of the in-graph draw may differ, by an ulp
    np.testing.assert_allclose(np.asarray(drawn), np.asarray(given), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(drawn) - np.asarray(other)).max() > 1e-3


@pytest.mark.parametrize("name,config,steps,options,fragments", [
    ("heun", SD15, 10, {}, ["unknown scheduler (sampler) 'heun'", "ddpm, ddim, dpmpp_2m, euler, euler_a"]),
    ("euler_a", SAMPLE, 10, {}, ["euler_a does not support prediction_type='sample'"]),
    ("ddim", SD15, 61, {"timestep_spacing": "trailing"}, ["61 steps", "-1", "use 60 or 62 steps"]),
    ("ddim", SD15, 10, {"use_karras_sigmas": True}, ["'use_karras_sigmas' does not apply to DDIMScheduler"]),
    ("ddim", SD15, 10, {"prediction_type": "v_prediction"}, ["'prediction_type' defines the noise schedule"]),
    ("dpmpp_2m", SD15, 10, {"solver_order": 3}, ["'solver_order' is fixed by the sampler name"]),
    ("euler", SD15, 10, {"timestep_spacing": "uniform"}, ["timestep_spacing='uniform'", "'trailing'"]),
    ("ddim", SD15, 1001, {}, ["1001 steps exceed num_train_timesteps=1000"]),
    ("ddpm", SD15, 1000, {}, ["outside [0, 999]", "steps_offset"]),
    ("ddim", SD15, 0, {}, ["positive integer"]),
])
def test_make_sampler_errors(name, config, steps, options, fragments):
    with pytest.raises(ConfigError) as info:
        samplers.make_sampler(name, schedules.schedule_from_config(config), steps, **options)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_config_settings_reach_the_sampler():
    """A checkpoint's own settings are used unless an option overrides them."""
    karras = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    sched = schedules.schedule_from_config(karras)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(karras)
    ref.set_timesteps(12)
    spec = _host_spec("dpmpp_2m", karras, ref, 12)  # Karras timesteps: rounded from float ones
    assert_ints_from(spec["frac"], spec["mode"], np.asarray(samplers.make_sampler("dpmpp_2m", sched, 12).timesteps),
                     ref.timesteps.numpy(), "Karras timesteps from the checkpoint's config")
    plain = samplers.make_sampler("dpmpp_2m", sched, 12, use_karras_sigmas=False)
    assert not np.array_equal(np.asarray(plain.timesteps), ref.timesteps.numpy())


def test_hand_built_config_settings_count_as_given():
    cfg = schedules.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type="v_prediction", timestep_spacing="trailing")
    sampler = samplers.make_sampler("euler", schedules.make_schedule(cfg), 10)
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           prediction_type="v_prediction", timestep_spacing="trailing")
    ref.set_timesteps(10)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), ref.timesteps.numpy())  # trailing: integers
    assert sampler.prediction_type == "v_prediction"
