"""Scheduler config parsing and noise-schedule arrays / forward-process functions vs diffusers."""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.training_utils import compute_snr

from dreambooth_jax.diffusion import schedules
from dreambooth_jax.errors import ConfigError

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


def _array_errors(kw: dict) -> dict[str, float]:
    ours = schedules.schedule_from_config({"_class_name": "DDPMScheduler", **kw})
    ref = diffusers.DDPMScheduler(**kw)
    for name in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, name).dtype == jnp.float32
    return {name: float(np.abs(np.asarray(getattr(ours, name)) - getattr(ref, name).numpy()).max())
            for name in ("betas", "alphas", "alphas_cumprod")}


@pytest.mark.parametrize("kw", list(BETA_CONFIGS.values()), ids=list(BETA_CONFIGS))
def test_schedule_arrays_match_diffusers(kw):
    errors = _array_errors(kw)
    assert max(errors.values()) <= 1e-7, errors


@pytest.mark.parametrize("kw", list(ZERO_SNR_CONFIGS.values()), ids=list(ZERO_SNR_CONFIGS))
def test_zero_snr_schedule_matches_diffusers(kw):
    """The rescale runs in float32 like diffusers, but torch's float32 sqrt (MKL) is not always
    correctly rounded; a 1-ulp sqrt difference becomes a few ulp in alphas = bar[t] / bar[t-1]."""
    errors = _array_errors(kw)
    assert errors["alphas_cumprod"] <= 2e-7 and errors["betas"] <= 2e-6, errors
    ours = schedules.schedule_from_config(kw)
    assert float(ours.alphas_cumprod[-1]) == 0.0  # zero terminal SNR


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(0, 2, 3, 1)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("which", ["sd15", "sd21", "x4_low_res"])
def test_forward_process_matches_diffusers(which):
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
    assert _rel(noisy, ref_noisy) <= 1e-6 and _rel(vel, ref_vel) <= 1e-6
    assert _rel(snr, compute_snr(ref, tt).numpy()) <= 1e-6 and snr.shape == (4,)
    expected = {"epsilon": noise, "v_prediction": ref_vel}[ref.config.prediction_type]
    assert _rel(target, expected) <= 1e-6


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_target_and_x0_eps_inversion(prediction_type):
    """predict_x0_and_eps inverts the forward process for each prediction type, and its x0 is
    diffusers' DDIM ``pred_original_sample``."""
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
    assert _rel(target, expected) <= 1e-6  # jit may fuse a*b + c into an FMA: not always bit-equal
    x0_hat, eps_hat = jax.jit(schedules.predict_x0_and_eps)(sched, target, noisy, t)
    assert _rel(x0_hat, x0) <= 2e-5 and _rel(eps_hat, noise) <= 2e-5
    ref = diffusers.DDIMScheduler.from_config(d)
    ref.set_timesteps(50)
    for b in range(3):
        out = ref.step(_nchw(target[b:b + 1]), int(t[b]), _nchw(noisy[b:b + 1])).pred_original_sample
        assert _rel(x0_hat[b:b + 1], _nhwc(out)) <= 1e-6


SOURCE = "ckpt/scheduler/scheduler_config.json"


@pytest.mark.parametrize("key,value,fragments", [
    ("thresholding", True, ["thresholding=True", "supported: False"]),
    ("beta_schedule", "sigmoid", ["beta_schedule='sigmoid'", "'linear', 'scaled_linear', 'squaredcos_cap_v2'"]),
    ("prediction_type", "flow_prediction",
     ["prediction_type='flow_prediction'", "'epsilon', 'v_prediction', 'sample'"]),
    ("timestep_spacing", "uniform", ["timestep_spacing='uniform'", "'leading', 'trailing', 'linspace'"]),
    ("variance_type", "learned_range", ["variance_type='learned_range'", "'fixed_small'"]),
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
