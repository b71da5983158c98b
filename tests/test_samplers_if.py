"""DeepFloyd IF's schedulers in our jitted samplers: learned variance and dynamic thresholding.

IF's stages ship DDPMScheduler configs with ``variance_type="learned_range"`` (the UNet outputs
epsilon and a variance value, 6 channels for 3-channel images) and ``thresholding=True``
(``dynamic_thresholding_ratio=0.95``, ``sample_max_value`` 1.5 for stage I, 1.0 for stage II).
Whole sampling loops are compared with diffusers' DDPMScheduler, DDIMScheduler and
DPMSolverMultistepScheduler configured as IF's, with a stand-in model (the same formula in torch
and jnp) returning 6 channels, and our ancestral noise fed to diffusers.

Bounds follow tests/test_samplers.py and tests/numerics.py: per-step scalars as Twins, the final
sample by first-order analysis of the loop, the formula written once with F values. Dynamic
thresholding is not elementwise (a per-example quantile of |x0|); see :func:`_threshold_f` for how it
enters the analysis.
"""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm

from dreambooth_jax.diffusion import samplers, schedules
from dreambooth_jax.errors import ConfigError
from numerics import CR, SQRT_ULP, F, Twin, assert_within, trajectory_bound, ulp32
from test_samplers import (_cos_t, _ddim_scalars, _ddpm_scalars, _dpm_order1, _dpmpp_2m_rows, _dpmpp_2m_tables,
                           _host_spec, _model, _nchw, jax_model, torch_model)

# IF-I-XL-v1.0/scheduler/scheduler_config.json as diffusers' conversion script (scripts/convert_if.py)
# writes it: DDPMScheduler(variance_type="learned_range", beta_schedule="squaredcos_cap_v2",
# prediction_type="epsilon", thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5),
# every other key at its default (saved with diffusers 0.16, before timestep_spacing / steps_offset
# existed in DDPMScheduler: those resolve to "leading" / 0).
IF_I = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.16.0", "beta_end": 0.02,
        "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "clip_sample": True, "clip_sample_range": 1.0,
        "dynamic_thresholding_ratio": 0.95, "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "sample_max_value": 1.5, "thresholding": True, "trained_betas": None, "variance_type": "learned_range"}
# IF-II-L-v1.0/scheduler: the same with sample_max_value 1.0 (its image_noising_scheduler is a default
# DDPMScheduler on squaredcos_cap_v2, used only through add_noise).
IF_II = {**IF_I, "sample_max_value": 1.0}

REFERENCE = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler,
             "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
SHAPE = (2, 8, 8, 3)

# (id, sampler, config, steps, eta, options)
CASES = [
    ("ddpm-if1-10", "ddpm", IF_I, 10, 0.0, {}),
    ("ddpm-if1-50", "ddpm", IF_I, 50, 0.0, {}),
    ("ddpm-if2-10", "ddpm", IF_II, 10, 0.0, {}),
    ("ddpm-if1-learned-10", "ddpm", IF_I, 10, 0.0, {"variance_type": "learned"}),
    ("ddim-if1-eta0.5-10", "ddim", IF_I, 10, 0.5, {}),
    ("dpmpp_2m-if1-10", "dpmpp_2m", IF_I, 10, 0.0, {}),
]


def _variance_head_torch(x: torch.Tensor, t: torch.Tensor, learned: bool) -> torch.Tensor:
    w = 0.9 * torch.sin(2 * x) * torch.cos(t / 300)  # in [-1, 1], as learned_range's v
    return 0.01 * (1 + w) if learned else w  # "learned": the variance itself, positive


def _variance_head_jax(x: jax.Array, t: jax.Array, learned: bool) -> jax.Array:
    w = 0.9 * jnp.sin(2 * x) * jnp.cos(t / 300)
    return 0.01 * (1 + w) if learned else w


def torch_model6(x: torch.Tensor, t: torch.Tensor, learned: bool = False) -> torch.Tensor:
    """[epsilon, variance] on the channel axis, as IF's UNets."""
    return torch.cat([torch_model(x, t), _variance_head_torch(x, t, learned)], dim=1)


def jax_model6(x: jax.Array, t: jax.Array, learned: bool = False) -> jax.Array:
    return jnp.concatenate([jax_model(x, t), _variance_head_jax(x, t, learned)], axis=-1)


def _torch_rank(ratio: float, n: int) -> tuple[int, int, float]:
    """torch.quantile's rank: q (a float32 scalar tensor) times n - 1, in float32; the neighbouring
    indices and the weight (checked against torch in test_threshold_rank_is_torchs)."""
    rank = np.float32(np.float32(ratio) * np.float32(n - 1))
    lo = int(np.floor(rank))
    return lo, int(np.ceil(rank)), float(rank - np.float32(lo))


def run_case(name: str, config: dict, steps: int, eta: float, options: dict) -> dict:
    """Both trajectories (final samples NHWC), the sampler, the scheduler and the unclamped quantiles
    diffusers' thresholding computed at each step."""
    learned = options.get("variance_type") == "learned"
    sampler = samplers.make_sampler(name, schedules.schedule_from_config(config), steps, **options)
    fixed = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"} \
        if name == "dpmpp_2m" else {}
    ref = REFERENCE[name].from_config(config, **fixed, **options)
    ref.set_timesteps(steps)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(0)
    quantiles = []
    threshold = ref._threshold_sample

    def recording_threshold(sample):
        flat = sample.reshape(sample.shape[0], -1).abs()
        quantiles.append(torch.quantile(flat, ref.config.dynamic_thresholding_ratio, dim=1).numpy())
        return threshold(sample)

    ref._threshold_sample = recording_threshold
    latents = np.asarray(jax.random.normal(jax.random.key(1), SHAPE))
    key = jax.random.key(7)
    x = _nchw(latents) * ref.init_noise_sigma
    current = {}
    with pytest.MonkeyPatch.context() as patch:
        for module in (scheduling_ddpm, scheduling_ddim):
            patch.setattr(module, "randn_tensor", lambda shape, **kw: current["noise"])
        for i, t in enumerate(ref.timesteps):
            current["noise"] = _nchw(samplers.ancestral_noise(key, i, SHAPE))
            out = torch_model6(ref.scale_model_input(x, t), t, learned)
            if name == "ddim":
                # what IF's pipelines mean to do for a scheduler without a learned variance (they test
                # config.variance_type, which DDIMScheduler.from_config(IF's config) keeps as a hidden
                # key, so diffusers itself would hand DDIM 6 channels and fail)
                out = out[:, :3]
            x = ref.step(out, t, x, **({"eta": eta} if name == "ddim" else {})).prev_sample
    model = lambda x_in, t: jax_model6(x_in, t, learned)  # noqa: E731
    run = jax.jit(lambda lat, k, e: samplers.sample_loop(sampler, model, lat * sampler.init_noise_sigma, k, eta=e))
    ours = np.asarray(run(jnp.asarray(latents), key, jnp.float32(eta)))
    return {"ours": ours, "ref": x.numpy().transpose(0, 2, 3, 1), "sampler": sampler, "scheduler": ref,
            "latents": latents, "key": key, "quantiles": np.array(quantiles)}


# --------------------------------------------------------------------------------------------
# The analysed formula (F values, elementwise over the flattened NHWC batch, except the quantile).


def _threshold_f(x0: F, ratio: float, max_value: float, batch: int) -> F:
    """diffusers' _threshold_sample on F values. The quantile q = below + w (above - below) (torch's
    lerp; its other branch for w >= 0.5) is taken from the sorted |x0| of each example and broadcast
    back to its elements, each element then getting its own rounding variables (a superset of the
    one shared rounding: the bound only grows). Derivatives: the quantile's are those of the two
    order statistics (it is piecewise linear in x0); s = clamp(q, 1, max_value) has derivative 0
    outside the range, valid because both sides' q stay on the analysed side of 1 and max_value
    (the test asserts a margin of 1e-3 relative, far above their difference: the final samples
    differ by ~1e-6); clip(x0, -s, s) has clip's derivatives (1 in x0 inside, +-1 in s where it
    clips) and, for elements within 1e-3 relative of +-s (where the two sides might fall on
    different sides of the kink), derivative 1 in x0 too (1-Lipschitz, as F.clip). Elements farther
    out are clipped on both sides: x0 there may be huge (1e4 at t = 999, where sqrt(abar) ~ 1e-4)
    and its rounding error does not reach the result. The value is exact: clip's."""
    flat = x0.x.reshape(batch, -1)
    m = flat.shape[1]
    lo, hi, w = _torch_rank(ratio, m)
    srt = jnp.sort(jnp.abs(flat), axis=1)
    below, above = F(jnp.repeat(srt[:, lo], m)), F(jnp.repeat(srt[:, hi], m))
    q = below + w * (above - below) if w < 0.5 else above - (above - below) * float(np.float32(1) - np.float32(w))
    s = jnp.clip(q.x, 1.0, max_value)
    clipped = jnp.clip(x0.x, -s, s)
    near = jnp.abs(jnp.abs(x0.x) - s) <= 1e-3 * s
    return F(clipped + jnp.where(near & (clipped != x0.x), x0.x - jax.lax.stop_gradient(x0.x), 0.0)) / F(s)


def _step_fn(name: str, sampler: samplers.Sampler, eta: float):
    """One step of the diffusers scheduler, as IF runs it (epsilon prediction)."""
    batch = SHAPE[0]

    def limit(x0: F) -> F:
        if sampler.thresholding is not None:
            return _threshold_f(x0, *sampler.thresholding, batch)
        return x0 if sampler.clip_range is None else x0.clip(-sampler.clip_range, sampler.clip_range)

    def step(s, tab, i):
        x = s["x"]
        eps = _model(x, tab("cos_t"))
        if name == "ddpm":
            x0 = limit((x - tab("sqrt_b") * eps) / tab("sqrt_a"))
            prev = tab("c_x0") * x0 + tab("c_x") * x
            w = 0.9 * (2 * x).sin() * tab("cos_t")
            if sampler.variance_type == "learned_range":
                frac = (w + 1) / 2
                std = (0.5 * (frac * tab("max_log") + (1 - frac) * tab("min_log"))).exp()
            else:  # learned: (predicted variance) ** 0.5
                std = (0.01 * (1 + w)).sqrt()
            return {"x": F.where(i["on"].x > 0, prev + std * i["noise"], prev)}
        if name == "ddim":
            x0 = limit((x - tab("sqrt_b") * eps) / tab("sqrt_a"))
            prev = tab("sqrt_a_prev") * x0 + tab("direction") * eps
            return {"x": prev + tab("std") * i["noise"] if eta > 0 else prev}
        a_s, s_s = tab("alpha"), tab("sigma")
        x0 = limit((x - s_s * eps) / a_s)
        order1, zero = i["order1"].x > 0, i["zero"].x > 0
        h = tab("lam", 1) - tab("lam")
        coef = tab("alpha", 1) * ((-h).exp() - 1.0)
        first = (tab("sigma", 1) / s_s) * x - coef * x0
        r0 = F.where(order1, 1.0, (tab("lam") - tab("lam", -1)) / h)
        second = first - 0.5 * coef * ((1.0 / r0) * (x0 - s["m1"]))
        return {"x": F.where(zero, x0, F.where(order1, first, second)), "m1": x0}
    return step


def _rows(name: str, ref, spec: dict, eta: float) -> list[dict[str, Twin]]:
    """Each step's scalars as Twins (diffusers' 0-d tensor arithmetic; ours in numpy float32)."""
    ts = ref.timesteps.numpy()
    m = len(ts)
    if name == "dpmpp_2m":
        return [{"cos_t": _cos_t(Twin(np.float32(t)))} for t in ts]
    rows = []
    ac = spec["ac"]
    for k, t in enumerate(ts):
        prev = (ts[k + 1] if k + 1 < m else -1) if name == "ddpm" else t - ref.config.num_train_timesteps // m
        a_prev = ac[prev] if prev >= 0 else (ac[0] if name == "ddim" and not ref.config.set_alpha_to_one
                                             else Twin(np.float32(1.0)))
        a_t = ac[t]
        if name == "ddpm":
            row = _ddpm_scalars(a_t, a_prev, None)
            del row["std"]  # learned variance types: the noise scale comes from the model
            cur_b = 1 - a_t / a_prev
            var = (1 - a_prev) / (1 - a_t) * cur_b
            var = Twin.where(var.v > 1e-20, var, Twin(np.float32(1e-20)))  # torch.clamp(min=1e-20)
            row.update(min_log=var.log(), max_log=cur_b.log(), noise_on=Twin(np.float32(t > 0)))
        else:
            row = _ddim_scalars(a_t, a_prev, eta)
        row["cos_t"] = _cos_t(Twin(np.float32(t)))
        rows.append(row)
    return rows


@pytest.mark.parametrize("case_id,name,config,steps,eta,options", CASES, ids=[c[0] for c in CASES])
def test_if_trajectory_matches_diffusers(case_id, name, config, steps, eta, options):
    """Timesteps, our per-step tables (learned_range's two log variances included) and the final
    sample of a whole IF-configured loop, each within its float32 bound."""
    r = run_case(name, config, steps, eta, options)
    sampler, ref = r["sampler"], r["scheduler"]
    ts = ref.timesteps.numpy()
    m = len(ts)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), ts)
    assert sampler.learned_variance == (name == "ddpm")
    assert sampler.thresholding == (0.95, config["sample_max_value"]) and sampler.clip_range is None
    # thresholding acted: some steps' quantile fell strictly between 1 and sample_max_value (stage I)
    q = r["quantiles"]
    assert q.shape == (m, SHAPE[0])
    smv = config["sample_max_value"]
    if smv > 1:
        assert ((q > 1) & (q < smv)).any()
    # the clamp of s is linearised: every quantile must be clear of its kinks at 1 and smv, by far
    # more than the two sides' x0 can differ (their final samples differ by ~1e-6 at most)
    assert np.min(np.minimum(np.abs(q - 1), np.abs(q - smv)) / np.maximum(q, 1)) > 1e-3

    spec = _host_spec(name, config, ref, steps)
    rows = _rows(name, ref, spec, eta)
    checked = _dpmpp_2m_rows(spec["sig"], _dpm_order1(ref.config, m)) if name == "dpmpp_2m" else rows
    for key_, table in sampler.tables.items():
        v = np.array([float(row[key_].v) for row in checked])
        d = np.array([float(row[key_].d) for row in checked])
        assert_within(np.asarray(table), v, d, f"our {key_} table")

    n_el = int(np.prod(SHAPE))
    tables = {k: (np.array([float(rw[k].v) for rw in rows]), np.array([float(rw[k].d) for rw in rows]))
              for k in rows[0]}
    state = {"x": r["latents"].reshape(-1).astype(np.float64)}  # init_noise_sigma = 1: exact
    state_err = {"x": np.zeros(n_el)}
    noise = np.stack([np.asarray(samplers.ancestral_noise(r["key"], k, SHAPE)).reshape(-1) for k in range(m)])
    per_step = {"noise": noise}
    if name == "ddpm":
        per_step["on"] = np.repeat((ts > 0).astype(np.float64)[:, None], n_el, axis=1)
    if name == "dpmpp_2m":
        tables.update({k: (tw.v, tw.d) for k, tw in _dpmpp_2m_tables(spec["sig"]).items()})
        sig = spec["sig"]
        per_step["order1"] = np.array([[float(first)] * n_el for first in _dpm_order1(ref.config, m)])
        per_step["zero"] = np.array([[float(sig.v[k + 1] == 0 and sig.d[k + 1] == 0)] * n_el for k in range(m)])
        state["m1"], state_err["m1"] = np.zeros(n_el), np.zeros(n_el)
    final, err = trajectory_bound(_step_fn(name, sampler, eta), state, state_err, tables, per_step, m)
    ours, expected = r["ours"].reshape(-1), r["ref"].reshape(-1)
    assert np.isfinite(ours).all() and np.abs(expected).max() > 1e-2
    bound = 2 * err  # each side within err of the exact trajectory
    assert_within(ours, expected, bound, "final sample, ours vs diffusers")
    assert_within(final["x"], expected, bound, "final sample, analysed formula vs diffusers")


# --------------------------------------------------------------------------------------------
# Unit checks: dynamic thresholding and the learned variance against diffusers' own functions.


def _reference_threshold(x_nhwc: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    ref = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    return ref._threshold_sample(_nchw(x_nhwc)).numpy().transpose(0, 2, 3, 1)


def test_threshold_rank_is_torchs():
    for n in (192, 105, 12288):
        for ratio in (0.95, 0.995, 0.9, 0.5, 0.0, 1.0):
            lo, hi, w = _torch_rank(ratio, n)
            got = torch.quantile(torch.arange(n, dtype=torch.float32)[None], ratio, dim=1).item()
            assert got == np.float32(lo + w) and hi == (lo if w == 0 else lo + 1), (n, ratio, got, lo, w)


@pytest.mark.parametrize("shape,ratio,max_value", [
    ((3, 8, 8, 3), 0.95, 1.5), ((3, 8, 8, 3), 0.995, 1.5), ((3, 5, 7, 3), 0.95, 2.0), ((3, 5, 7, 3), 0.9, 1.5)])
def test_threshold_exact_on_dyadic_values(shape, ratio, max_value):
    """|x| = k / 2^p (k = 1..n, n <= 192: at most 8 significant bits) times a power of two. The rank's
    weight w has at most 17 fractional bits, so w (above - below) is exact and below + w (above -
    below) spans at most 24 bits: exact in float32. torch and we then compute the same s bit for bit
    whether or not either side fuses the multiply-add; clamp and clip are exact and the division
    correctly rounded on both: equal bits. 2^p puts example 0's quantile in [1, 2) (checked in
    (1, max)); example 1 (scale 1/2) has s = 1, example 2 (scale 4) s = max."""
    b, n = shape[0], int(np.prod(shape[1:]))
    lo, hi, w = _torch_rank(ratio, n)
    den = np.float32(2 ** int(np.floor(np.log2(lo + 1))))
    rng = np.random.default_rng(0)
    out = []
    for scale in (1.0, 0.5, 4.0):
        k = rng.permutation(np.arange(1, n + 1)).astype(np.float32)
        out.append(k / den * np.float32(scale) * rng.choice([-1, 1], n).astype(np.float32))
    x = np.stack(out).astype(np.float32).reshape(shape)
    qs = np.sort(np.abs(x.reshape(b, -1)), axis=1)
    q = qs[:, lo] + w * (qs[:, hi] - qs[:, lo])
    assert 1 < q[0] < max_value and q[1] < 1 and q[2] > max_value, q
    ours = np.asarray(jax.jit(samplers.threshold_sample, static_argnums=(1, 2))(jnp.asarray(x), ratio, max_value))
    np.testing.assert_array_equal(ours, _reference_threshold(x, ratio, max_value))


@pytest.mark.parametrize("shape,ratio", [((3, 8, 8, 3), 0.95), ((3, 5, 7, 3), 0.95), ((3, 8, 8, 3), 0.995)])
def test_threshold_within_bound_on_random_values(shape, ratio):
    """General values: the sorted |x| are the same bits on both sides, (above - below) is one
    correctly rounded subtraction (exact: same on both), w * diff + below may be fused on either side
    (``same=False``): s is within the Twin radius on each side (at most 1 ulp apart), then clip is exact
    and the division correctly rounded."""
    max_value = 1.5
    b, n = shape[0], int(np.prod(shape[1:]))
    x = np.asarray(jax.random.normal(jax.random.key(3), shape))
    # rescale the examples so their quantiles are about 0.6 (s = 1), 1.25 and 4 (s = max_value)
    target = np.array([0.6, 1.25, 4.0])[:, None, None, None]
    x = (x * (target / np.quantile(np.abs(x).reshape(b, -1), ratio, axis=1)[:, None, None, None])).astype(np.float32)
    lo, hi, w = _torch_rank(ratio, n)
    srt = np.sort(np.abs(x.reshape(b, -1)), axis=1)
    below, above = Twin(srt[:, lo]), Twin(srt[:, hi])
    if w < 0.5:
        q = below.add((above - below).mul(np.float32(w), same=False), same=False)
    else:
        q = above.sub((above - below).mul(np.float32(1) - np.float32(w), same=False), same=False)
    assert q.v[0] < 1 < q.v[1] < max_value < q.v[2], q.v
    inside = (q.v - q.d > 1) & (q.v + q.d < max_value)
    edge = ((q.v + q.d >= 1) & (q.v - q.d <= 1)) | ((q.v + q.d >= max_value) & (q.v - q.d <= max_value))
    s = Twin(np.clip(q.v, 1, max_value), np.where(inside | edge, q.d, 0.0))
    flat = x.reshape(b, -1).astype(np.float64)
    sv, sd = s.v[:, None], s.d[:, None]
    clipped = Twin(np.clip(flat, -sv, sv), np.where(np.abs(flat) >= sv - sd, sd, 0.0) * np.ones_like(flat))
    expect = clipped.div(Twin(np.broadcast_to(sv, flat.shape), np.broadcast_to(sd, flat.shape)))
    ours = np.asarray(jax.jit(samplers.threshold_sample, static_argnums=(1, 2))(jnp.asarray(x), ratio, max_value))
    theirs = _reference_threshold(x, ratio, max_value)
    assert_within(ours.reshape(b, -1), expect.v, expect.d, "ours")
    assert_within(theirs.reshape(b, -1), expect.v, expect.d, "diffusers")
    assert np.abs(ours).max() <= 1.0


def test_threshold_nan_propagates_like_torch():
    x = np.ones((2, 4, 4, 3), np.float32)
    x[0, 1, 2, 0] = np.nan
    ours = np.asarray(samplers.threshold_sample(jnp.asarray(x), 0.95, 1.5))
    theirs = _reference_threshold(x, 0.95, 1.5)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.isnan(ours[0]).all() and not np.isnan(ours[1]).any()


@pytest.mark.parametrize("kind", ["learned_range", "learned"])
@pytest.mark.parametrize("steps", [10, 50])
def test_learned_variance_matches_get_variance(kind, steps):
    """The noise scale of every step against diffusers' DDPMScheduler._get_variance: learned_range's
    exp(0.5 * (frac * log beta_t + (1 - frac) * log clipped posterior variance)), learned's
    (variance) ** 0.5. Ours is read off a step with x = 0, epsilon = 0 and unit noise (x0 = 0, so
    the step returns exactly std * 1). Bound: the Twin of the formula (logs and exp: LIBM_ULP on
    each side, the sqrt: SQRT_ULP)."""
    config = {**IF_I, "variance_type": kind}
    sampler = samplers.make_sampler("ddpm", schedules.schedule_from_config(config), steps)
    ref = diffusers.DDPMScheduler.from_config(config)
    ref.set_timesteps(steps)
    shape = (1, 4, 4, 3)
    vals = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    if kind == "learned":
        vals = (vals + np.float32(1.5)) * np.float32(0.01)
    zero = jnp.zeros(shape, jnp.float32)
    step = jax.jit(lambda i, v: sampler.step({}, i, jnp.concatenate([zero, v], -1), zero, noise=jnp.ones(shape))[0])
    ac = Twin.measured(np.asarray(schedules.schedule_from_config(config).alphas_cumprod),
                       ref.alphas_cumprod.numpy())
    ts = ref.timesteps.numpy()
    v = Twin(vals.astype(np.float64))
    for k, t in enumerate(ts):
        ours = np.asarray(step(k, jnp.asarray(vals)))
        if t == 0:
            np.testing.assert_array_equal(ours, 0.0)  # no noise at t = 0, as diffusers
            continue
        theirs = ref._get_variance(int(t), predicted_variance=_nchw(vals)).numpy().transpose(0, 2, 3, 1)
        a_t, a_prev = ac[t], ac[ts[k + 1]] if k + 1 < len(ts) else Twin(np.float32(1.0))
        if kind == "learned":
            np.testing.assert_array_equal(theirs, vals)  # diffusers returns the model's value
            expect = v.sqrt(SQRT_ULP)
            theirs = np.asarray(torch.from_numpy(theirs) ** 0.5)
        else:
            cur_b = 1 - a_t / a_prev
            var = (1 - a_prev) / (1 - a_t) * cur_b
            var = Twin.where(var.v > 1e-20, var, Twin(np.float32(1e-20)))
            frac = (v + 1) / 2
            log_var = frac * cur_b.log() + (1 - frac) * var.log()
            assert_within(theirs, log_var.v, log_var.d, f"diffusers _get_variance (t={t})")
            expect = (0.5 * log_var).exp()
            theirs = np.asarray(torch.exp(0.5 * torch.from_numpy(theirs)))
        assert_within(ours, expect.v, expect.d, f"our std (t={t})")
        assert_within(theirs, expect.v, expect.d, f"diffusers std (t={t})")


# --------------------------------------------------------------------------------------------
# API: which samplers read the variance half, the split, and config validation.


def test_two_half_outputs_and_learned_variance_flag():
    """ddpm with a learned variance needs [eps, v]; every sampler takes [eps, v] and, unless it reads
    v, gives exactly what eps alone gives."""
    sched = schedules.schedule_from_config(IF_I)
    x = jax.random.normal(jax.random.key(0), SHAPE)
    out6 = jax_model6(x, jnp.int32(500))
    key = jax.random.key(2)
    for name in ("ddpm", "ddim", "dpmpp_2m", "euler", "euler_a"):
        sampler = samplers.make_sampler(name, sched, 10)
        assert sampler.learned_variance == (name == "ddpm"), name
        state = sampler.init_state(x)
        if sampler.learned_variance:
            with pytest.raises(ValueError, match="must hold the predicted variance too"):
                sampler.step(state, 0, out6[..., :3], x, key)
            continue
        with6 = np.asarray(sampler.step(state, 0, out6, x, key, eta=1.0)[0])
        with3 = np.asarray(sampler.step(state, 0, out6[..., :3], x, key, eta=1.0)[0])
        np.testing.assert_array_equal(with6, with3, err_msg=name)
    fixed = samplers.make_sampler("ddpm", sched, 10, variance_type="fixed_small")
    assert not fixed.learned_variance and fixed.thresholding == (0.95, 1.5)
    eps, var = samplers.split_model_output(out6, 3)
    np.testing.assert_array_equal(np.asarray(eps), np.asarray(out6[..., :3]))
    np.testing.assert_array_equal(np.asarray(var), np.asarray(out6[..., 3:]))
    same, none = samplers.split_model_output(out6[..., :3], 3)
    assert none is None and same.shape == (2, 8, 8, 3)


def test_thresholding_reaches_the_classes_that_have_it():
    """diffusers' DDPM, DDIM and DPM-Solver multistep read thresholding (replacing clip_sample); the
    Euler schedulers have no such setting. Options override the file as from_config does."""
    sched = schedules.schedule_from_config(IF_I)
    for name in ("ddpm", "ddim", "dpmpp_2m"):
        s = samplers.make_sampler(name, sched, 10)
        assert s.thresholding == (0.95, 1.5) and s.clip_range is None, name
    for name in ("euler", "euler_a"):
        assert samplers.make_sampler(name, sched, 10).thresholding is None
    off = samplers.make_sampler("ddim", sched, 10, thresholding=False)
    assert off.thresholding is None and off.clip_range == 1.0
    sd = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
          "clip_sample": False}
    on = samplers.make_sampler("ddim", schedules.schedule_from_config(sd), 10, thresholding=True,
                               dynamic_thresholding_ratio=0.9, sample_max_value=2.0)
    assert on.thresholding == (0.9, 2.0)
    cfg = schedules.SchedulerConfig.from_diffusers(IF_I)
    assert (cfg.thresholding, cfg.dynamic_thresholding_ratio, cfg.sample_max_value, cfg.variance_type) == \
        (True, 0.95, 1.5, "learned_range")
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.clip_sample) == ("leading", 0, True)


@pytest.mark.parametrize("key,value,fragments", [
    ("dynamic_thresholding_ratio", 1.5, ["dynamic_thresholding_ratio=1.5", "number in [0, 1]"]),
    ("dynamic_thresholding_ratio", "high", ["dynamic_thresholding_ratio='high'", "expected a number"]),
    ("sample_max_value", 0.0, ["sample_max_value=0.0", "positive"]),
    ("sample_max_value", None, ["sample_max_value=None", "expected a number"]),
    ("thresholding", "yes", ["thresholding='yes'", "true or false"]),
    ("variance_type", "fixed_large_log", ["variance_type='fixed_large_log'", "'learned_range'"]),
])
def test_invalid_threshold_and_variance_settings_raise(key, value, fragments):
    source = "IF-I/scheduler/scheduler_config.json"
    with pytest.raises(ConfigError) as info:
        schedules.SchedulerConfig.from_diffusers({**IF_I, key: value}, source=source)
    for fragment in [source] + fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
