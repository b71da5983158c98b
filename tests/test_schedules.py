"""Scheduler config parsing and noise-schedule arrays / forward-process functions vs diffusers."""

from __future__ import annotations

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_snr

from dreambooth_jax.diffusion import schedules
from dreambooth_jax.errors import ConfigError
from numerics import SQRT_ULP, Twin, assert_within, torch_linspace32

# Scheduler configs as real checkpoints ship them.
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
             "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
             "clip_sample": False}
SD21_DDIM = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
X4_SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.10.0", "beta_schedule": "scaled_linear",
                "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction", "num_train_timesteps": 1000,
                "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}
X4_LOW_RES = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.10.0", "beta_schedule": "linear",
              "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000, "variance_type": "fixed_small",
              "clip_sample": False, "trained_betas": None}
REAL_CONFIGS = {"sd15": SD15_PNDM, "sd21": SD21_DDIM, "x4": X4_SCHEDULER, "x4_low_res": X4_LOW_RES}


def test_real_configs_parse():
    sd15 = schedules.SchedulerConfig.from_diffusers(SD15_PNDM)
    assert (sd15.class_name, sd15.beta_schedule, sd15.prediction_type, sd15.steps_offset) == \
        ("PNDMScheduler", "scaled_linear", "epsilon", 1)
    assert sd15.timestep_spacing == "leading" and sd15.set_alpha_to_one is False  # PNDM's defaults / the file
    assert "timestep_spacing" not in sd15.explicit and "steps_offset" in sd15.explicit
    sd21 = schedules.schedule_from_config(SD21_DDIM)
    assert sd21.prediction_type == "v_prediction" and sd21.num_train_timesteps == 1000
    x4 = schedules.SchedulerConfig.from_diffusers(X4_SCHEDULER)
    assert (x4.beta_start, x4.beta_end, x4.clip_sample, x4.set_alpha_to_one) == (0.0001, 0.02, False, False)
    low = schedules.SchedulerConfig.from_diffusers(X4_LOW_RES)
    assert (low.class_name, low.variance_type, low.clip_sample, low.beta_schedule) == \
        ("DDPMScheduler", "fixed_small", False, "linear")


def _saved_config() -> dict:
    """A config as diffusers >= 0.2x saves it: every key, plus ``_use_default_values``."""
    return dict(diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        prediction_type="v_prediction", steps_offset=1).config)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                 "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("which", ["sd15", "sd21", "x4_low_res", "saved"])
def test_resolve_matches_diffusers_from_config(cls, which):
    """Reading a checkpoint's config for another scheduler class gives what ``Cls.from_config`` holds."""
    d = _saved_config() if which == "saved" else REAL_CONFIGS[which]
    ours = schedules.SchedulerConfig.from_diffusers(d).resolve(cls)
    ref = getattr(diffusers, cls).from_config(d).config
    assert set(ours) <= set(ref)
    for key, value in ours.items():
        expected = ref[key]
        if key == "trained_betas" and expected is not None:
            expected = tuple(expected)
        assert value == expected, (key, value, expected)


BETA_CONFIGS = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear_sd": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "scaled_linear_500": dict(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.03, num_train_timesteps=500),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "trained_betas": dict(trained_betas=np.linspace(1e-4, 0.03, 300).tolist(), num_train_timesteps=300),
}
ZERO_SNR_CONFIGS = {
    "zero_snr_scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   rescale_betas_zero_snr=True),
    "zero_snr_linear_500": dict(beta_schedule="linear", num_train_timesteps=500, rescale_betas_zero_snr=True),
    "zero_snr_cosine": dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
}


def _beta_spec(kw: dict) -> Twin:
    """The betas diffusers builds for ``kw`` before any zero-SNR rescale, as a Twin around the formula."""
    n = kw.get("num_train_timesteps", 1000)
    start, end = kw.get("beta_start", 0.0001), kw.get("beta_end", 0.02)
    if kw.get("trained_betas") is not None:
        # the same Python floats converted to float32 (correctly rounded): exact
        return Twin(np.asarray(kw["trained_betas"], np.float64).astype(np.float32))
    kind = kw.get("beta_schedule", "linear")
    if kind == "linear":
        return torch_linspace32(start, end, n)
    if kind == "scaled_linear":
        # linspace of the square roots (the same Python float expression on both sides), then x * x
        return torch_linspace32(start ** 0.5, end ** 0.5, n).square()
    assert kind == "squaredcos_cap_v2", kind
    # float64 Python arithmetic, then float32. abar(t) = cos(x)^2, x = (t + 0.008) / 1.008 * pi / 2,
    # from ~6 float64 operations (libm cos within 1 ulp): relative error <= 2**-50 (1 + 2 |x tan x|),
    # the argument's rounding amplified near x = pi / 2. Each side's float64 beta, and ours, are
    # within ratio * (both relative errors) + 2**-52 of the exact one; then one correctly rounded
    # conversion (min(., 0.999) only shrinks differences).
    def x_of(t: float) -> float:
        return (t + 0.008) / 1.008 * math.pi / 2
    i = np.arange(n)
    x1, x2 = x_of(i / n), x_of((i + 1) / n)
    ratio = np.cos(x2) ** 2 / np.cos(x1) ** 2
    v = np.minimum(1 - ratio, 0.999)
    rel = lambda x: 2.0 ** -50 * (1 + 2 * np.abs(x * np.tan(x)))  # noqa: E731
    d = ratio * (rel(x1) + rel(x2)) + 2.0 ** -52
    return Twin(v, d, f64=True).f32()


def _zero_snr(betas: Twin) -> Twin:
    """diffusers' rescale_zero_terminal_snr operation by operation: every step correctly rounded but
    the square root (torch: MKL, faithful); the cumulative product as ``Twin.cumprod`` says."""
    root = (1 - betas).cumprod().sqrt(SQRT_ULP)
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = root.square()
    return 1 - Twin.concat([bar[:1], bar[1:] / bar[:-1]])


def _check_schedule_arrays(kw: dict) -> None:
    """Our betas / alphas / alphas_cumprod and diffusers' against the float32 formula, stage by stage.

    Each stage starts from both sides' actual inputs (``Twin.measured``: centred on ours, radius the
    difference) and evaluates the formula with the rounding model of tests/numerics.py; both
    outputs must lie within the resulting radius. Stages: (1) betas before a rescale, against the
    exact schedule: linspace is within 1 ulp (its multiply-add is fused or not), a squared linspace
    within ~2.5 ulp, cosine and trained betas within 0.5 ulp; (2) the zero-SNR rescale: torch's
    faithful sqrt makes the two differ by ~1 ulp before the shift, scale, square and ratio amplify
    it (most near t = T, where sqrt(abar) - sqrt(abar_T) cancels); (3) alphas = 1 - betas, one
    correctly rounded subtraction: bit-equal where the betas are; (4) alphas_cumprod, float64
    accumulated and rounded once, so the bound is 0.5 ulp plus prod(1 + |d alpha_s| / alpha_s) - 1
    over the alphas that differ. Stages (3) and (4) also hold each side to the formula applied to
    their own inputs (then 0 and 0.5 ulp), so a wrong formula fails even where the two sides' inputs
    already differ; the cross-check of the two sides is what those input differences allow."""
    ours = schedules.schedule_from_config({"_class_name": "DDPMScheduler", **kw})
    ref = diffusers.DDPMScheduler(**kw)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == jnp.float32
    o = {name: np.asarray(getattr(ours, name)) for name in ("betas", "alphas", "alphas_cumprod")}
    r = {name: getattr(ref, name).numpy() for name in ("betas", "alphas", "alphas_cumprod")}

    def check(name: str, tw: Twin, o_val, r_val) -> None:
        assert_within(o_val, tw.v, tw.d, f"ours {name}")
        assert_within(r_val, tw.v, tw.d, f"diffusers {name}")

    spec = _beta_spec(kw)
    if kw.get("rescale_betas_zero_snr"):
        plain = {k: v for k, v in kw.items() if k != "rescale_betas_zero_snr"}
        ours_pre = schedules.betas_for(schedules.SchedulerConfig.from_diffusers({"_class_name": "DDPMScheduler",
                                                                                  **plain}))
        ref_pre = diffusers.DDPMScheduler(**plain).betas.numpy()
        check("betas before the rescale", spec, ours_pre, ref_pre)
        check("betas", _zero_snr(Twin.measured(ours_pre, ref_pre)), o["betas"], r["betas"])
    else:
        check("betas", spec, o["betas"], r["betas"])
    # (3) and (4) for each side from its own inputs (tight: bit-equal, then 0.5 ulp) ...
    for side, vals in (("ours", o), ("diffusers", r)):
        tw = 1 - Twin(vals["betas"])
        assert_within(vals["alphas"], tw.v, tw.d, f"{side} alphas from its betas")
        tw = Twin(vals["alphas"]).cumprod()
        assert_within(vals["alphas_cumprod"], tw.v, tw.d, f"{side} alphas_cumprod from its alphas")
    # ... and ours against diffusers, with the propagated difference of the inputs
    check("alphas", 1 - Twin.measured(o["betas"], r["betas"]), o["alphas"], r["alphas"])
    check("alphas_cumprod", Twin.measured(o["alphas"], r["alphas"]).cumprod(), o["alphas_cumprod"],
          r["alphas_cumprod"])


@pytest.mark.parametrize("kw", list(BETA_CONFIGS.values()), ids=list(BETA_CONFIGS))
def test_schedule_arrays_match_diffusers(kw):
    _check_schedule_arrays(kw)


@pytest.mark.parametrize("kw", list(ZERO_SNR_CONFIGS.values()), ids=list(ZERO_SNR_CONFIGS))
def test_zero_snr_schedule_matches_diffusers(kw):
    """Same stages, with the rescale between (1) and (3). torch's sqrt is not correctly rounded, so
    the rescaled betas differ in the last bits; the bound is what those bits can do downstream."""
    _check_schedule_arrays(kw)
    ours = schedules.schedule_from_config(kw)
    # zero terminal SNR: sqrt(abar_T) - sqrt(abar_T) is exactly 0 in IEEE arithmetic, hence bar_T,
    # alpha_T and alphas_cumprod[T] are exactly 0 on every machine
    assert float(ours.alphas_cumprod[-1]) == 0.0


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


def _forward_twins(ac: Twin, x0: Twin, noise: Twin) -> tuple[Twin, Twin, Twin, Twin]:
    """(sqrt(abar), sqrt(1 - abar), add_noise, get_velocity) as diffusers and ours compute them:
    faithful square roots (torch), correctly rounded products and sums that XLA may fuse into an FMA
    (``same=False``)."""
    sa, sb = ac.sqrt(SQRT_ULP), (1 - ac).sqrt(SQRT_ULP)
    noisy = sa.mul(x0, same=False).add(sb.mul(noise, same=False), same=False)
    velocity = sa.mul(noise, same=False).sub(sb.mul(x0, same=False), same=False)
    return sa, sb, noisy, velocity


@pytest.mark.parametrize("which", ["sd15", "sd21", "x4_low_res"])
def test_forward_process_matches_diffusers(which):
    """add_noise, get_velocity, training_target and compute_snr: both sides within the float32 bound
    of the formula (a few ulp of each product, ~1 ulp more for torch's sqrt), from each side's own
    alphas_cumprod (``Twin.measured``)."""
    d = REAL_CONFIGS[which]
    sched = schedules.schedule_from_config(d)
    ref = diffusers.DDPMScheduler.from_config(d)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (4, 8, 8, 4))
    noise = jax.random.normal(k2, (4, 8, 8, 4))
    t = jnp.array([0, 1, 500, 999], jnp.int32)
    fns = jax.jit(lambda s, x0, n, t: (schedules.add_noise(s, x0, n, t), schedules.get_velocity(s, x0, n, t),
                                       schedules.training_target(s, x0, n, t), schedules.snr(s, t)))
    noisy, vel, target, snr = fns(sched, x0, noise, t)
    tt = torch.from_numpy(np.array(t)).long()
    ref_noisy = _nhwc(ref.add_noise(_nchw(x0), _nchw(noise), tt))
    ref_vel = _nhwc(ref.get_velocity(_nchw(x0), _nchw(noise), tt))
    ac = Twin.measured(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy())[np.asarray(t)]
    sa, sb, noisy_tw, vel_tw = _forward_twins(ac[:, None, None, None], Twin(np.asarray(x0)), Twin(np.asarray(noise)))
    for what, tw, o, r in (("add_noise", noisy_tw, noisy, ref_noisy), ("get_velocity", vel_tw, vel, ref_vel)):
        assert_within(o, tw.v, tw.d, f"ours {what}")
        assert_within(r, tw.v, tw.d, f"diffusers {what}")
    snr_tw = (ac.sqrt(SQRT_ULP) / (1 - ac).sqrt(SQRT_ULP)).square()
    assert snr.shape == (4,)
    assert_within(snr, snr_tw.v, snr_tw.d, "ours snr")
    assert_within(compute_snr(ref, tt).numpy(), snr_tw.v, snr_tw.d, "diffusers compute_snr")
    if ref.config.prediction_type == "epsilon":
        np.testing.assert_array_equal(target, noise)  # the noise itself, no arithmetic
    else:
        assert_within(target, vel_tw.v, vel_tw.d, "ours v-prediction target")


def _x0_eps_twins(kind: str, sa: Twin, sb: Twin, target: Twin, noisy: Twin) -> tuple[Twin, Twin]:
    """predict_x0_and_eps / diffusers' DDIM formulas on Twins."""
    if kind == "epsilon":
        return (noisy.sub(sb.mul(target, same=False), same=False)) / sa, target
    if kind == "v_prediction":
        return (sa.mul(noisy, same=False).sub(sb.mul(target, same=False), same=False),
                sa.mul(target, same=False).add(sb.mul(noisy, same=False), same=False))
    return target, noisy.sub(sa.mul(target, same=False), same=False) / sb


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_and_x0_eps_inversion(prediction_type):
    """predict_x0_and_eps inverts the forward process for each prediction type, and its x0 is
    diffusers' DDIM ``pred_original_sample``. Bounds: the float32 error of noisy / target / x0
    propagated through the inversion (which divides by sqrt(abar) or sqrt(1 - abar): large at
    t = 990 for epsilon, at t = 10 for sample prediction)."""
    d = dict(SD15_PNDM, prediction_type=prediction_type)
    sched = schedules.schedule_from_config(d)
    k1, k2 = jax.random.split(jax.random.key(1))
    x0 = jax.random.normal(k1, (3, 4, 4, 4))
    noise = jax.random.normal(k2, (3, 4, 4, 4))
    t = jnp.array([10, 400, 990], jnp.int32)
    noisy = schedules.add_noise(sched, x0, noise, t)
    target = jax.jit(schedules.training_target)(sched, x0, noise, t)
    expected = {"epsilon": noise, "sample": x0,
                "v_prediction": schedules.get_velocity(sched, x0, noise, t)}[prediction_type]
    ac = Twin(np.asarray(sched.alphas_cumprod))[np.asarray(t)][:, None, None, None]
    sa, sb, noisy_tw, vel_tw = _forward_twins(ac, Twin(np.asarray(x0)), Twin(np.asarray(noise)))
    if prediction_type == "v_prediction":  # jit vs eager: one may fuse a*b + c into an FMA
        assert_within(target, vel_tw.v, vel_tw.d, "jitted v target")
        assert_within(expected, vel_tw.v, vel_tw.d, "eager v target")
        target_tw = vel_tw
    else:  # the noise or x0 itself, no arithmetic
        np.testing.assert_array_equal(target, expected)
        target_tw = Twin(np.asarray(expected))
    x0_hat, eps_hat = jax.jit(schedules.predict_x0_and_eps)(sched, target, noisy, t)
    x0_tw, eps_tw = _x0_eps_twins(prediction_type, sa, sb, target_tw, noisy_tw)
    # The formula inverts exactly up to fl(1 - abar) (both sides round it to float32, so the Twins
    # are centred on x0 and the noise times abar + fl(1 - abar) = 1 +- 2**-24).
    np.testing.assert_allclose(x0_tw.v, np.asarray(x0), rtol=2.0 ** -23, atol=1e-12)
    np.testing.assert_allclose(eps_tw.v, np.asarray(noise), rtol=2.0 ** -23, atol=1e-12)
    assert_within(x0_hat, x0_tw.v, x0_tw.d, "x0 recovered")
    assert_within(eps_hat, eps_tw.v, eps_tw.d, "noise recovered")
    # diffusers' DDIM x0 from the same inputs: the formula on exact operands, each side's own alphas_cumprod
    ref = diffusers.DDIMScheduler.from_config(d)
    ref.set_timesteps(50)
    ac_both = Twin.measured(np.asarray(sched.alphas_cumprod), ref.alphas_cumprod.numpy())[np.asarray(t)]
    ac_both = ac_both[:, None, None, None]
    x0_ddim, _ = _x0_eps_twins(prediction_type, ac_both.sqrt(SQRT_ULP), (1 - ac_both).sqrt(SQRT_ULP),
                               Twin(np.asarray(target)), Twin(np.asarray(noisy)))
    assert_within(x0_hat, x0_ddim.v, x0_ddim.d, "ours x0")
    for b in range(3):
        out = ref.step(_nchw(target[b:b + 1]), int(t[b]), _nchw(noisy[b:b + 1])).pred_original_sample
        assert_within(_nhwc(out), x0_ddim.v[b:b + 1], x0_ddim.d[b:b + 1], f"diffusers DDIM x0 (t={int(t[b])})")


SOURCE = "ckpt/scheduler/scheduler_config.json"


@pytest.mark.parametrize("key,value,fragments", [
    ("dynamic_thresholding_ratio", 1.5, ["dynamic_thresholding_ratio=1.5", "[0, 1]"]),
    ("beta_schedule", "sigmoid", ["beta_schedule='sigmoid'", "'linear', 'scaled_linear', 'squaredcos_cap_v2'"]),
    ("prediction_type", "flow_prediction",
     ["prediction_type='flow_prediction'", "'epsilon', 'v_prediction', 'sample'"]),
    ("timestep_spacing", "uniform", ["timestep_spacing='uniform'", "'leading', 'trailing', 'linspace'"]),
    ("variance_type", "fixed_large_log", ["variance_type='fixed_large_log'", "'fixed_small'"]),
    ("use_beta_sigmas", True, ["use_beta_sigmas=True", "supported: False"]),
    ("clip_sample", "yes", ["clip_sample='yes'", "true or false"]),
    ("num_train_timesteps", 0, ["num_train_timesteps=0", "positive integer"]),
    ("frobnicate", 3, ["unknown scheduler key 'frobnicate'", "keys we read"]),
])
def test_unsupported_values_raise(key, value, fragments):
    with pytest.raises(ValueError) as info:
        schedules.SchedulerConfig.from_diffusers({**SD15_PNDM, key: value}, source=SOURCE)
    assert isinstance(info.value, ConfigError)
    message = str(info.value)
    for fragment in [SOURCE] + fragments:
        assert fragment in message, (fragment, message)


def test_unknown_scheduler_class_raises():
    with pytest.raises(ConfigError) as info:
        schedules.schedule_from_config({**SD15_PNDM, "_class_name": "LMSDiscreteScheduler"}, source=SOURCE)
    message = str(info.value)
    assert "'LMSDiscreteScheduler'" in message and SOURCE in message
    for name in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                 "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        assert name in message


def test_trained_betas_length_must_match():
    with pytest.raises(ConfigError, match="trained_betas has 3 values but num_train_timesteps=1000"):
        schedules.SchedulerConfig.from_diffusers({**SD15_PNDM, "trained_betas": [0.1, 0.2, 0.3]})


def test_metadata_and_inert_keys_are_accepted():
    d = {**SD15_PNDM, "_name_or_path": "x", "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0,
         "thresholding": False, "eta": 0.0, "_use_default_values": ["steps_offset"]}
    cfg = schedules.SchedulerConfig.from_diffusers(d)
    assert cfg.steps_offset == 0  # listed in _use_default_values: the class default, as diffusers does
    assert "steps_offset" not in cfg.explicit
