"""Whole-trajectory parity of our jitted samplers against diffusers' PyTorch schedulers.

A deterministic stand-in model (the same formula in torch and jnp) replaces the UNet; both sides
start from the same latents, and the ancestral noise our step draws for step i is fed to the
diffusers scheduler through its module's ``randn_tensor``.
"""

from __future__ import annotations

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete

from dreambooth_jax.diffusion import samplers, schedules
from dreambooth_jax.errors import ConfigError

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
# Euler on a zero-terminal-SNR schedule starts at sigma = 4096: step 0 cancels ~1e4-sized terms
# down to ~50, so one float32 rounding there (XLA fuses x + d * dt into an FMA, torch rounds twice)
# moves the output by ~1e-5 of its size. For it the error is measured against the trajectory's
# peak magnitude, where the rounding happens.
PEAK_SCALED = {"euler-zero-snr"}


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
    return {"ours": ours, "ref": x.numpy().transpose(0, 2, 3, 1), "sampler": sampler, "scheduler": ref,
            "peak": float(np.abs(latents).max() * ref.init_noise_sigma)}


@pytest.mark.parametrize("case_id,name,config,steps,eta,options", CASES, ids=[c[0] for c in CASES])
def test_trajectory_matches_diffusers(case_id, name, config, steps, eta, options):
    r = run_case(name, config, steps, eta, options)
    sampler, ref = r["sampler"], r["scheduler"]
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), ref.timesteps.numpy())
    assert sampler.num_steps == len(ref.timesteps)
    np.testing.assert_allclose(sampler.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
    ours, expected = r["ours"], r["ref"]
    assert np.isfinite(ours).all() and np.abs(expected).max() > 1e-2  # a real trajectory, not zeros
    scale = max(1.0, float(np.abs(expected).max()))
    if case_id in PEAK_SCALED:
        scale = max(scale, r["peak"])
    err = float(np.abs(ours - expected).max())
    assert err <= 1e-5 * scale, (err, scale)


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
    np.testing.assert_array_equal(np.asarray(samplers.make_sampler("dpmpp_2m", sched, 12).timesteps),
                                  ref.timesteps.numpy())
    plain = samplers.make_sampler("dpmpp_2m", sched, 12, use_karras_sigmas=False)
    assert not np.array_equal(np.asarray(plain.timesteps), ref.timesteps.numpy())


def test_hand_built_config_settings_count_as_given():
    cfg = schedules.SchedulerConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                    prediction_type="v_prediction", timestep_spacing="trailing")
    sampler = samplers.make_sampler("euler", schedules.make_schedule(cfg), 10)
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                           prediction_type="v_prediction", timestep_spacing="trailing")
    ref.set_timesteps(10)
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), ref.timesteps.numpy())
    assert sampler.prediction_type == "v_prediction"
