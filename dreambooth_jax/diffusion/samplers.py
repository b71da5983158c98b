"""Samplers with pure, jit-friendly steps, numerically matching diffusers' schedulers.

``make_sampler`` runs on the host: it resolves the checkpoint's scheduler config for the chosen
sampler (as diffusers' ``<Scheduler>.from_config(config, **options)`` would), and precomputes every
per-step number in numpy (timesteps and float32 coefficient tables, replaying diffusers' float32
scalar arithmetic). The resulting :class:`Sampler` is a pytree of those arrays plus static info;
its ``step`` reads row ``i`` of each table, so ``i`` may be a traced loop index and the whole
denoising loop is one ``lax.fori_loop`` (:func:`sample_loop`). Runtime floats (DDIM's eta) are
traced values; the number of steps is static.

Samplers (diffusers class they reproduce):
  ddpm      DDPMScheduler (ancestral; variance_type fixed_small / fixed_small_log / fixed_large /
            learned / learned_range; clip_sample or dynamic thresholding)
  ddim      DDIMScheduler (eta, set_alpha_to_one, clip_sample or dynamic thresholding)
  dpmpp_2m  DPMSolverMultistepScheduler, algorithm_type dpmsolver++, solver_order 2, midpoint
            (dynamic thresholding)
  euler     EulerDiscreteScheduler
  euler_a   EulerAncestralDiscreteScheduler (epsilon / v_prediction only, as diffusers)

Ancestral noise for step ``i`` is ``normal(fold_in(key, i))`` (:func:`ancestral_noise`); ``step``
also takes it explicitly (``noise=``) so tests can feed the same draw to diffusers. Arrays are NHWC.

Models with a learned variance (DeepFloyd IF: ``variance_type="learned_range"``) output twice the
sample's channels, the prediction then the variance (``[eps, v]`` on the last axis). Every sampler
accepts such an output (``model_output.shape[-1] == 2 * sample.shape[-1]``): ``ddpm`` with a learned
``variance_type`` (``Sampler.learned_variance``) reads both halves, as diffusers' DDPMScheduler does;
every other sampler uses the first half only, as diffusers' IF pipelines (which split the output for
schedulers without a learned variance type) and DPMSolverMultistepScheduler (``model_output[:, :3]``)
do. A learned-variance sampler given only the prediction raises. :func:`split_model_output` splits.

Dynamic thresholding (Imagen; diffusers ``thresholding=True``, for pixel-space models such as IF)
replaces ``clip_sample`` on the predicted x0 of ddpm, ddim and dpmpp_2m: per sample, ``s`` is the
``dynamic_thresholding_ratio`` quantile of |x0| (linear interpolation, as ``torch.quantile``),
clamped to [1, ``sample_max_value``], and x0 becomes clip(x0, -s, s) / s (:func:`threshold_sample`).
The Euler schedulers have no thresholding in diffusers, so a config's ``thresholding`` does not
reach them (as ``EulerDiscreteScheduler.from_config`` ignores it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import MappingProxyType
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.diffusion.schedules import NoiseSchedule, torch_linspace_f32
from dreambooth_jax.errors import ConfigError

SAMPLER_CLASSES: Mapping[str, str] = MappingProxyType({
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler"})
SAMPLERS = tuple(SAMPLER_CLASSES)
# Every name the pipelines and the CLI accept: a sampler, or "<sampler>_karras" for those whose
# diffusers scheduler reads use_karras_sigmas (the pipelines set it for the suffix).
SAMPLER_NAMES = SAMPLERS + ("dpmpp_2m_karras", "euler_karras")
_STOCHASTIC = frozenset({"ddpm", "ddim", "euler_a"})
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# Settings the sampler name fixes: "dpmpp_2m" is DPM-Solver++ 2M whatever the checkpoint's config says.
_FIXED: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "dpmpp_2m": MappingProxyType({"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"})})
# Keys that define the noise schedule itself: taken from the NoiseSchedule, never per sampler.
_SCHEDULE_KEYS = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                            "rescale_betas_zero_snr", "prediction_type"})
_F32 = np.float32


@functools.partial(jax.tree_util.register_dataclass, data_fields=["timesteps", "tables"],
                   meta_fields=["name", "num_steps", "init_noise_sigma", "prediction_type", "clip_range",
                                "variance_type", "thresholding"])
@dataclasses.dataclass(frozen=True)
class Sampler:
    """Per-step arrays of one sampler at a fixed number of steps (a pytree; metadata is static).

    timesteps: (num_steps,) what the model is told at step i: int32 for ddpm/ddim/dpmpp_2m, float32
    for euler/euler_a (diffusers' Euler timesteps are fractional). tables: name -> (num_steps,)
    float32 per-step coefficients. init_noise_sigma: scale of the initial standard-normal latents.
    clip_range: x0 is clipped to [-clip_range, clip_range] (ddpm/ddim clip_sample), or None.
    variance_type: ddpm's variance type (None for the other samplers); "learned" / "learned_range"
    read the model's predicted variance (``learned_variance``). thresholding: (dynamic_thresholding_ratio,
    sample_max_value) when x0 is dynamically thresholded (then clip_range is None), else None."""

    timesteps: jax.Array
    tables: dict[str, jax.Array]
    name: str
    num_steps: int
    init_noise_sigma: float
    prediction_type: str
    clip_range: float | None = None
    variance_type: str | None = None
    thresholding: tuple[float, float] | None = None

    @property
    def learned_variance(self) -> bool:
        """Whether ``step`` reads a predicted variance: the model output must then hold twice the
        sample's channels, ``[prediction, variance]`` (ddpm with variance_type learned / learned_range).
        Other samplers take such an output too and ignore its second half."""
        return self.variance_type in LEARNED_VARIANCE_TYPES

    @property
    def stochastic(self) -> bool:
        """Whether ``step`` uses noise (ddpm, euler_a; ddim too, scaled by eta, which may be 0)."""
        return self.name in _STOCHASTIC

    def scale_model_input(self, sample: jax.Array, i: jax.Array | int) -> jax.Array:
        """The model's input at step i: sample / sqrt(sigma_i^2 + 1) for Euler samplers, else sample."""
        if "in_scale" in self.tables:
            return sample / self.tables["in_scale"][i]
        return sample

    def init_state(self, sample: jax.Array) -> dict[str, jax.Array]:
        """The state carried between steps: DPM-Solver's previous x0 prediction, else nothing."""
        if self.name == "dpmpp_2m":
            return {"prev_x0": jnp.zeros(sample.shape, jnp.float32)}
        return {}

    def step(self, state: dict[str, jax.Array], i: jax.Array | int, model_output: jax.Array, sample: jax.Array,
             key: jax.Array | None = None, *, eta: jax.Array | float = 0.0,
             noise: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """One denoising step from x at step i to the next: returns (prev_sample, new state).

        Pure; ``i`` may be traced. ``eta`` (DDIM only, ignored elsewhere) is traced too. Stochastic
        samplers use ``noise`` if given, else ``ancestral_noise(key, i, sample.shape)``. Math is in
        float32; the result has ``sample``'s dtype. ``model_output`` has the sample's channels, or
        twice as many (``[prediction, variance]``, see :func:`split_model_output`): required when
        ``learned_variance``, else its second half is ignored."""
        model_output, variance = split_model_output(model_output, sample.shape[-1])
        if self.learned_variance and variance is None:
            raise ValueError(f"sampler {self.name!r} has variance_type={self.variance_type!r}: the model output must "
                             f"hold the predicted variance too ({2 * sample.shape[-1]} channels, [prediction, "
                             f"variance]); got {model_output.shape[-1]}")
        noise_value = None
        if self.stochastic:
            if noise is None:
                if key is None:
                    raise ValueError(f"sampler {self.name!r} is stochastic: pass key (or noise) to step")
                noise = ancestral_noise(key, i, sample.shape)
            noise_value = noise.astype(jnp.float32)
        tab = {k: v[i] for k, v in self.tables.items()}
        x, out = sample.astype(jnp.float32), model_output.astype(jnp.float32)
        if self.learned_variance:
            tab["predicted_variance"] = variance.astype(jnp.float32)
        prev, state = _STEPS[self.name](self, tab, state, x, out, jnp.asarray(eta, jnp.float32), noise_value)
        return prev.astype(sample.dtype), state


def split_model_output(model_output: jax.Array, channels: int) -> tuple[jax.Array, jax.Array | None]:
    """(prediction, predicted variance) of a model output with ``2 * channels`` channels on the last
    axis (IF's UNets: epsilon then the variance value v in [-1, 1] for learned_range), split as
    diffusers' ``torch.split(model_output, channels, dim=1)``; any other output is (model_output, None).

    With classifier-free guidance, guide the prediction halves only and keep the conditional
    branch's variance, as diffusers' IF pipelines do:
    ``concatenate([eps_u + g * (eps_c - eps_u), var_c], axis=-1)``."""
    if model_output.shape[-1] == 2 * channels:
        return model_output[..., :channels], model_output[..., channels:]
    return model_output, None


def threshold_sample(x0: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """diffusers' ``_threshold_sample`` (dynamic thresholding, Imagen) of a float32 batch: per example,
    s = quantile(|x0|, ratio) over all non-batch elements, clamped to [1, max_value]; then
    clip(x0, -s, s) / s. The quantile is ``torch.quantile``'s linear interpolation, computed as torch
    does: rank = float32(ratio) * (n - 1) rounded to float32 (static here), the two neighbouring order
    statistics, and torch's ``lerp`` (start + w (end - start) for w < 0.5, else end - (end - start)(1 - w)).
    s matches torch's bit for bit where the lerp rounds nowhere, else within 1 ulp (torch's AVX2
    kernel fuses the multiply-add; its generic one and XLA may not); clamp and clip are exact and the
    division correctly rounded on both sides. NaN anywhere gives NaN (torch sets the rank to the last
    index, where its sort puts NaN)."""
    b = x0.shape[0]
    flat = x0.reshape(b, -1)
    lo, hi, w = _quantile_rank(ratio, flat.shape[1])
    srt = jnp.sort(jnp.abs(flat), axis=1)
    below, above = srt[:, lo], srt[:, hi]
    if w < 0.5:
        q = below + w * (above - below)
    else:
        q = above - (above - below) * (_F32(1) - w)
    q = jnp.where(jnp.isnan(flat).any(axis=1), jnp.float32(jnp.nan), q)
    s = jnp.clip(q, 1.0, jnp.float32(max_value))[:, None]
    # XLA rewrites a division by a broadcast into a multiplication by the reciprocal (two roundings,
    # up to ~1 ulp off torch's correctly rounded quotient); behind the barrier it divides
    s_full = jax.lax.optimization_barrier(jnp.broadcast_to(s, flat.shape))
    return (jnp.clip(flat, -s, s) / s_full).reshape(x0.shape)


def _quantile_rank(ratio: float, n: int) -> tuple[int, int, np.float32]:
    """torch.quantile's rank for ``n`` values: r = float32(ratio) * float32(n - 1) in float32; the
    indices below and above it and the weight r - floor(r) (exact)."""
    rank = _F32(_F32(ratio) * _F32(n - 1))
    lo = int(np.floor(rank))
    return lo, int(np.ceil(rank)), _F32(rank - _F32(lo))


def ancestral_noise(key: jax.Array, i: jax.Array | int, shape: tuple[int, ...],
                    dtype: Any = jnp.float32) -> jax.Array:
    """The standard-normal noise ``step`` draws at step i: ``normal(fold_in(key, i), shape)``.
    ``key`` may be a typed key or raw uint32 key data (``jax.random.key_data``)."""
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.normal(jax.random.fold_in(key, i), shape, dtype)


def sample_loop(sampler: Sampler, model_fn: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array,
                key: jax.Array | None = None, *, eta: jax.Array | float = 0.0) -> jax.Array:
    """Run all ``sampler.num_steps`` steps in one ``lax.fori_loop`` and return the final sample.

    ``latents`` must already be multiplied by ``sampler.init_noise_sigma`` (as diffusers'
    ``prepare_latents`` does). ``model_fn(x_in, t)`` gets the scaled input and the scalar timestep
    ``sampler.timesteps[i]`` and returns the model output (the schedule's prediction type), with
    the sample's channels or, for a learned-variance model, twice as many (``[prediction,
    variance]``: required when ``sampler.learned_variance``, else the variance half is dropped)."""
    def body(i, carry):
        x, state = carry
        out = model_fn(sampler.scale_model_input(x, i), sampler.timesteps[i])
        return sampler.step(state, i, out, x, key, eta=eta)

    x, _ = jax.lax.fori_loop(0, sampler.num_steps, body, (latents, sampler.init_state(latents)))
    return x


# --------------------------------------------------------------------------------------------
# Host side: timesteps and per-step tables.


def _spaced_timesteps(cfg: Mapping[str, Any], n: int, *, last: int | None = None,
                      extra: int = 0, dtype: Any = np.int64) -> np.ndarray:
    """diffusers' ``set_timesteps`` spacing, descending. DPM-Solver spaces n + 1 points up to
    ``last`` and drops the final one (``extra=1``); Euler keeps fractional linspace values."""
    T = cfg["num_train_timesteps"]
    last = T if last is None else last
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        if dtype == np.float32:
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        return np.linspace(0, last - 1, n + extra).round()[::-1][:n].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + extra)
        ts = (np.arange(0, n + extra) * ratio).round()[::-1][:n].astype(dtype)
        return ts + dtype(cfg["steps_offset"])
    # trailing: a float ratio. For some n, float rounding makes np.arange one longer, ending in a
    # timestep of -1 (a diffusers quirk); we refuse that rather than sample at t = -1.
    ts = np.arange(last, 0, -T / n).round().astype(dtype) - dtype(1)
    if len(ts) and ts.min() < 0:
        raise ConfigError(f"timestep_spacing='trailing' with {n} steps makes diffusers produce {len(ts)} "
                          f"timesteps, the last being -1 (float rounding); use {n - 1} or {n + 1} steps")
    return ts


def _check_range(ts: np.ndarray, T: int, name: str) -> None:
    if len(ts) and (ts.min() < 0 or ts.max() > T - 1):
        raise ConfigError(f"sampler {name!r}: timesteps {ts.tolist()} fall outside [0, {T - 1}] "
                          "(check steps_offset and the number of steps)")


def _sigma_table(ac: np.ndarray) -> np.ndarray:
    """sqrt((1 - abar) / abar) per train timestep, float32 as diffusers computes it."""
    return np.sqrt((_F32(1) - ac) / ac).astype(np.float32)


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep of each sigma, interpolating log sigma linearly between the two
    neighbouring train timesteps (clamped to the table's ends), as diffusers' ``_sigma_to_t``."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    n = len(log_sigmas)
    # last train index whose log sigma <= log_sigma (log sigmas ascend with t), kept below n - 1
    low = np.clip(np.searchsorted(log_sigmas.astype(np.float64), log_sigma, side="right") - 1, 0, n - 2)
    lo, hi = log_sigmas[low].astype(np.float64), log_sigmas[low + 1].astype(np.float64)
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _respace_sigmas(cfg: Mapping[str, Any], sigmas: np.ndarray, n: int) -> np.ndarray | None:
    """Karras (rho = 7) or exponential sigmas between the ends of ``sigmas`` (descending), or None
    when neither is asked for. Euler's config may pin sigma_min / sigma_max."""
    if not (cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]):
        return None
    if cfg["use_karras_sigmas"] and cfg["use_exponential_sigmas"]:
        raise ConfigError("use_karras_sigmas and use_exponential_sigmas cannot both be true")
    lo = cfg.get("sigma_min")
    hi = cfg.get("sigma_max")
    lo = float(sigmas[-1]) if lo is None else lo
    hi = float(sigmas[0]) if hi is None else hi
    if cfg["use_exponential_sigmas"]:
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    ramp = np.linspace(0, 1, n)
    rho = 7.0
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _final_sigma(cfg: Mapping[str, Any], ac: np.ndarray) -> np.float32:
    """The sigma the last step lands on: 0, or the smallest train sigma (final_sigmas_type)."""
    if cfg["final_sigmas_type"] == "sigma_min":
        return np.sqrt((_F32(1) - ac[0]) / ac[0]).astype(np.float32)
    return _F32(0)


def _ddpm_tables(cfg: Mapping[str, Any], ac: np.ndarray, n: int) -> tuple[np.ndarray, dict, float]:
    T = cfg["num_train_timesteps"]
    if n > T:
        raise ConfigError(f"ddpm: {n} steps exceed num_train_timesteps={T}")
    ts = _spaced_timesteps(cfg, n)
    _check_range(ts, T, "ddpm")
    prev = np.append(ts[1:], -1)  # the next timestep of the schedule; -1 after the last
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], _F32(1)).astype(np.float32)
    b_t, b_prev = _F32(1) - a_t, _F32(1) - a_prev
    cur_a = a_t / a_prev
    cur_b = _F32(1) - cur_a
    var = np.maximum((_F32(1) - a_prev) / (_F32(1) - a_t) * cur_b, _F32(1e-20))
    kind = cfg["variance_type"]
    tables = dict(sqrt_a=np.sqrt(a_t), sqrt_b=np.sqrt(b_t), c_x0=(np.sqrt(a_prev) * cur_b) / b_t,
                  c_x=(np.sqrt(cur_a) * b_prev) / b_t)
    if kind in LEARNED_VARIANCE_TYPES:
        # the noise scale depends on the model's predicted variance: on the device (_ddpm_step);
        # learned_range interpolates between these two logs (diffusers' _get_variance)
        tables["noise_on"] = (ts > 0).astype(np.float32)  # no noise at t = 0
        if kind == "learned_range":
            with np.errstate(divide="ignore"):
                tables.update(min_log=np.log(var), max_log=np.log(cur_b))
        return ts, tables, 1.0
    if kind in ("fixed_small", None):  # null (a DPM-Solver config's key) falls through to fixed_small in diffusers
        std = np.sqrt(var)
    elif kind == "fixed_small_log":
        std = np.exp(_F32(0.5) * np.log(var))
    elif kind == "fixed_large":
        std = np.sqrt(cur_b)
    else:
        raise ConfigError(f"ddpm: variance_type={kind!r} is not supported; supported: 'fixed_small', "
                          "'fixed_small_log', 'fixed_large', 'learned', 'learned_range'")
    tables["std"] = np.where(ts > 0, std, _F32(0))  # no noise at t = 0
    return ts, tables, 1.0


def _ddim_tables(cfg: Mapping[str, Any], ac: np.ndarray, n: int) -> tuple[np.ndarray, dict, float]:
    T = cfg["num_train_timesteps"]
    if n > T:
        raise ConfigError(f"ddim: {n} steps exceed num_train_timesteps={T}")
    ts = _spaced_timesteps(cfg, n)
    _check_range(ts, T, "ddim")
    prev = ts - T // n  # diffusers' DDIM steps back by T // n whatever the spacing
    final = _F32(1) if cfg["set_alpha_to_one"] else ac[0]
    a_t = ac[ts]
    a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
    b_t, b_prev = _F32(1) - a_t, _F32(1) - a_prev
    var = (b_prev / b_t) * (_F32(1) - a_t / a_prev)
    tables = dict(sqrt_a=np.sqrt(a_t), sqrt_b=np.sqrt(b_t), a_prev=a_prev, sqrt_a_prev=np.sqrt(a_prev),
                  sqrt_var=np.sqrt(var))
    return ts, tables, 1.0


def _alpha_sigma(sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """VP (alpha_t, sigma_t) of an EDM-style sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha."""
    alpha = _F32(1) / np.sqrt(sigma * sigma + _F32(1))
    return alpha, sigma * alpha


def _dpmpp_2m_tables(cfg: Mapping[str, Any], ac: np.ndarray, n: int) -> tuple[np.ndarray, dict, float]:
    T = cfg["num_train_timesteps"]
    alpha_t, sigma_t = np.sqrt(ac), np.sqrt(_F32(1) - ac)
    with np.errstate(divide="ignore"):
        lambdas = np.log(alpha_t) - np.log(sigma_t)
    # lambda_min_clipped trims the noisiest train steps (cosine schedules); -inf keeps them all
    clipped = int(np.searchsorted(lambdas[::-1], _F32(cfg["lambda_min_clipped"]), side="left"))
    ts = _spaced_timesteps(cfg, n, last=T - clipped, extra=1)
    table = _sigma_table(ac)
    log_table = np.log(table)
    sig = _respace_sigmas(cfg, table[::-1], n)
    if sig is None:
        sig = np.interp(ts, np.arange(len(table)), table)
    else:
        t_frac = _sigma_to_t(sig, log_table)
        # diffusers rounds these timesteps except for squaredcos_cap_v2 (and exponential sigmas),
        # then casts to int64, which truncates
        ts = (np.round(t_frac) if cfg["use_karras_sigmas"] and cfg["beta_schedule"] != "squaredcos_cap_v2"
              else t_frac).astype(np.int64)
    _check_range(ts, T, "dpmpp_2m")
    sig = np.concatenate([sig, [_final_sigma(cfg, ac)]]).astype(np.float32)
    m = len(ts)
    alpha, sgm = _alpha_sigma(sig)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sgm)  # +inf at a final sigma of 0: exp(-h) is then 0, as in torch
    s0, t = np.arange(m), np.arange(m) + 1
    h = lam[t] - lam[s0]
    with np.errstate(divide="ignore", invalid="ignore"):
        c_x = sgm[t] / sgm[s0]
        c_d0 = alpha[t] * (np.exp(-h) - _F32(1))
        inv_r0 = _F32(1) / ((lam[s0] - lam[np.maximum(s0 - 1, 0)]) / h)
    last_first_order = cfg["euler_at_final"] or (cfg["lower_order_final"] and m < 15) or \
        cfg["final_sigmas_type"] == "zero"
    first_order = (s0 == 0) | ((s0 == m - 1) & last_first_order)
    tables = dict(alpha_s=alpha[s0], sigma_s=sgm[s0], c_x=c_x, c_d0=c_d0,
                  c_d1=np.where(first_order, _F32(0), _F32(0.5) * c_d0),
                  inv_r0=np.where(first_order, _F32(0), inv_r0))
    return ts, tables, 1.0


def _euler_sigmas(cfg: Mapping[str, Any], ac: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Timesteps (float32), sigmas (float32, one more than the steps) and init_noise_sigma of
    EulerDiscreteScheduler / EulerAncestralDiscreteScheduler."""
    ts = _spaced_timesteps(cfg, n, dtype=np.float32)
    table = _sigma_table(ac)
    log_table = np.log(table)
    if cfg.get("interpolation_type", "linear") == "log_linear":
        sig = np.exp(torch_linspace_f32(float(log_table[-1]), float(log_table[0]), n + 1))
    else:
        sig = np.interp(ts, np.arange(len(table)), table)
    if "use_karras_sigmas" in cfg:  # EulerDiscrete; the ancestral class has no re-spacing
        respaced = _respace_sigmas(cfg, sig, n)
        if respaced is not None:
            sig, ts = respaced, _sigma_to_t(respaced, log_table)
        sig = np.concatenate([sig, [_final_sigma(cfg, ac)]]).astype(np.float32)
    else:
        sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    if cfg.get("timestep_type") == "continuous" and cfg["prediction_type"] == "v_prediction":
        ts = _F32(0.25) * np.log(sig[:-1])
    top = sig.max()
    init = top if cfg["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(top * top + _F32(1))
    return np.asarray(ts, np.float32), sig, float(init)


def _euler_common(sig: np.ndarray, m: int) -> dict[str, np.ndarray]:
    s = sig[:m]
    s2p1 = s * s + _F32(1)
    return dict(sigma=s, in_scale=np.sqrt(s2p1), c_out=-s / np.sqrt(s2p1), s2p1=s2p1)


def _euler_tables(cfg: Mapping[str, Any], ac: np.ndarray, n: int) -> tuple[np.ndarray, dict, float]:
    ts, sig, init = _euler_sigmas(cfg, ac, n)
    m = len(ts)
    return ts, dict(_euler_common(sig, m), dt=sig[1:m + 1] - sig[:m]), init


def _euler_a_tables(cfg: Mapping[str, Any], ac: np.ndarray, n: int) -> tuple[np.ndarray, dict, float]:
    if cfg["prediction_type"] == "sample":
        raise ConfigError("euler_a does not support prediction_type='sample' (neither does diffusers' "
                          "EulerAncestralDiscreteScheduler); use euler, ddim, ddpm or dpmpp_2m")
    ts, sig, init = _euler_sigmas(cfg, ac, n)
    m = len(ts)
    s_from, s_to = sig[:m], sig[1:m + 1]
    # split the move to s_to into a deterministic part (down) and fresh noise (up): down^2 + up^2 = to^2
    up = np.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from))
    down = np.sqrt(s_to * s_to - up * up)
    return ts, dict(_euler_common(sig, m), dt=down - s_from, sigma_up=up), init


_TABLES: Mapping[str, Callable] = MappingProxyType({
    "ddpm": _ddpm_tables, "ddim": _ddim_tables, "dpmpp_2m": _dpmpp_2m_tables, "euler": _euler_tables,
    "euler_a": _euler_a_tables})


def make_sampler(name: str, schedule: NoiseSchedule, num_inference_steps: int, **options: Any) -> Sampler:
    """Build sampler ``name`` (one of SAMPLERS) for ``num_inference_steps`` steps on the host.

    Settings come from ``options`` (e.g. ``timestep_spacing="trailing"``, ``use_karras_sigmas=True``,
    ``clip_sample=False``), else the checkpoint's scheduler config, else the diffusers class's
    default, exactly as ``<Class>.from_config(config, **options)``. Noise-schedule keys and the
    settings the name fixes cannot be options. Raises ConfigError for unknown names/options and
    for settings we do not implement."""
    if name not in SAMPLER_CLASSES:
        raise ConfigError(f"unknown scheduler (sampler) {name!r}; supported: {', '.join(SAMPLERS)}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)) \
            or num_inference_steps < 1:
        raise ConfigError(f"number of sampling steps must be a positive integer, got {num_inference_steps!r}")
    for k in options:
        if k in _SCHEDULE_KEYS or k in _FIXED.get(name, {}):
            why = "defines the noise schedule (set it in the scheduler config)" if k in _SCHEDULE_KEYS \
                else f"is fixed by the sampler name ({k}={_FIXED[name][k]!r})"
            raise ConfigError(f"sampler option {k!r} {why}")
    cfg = schedule.config.resolve(SAMPLER_CLASSES[name], options, source=f"sampler {name!r} options")
    cfg.update(_FIXED.get(name, {}))
    cfg["prediction_type"] = schedule.prediction_type
    cfg["beta_schedule"] = schedule.config.beta_schedule
    ac = np.asarray(schedule.alphas_cumprod, np.float32).copy()
    if schedule.config.rescale_betas_zero_snr and name in ("dpmpp_2m", "euler", "euler_a"):
        ac[-1] = _F32(2.0 ** -24)  # sigma-space samplers need a finite last sigma, as in diffusers
    ts, tables, init = _TABLES[name](cfg, ac, int(num_inference_steps))
    # diffusers: "if thresholding: threshold, elif clip_sample: clip" (only classes with the keys)
    threshold = (float(cfg["dynamic_thresholding_ratio"]), float(cfg["sample_max_value"])) \
        if cfg.get("thresholding", False) else None
    clip = cfg.get("clip_sample", False) and threshold is None
    return Sampler(
        timesteps=jnp.asarray(ts, jnp.float32 if name in ("euler", "euler_a") else jnp.int32),
        tables={k: jnp.asarray(np.asarray(v, np.float32)) for k, v in tables.items()},
        name=name, num_steps=len(ts), init_noise_sigma=init, prediction_type=schedule.prediction_type,
        clip_range=float(cfg["clip_sample_range"]) if clip else None,
        variance_type=cfg["variance_type"] if name == "ddpm" else None, thresholding=threshold)


# --------------------------------------------------------------------------------------------
# Device side: one step of each sampler (tab: this step's scalars; x, out: float32 NHWC).


def _x0_eps(kind: str, out: jax.Array, x: jax.Array, sqrt_a: jax.Array, sqrt_b: jax.Array):
    if kind == "epsilon":
        return (x - sqrt_b * out) / sqrt_a, out
    if kind == "v_prediction":
        return sqrt_a * x - sqrt_b * out, sqrt_a * out + sqrt_b * x
    return out, (x - sqrt_a * out) / sqrt_b


def _clip(s: Sampler, x0: jax.Array) -> jax.Array:
    """diffusers' step 3: dynamic thresholding if configured, else clip_sample, else nothing."""
    if s.thresholding is not None:
        return threshold_sample(x0, *s.thresholding)
    return x0 if s.clip_range is None else jnp.clip(x0, -s.clip_range, s.clip_range)


def _ddpm_step(s: Sampler, tab, state, x, out, eta, noise):
    x0 = _clip(s, _x0_eps(s.prediction_type, out, x, tab["sqrt_a"], tab["sqrt_b"])[0])
    prev = tab["c_x0"] * x0 + tab["c_x"] * x
    if not s.learned_variance:
        return prev + tab["std"] * noise, state
    v = tab["predicted_variance"]
    if s.variance_type == "learned_range":
        # diffusers: log variance = frac * log(beta_t) + (1 - frac) * log(clipped posterior variance),
        # frac = (v + 1) / 2, and the noise is scaled by exp(0.5 * log variance)
        frac = (v + 1) / 2
        std = jnp.exp(0.5 * (frac * tab["max_log"] + (1 - frac) * tab["min_log"]))
    else:  # "learned": the output is the variance itself; diffusers scales by its ** 0.5
        std = jnp.sqrt(v)
    return jnp.where(tab["noise_on"] > 0, prev + std * noise, prev), state


def _ddim_step(s: Sampler, tab, state, x, out, eta, noise):
    x0, eps = _x0_eps(s.prediction_type, out, x, tab["sqrt_a"], tab["sqrt_b"])
    x0 = _clip(s, x0)
    std = eta * tab["sqrt_var"]
    prev = tab["sqrt_a_prev"] * x0 + jnp.sqrt(1 - tab["a_prev"] - std * std) * eps
    return prev + std * noise, state  # eta = 0: adds exactly 0


def _dpmpp_2m_step(s: Sampler, tab, state, x, out, eta, noise):
    if s.prediction_type == "epsilon":
        x0 = (x - tab["sigma_s"] * out) / tab["alpha_s"]
    elif s.prediction_type == "v_prediction":
        x0 = tab["alpha_s"] * x - tab["sigma_s"] * out
    else:
        x0 = out
    x0 = _clip(s, x0)  # DPM-Solver++ thresholds its x0 (convert_model_output); it has no clip_sample
    # first-order steps have inv_r0 = c_d1 = 0, so the second-order term vanishes exactly
    d1 = tab["inv_r0"] * (x0 - state["prev_x0"])
    prev = tab["c_x"] * x - tab["c_d0"] * x0 - tab["c_d1"] * d1
    return prev, {"prev_x0": x0}


def _euler_x0(s: Sampler, tab, x, out):
    if s.prediction_type == "epsilon":
        return x - tab["sigma"] * out
    if s.prediction_type == "v_prediction":
        return out * tab["c_out"] + x / tab["s2p1"]
    return out


def _euler_step(s: Sampler, tab, state, x, out, eta, noise):
    derivative = (x - _euler_x0(s, tab, x, out)) / tab["sigma"]
    return x + derivative * tab["dt"], state


def _euler_a_step(s: Sampler, tab, state, x, out, eta, noise):
    derivative = (x - _euler_x0(s, tab, x, out)) / tab["sigma"]
    return x + derivative * tab["dt"] + noise * tab["sigma_up"], state


_STEPS: Mapping[str, Callable] = MappingProxyType({
    "ddpm": _ddpm_step, "ddim": _ddim_step, "dpmpp_2m": _dpmpp_2m_step, "euler": _euler_step,
    "euler_a": _euler_a_step})
