"""Noise schedules of diffusers-layout checkpoints, and the pure forward-process functions.

A checkpoint's ``scheduler/scheduler_config.json`` is parsed into a :class:`SchedulerConfig`
(strictly: unknown keys and values we do not implement raise :class:`ConfigError`, a
``ValueError``). :func:`make_schedule` turns it into a :class:`NoiseSchedule` whose arrays are
the float32 ``betas`` / ``alphas`` / ``alphas_cumprod`` diffusers computes, to within a few ulp
(diffusers works in float32 torch, so we replay its float32 arithmetic in numpy rather than
computing in float64, whose cumulative product differs from diffusers' by up to ~5e-7). Not bit
for bit everywhere: torch's float32 sqrt is not correctly rounded (zero-SNR rescale) and its
linspace rounds once or twice depending on the CPU kernel; tests/numerics.py bounds what that
can do downstream.

The functions below (``add_noise``, ``get_velocity``, ``training_target``, ``snr``,
``predict_x0_and_eps``) are pure jnp, jit-able, and take NHWC arrays with (B,) int timesteps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dreambooth_jax.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Constructor defaults of the diffusers classes we implement, restricted to keys our math reads.
# diffusers' ``Cls.from_config(d)`` takes a key from ``d`` only when ``Cls.__init__`` has it, else
# its own default: ``SchedulerConfig.resolve`` reproduces that, so a PNDM config (SD 1.x) read by
# the Euler sampler gets Euler's "linspace" spacing unless the file names a spacing.
_SCHEDULE_DEFAULTS = MappingProxyType(dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
    prediction_type="epsilon", steps_offset=0))
# Dynamic thresholding (DDPM, DDIM, DPM-Solver multistep): off by default.
_THRESHOLD_DEFAULTS = MappingProxyType(dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0))
_SIGMA_DEFAULTS = MappingProxyType(dict(
    use_karras_sigmas=False, use_exponential_sigmas=False, final_sigmas_type="zero", timestep_spacing="linspace",
    rescale_betas_zero_snr=False))
CLASS_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "DDPMScheduler": MappingProxyType({
        **_SCHEDULE_DEFAULTS, **_THRESHOLD_DEFAULTS, "variance_type": "fixed_small", "clip_sample": True,
        "clip_sample_range": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": False}),
    "DDIMScheduler": MappingProxyType({
        **_SCHEDULE_DEFAULTS, **_THRESHOLD_DEFAULTS, "clip_sample": True, "clip_sample_range": 1.0,
        "set_alpha_to_one": True, "timestep_spacing": "leading", "rescale_betas_zero_snr": False}),
    "PNDMScheduler": MappingProxyType({
        **_SCHEDULE_DEFAULTS, "set_alpha_to_one": False, "timestep_spacing": "leading"}),
    "DPMSolverMultistepScheduler": MappingProxyType({
        **_SCHEDULE_DEFAULTS, **_SIGMA_DEFAULTS, **_THRESHOLD_DEFAULTS, "solver_order": 2,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
        "lambda_min_clipped": -math.inf, "variance_type": None}),
    "EulerDiscreteScheduler": MappingProxyType({
        **_SCHEDULE_DEFAULTS, **_SIGMA_DEFAULTS, "interpolation_type": "linear", "timestep_type": "discrete",
        "sigma_min": None, "sigma_max": None}),
    "EulerAncestralDiscreteScheduler": MappingProxyType({
        **_SCHEDULE_DEFAULTS, "timestep_spacing": "linspace", "rescale_betas_zero_snr": False}),
})
SUPPORTED_CLASSES = tuple(CLASS_DEFAULTS)

# How each key's value is checked: ("bool"|"int"|"float"|"opt_float"|"ratio"|"positive"|"betas"|"any", None)
# or ("choice", allowed values). A "choice" holding one value is a key we only implement at its default.
# "ratio": a number in [0, 1] (torch.quantile's q); "positive": a number > 0.
_SPEC: Mapping[str, tuple[str, tuple | None]] = MappingProxyType({
    "num_train_timesteps": ("int", None), "beta_start": ("float", None), "beta_end": ("float", None),
    "beta_schedule": ("choice", BETA_SCHEDULES), "trained_betas": ("betas", None),
    "prediction_type": ("choice", PREDICTION_TYPES), "timestep_spacing": ("choice", TIMESTEP_SPACINGS),
    "steps_offset": ("int", None), "clip_sample": ("bool", None), "clip_sample_range": ("float", None),
    "set_alpha_to_one": ("bool", None), "rescale_betas_zero_snr": ("bool", None),
    "thresholding": ("bool", None), "dynamic_thresholding_ratio": ("ratio", None),
    "sample_max_value": ("positive", None),
    # "fixed_large_log" stays refused: diffusers' DDPM step takes the square root of log(beta) < 0 (NaN)
    "variance_type": ("choice", ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range", None)),
    "use_karras_sigmas": ("bool", None), "use_exponential_sigmas": ("bool", None),
    "use_beta_sigmas": ("choice", (False,)), "use_lu_lambdas": ("choice", (False,)),
    "use_flow_sigmas": ("choice", (False,)),
    # The sampler name fixes the DPM-Solver variant ("dpmpp_2m": dpmsolver++, order 2, midpoint);
    # any value diffusers accepts is accepted here and then overridden.
    "solver_order": ("choice", (1, 2, 3)),
    "algorithm_type": ("choice", ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis")),
    "solver_type": ("choice", ("midpoint", "heun", "logrho", "bh1", "bh2")),
    "lower_order_final": ("bool", None), "euler_at_final": ("bool", None),
    "final_sigmas_type": ("choice", ("zero", "sigma_min")), "lambda_min_clipped": ("float", None),
    "interpolation_type": ("choice", ("linear", "log_linear")),
    "timestep_type": ("choice", ("discrete", "continuous")),
    "sigma_min": ("opt_float", None), "sigma_max": ("opt_float", None),
    # Accepted without effect: PNDM's PRK switch (we never run PNDM), flow-matching shift settings
    # (flow sigmas must be off), and eta, which diffusers takes as a step argument (ours: a traced
    # runtime value), never config.
    "skip_prk_steps": ("any", None), "flow_shift": ("any", None), "use_dynamic_shifting": ("any", None),
    "time_shift_type": ("any", None), "eta": ("any", None),
})


def _check_value(key: str, value: Any, source: str) -> Any:
    """The normalised value of ``key`` (JSON null counts as False for flags), or ConfigError."""
    if key not in _SPEC:
        raise ConfigError(f"{source}: unknown scheduler key {key!r} (value {value!r}); keys we read: "
                          f"{', '.join(sorted(_SPEC))}")
    kind, allowed = _SPEC[key]
    bad = f"{source}: {key}={value!r} is not supported"
    if kind == "any":
        return value
    if kind == "choice":
        if isinstance(allowed[0], bool) and value is None:
            value = False  # diffusers tests these flags for truthiness
        # compare types too: JSON true must not pass for solver_order 1, nor 0 for false
        if not any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed):
            raise ConfigError(f"{bad}; supported: {', '.join(repr(a) for a in allowed)}")
        return value
    if kind == "bool":
        if value is None:
            return False
        if not isinstance(value, bool):
            raise ConfigError(f"{bad}; expected true or false")
        return value
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "num_train_timesteps" else 0):
            raise ConfigError(f"{bad}; expected a {'positive' if key == 'num_train_timesteps' else 'non-negative'} "
                              "integer")
        return value
    if kind in ("float", "opt_float", "ratio", "positive"):
        if value is None and kind == "opt_float":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{bad}; expected a number" + (" or null" if kind == "opt_float" else ""))
        if kind == "ratio" and not 0 <= value <= 1:  # torch.quantile's q
            raise ConfigError(f"{bad}; expected a number in [0, 1] (the quantile of |x0| that dynamic "
                              "thresholding clips at)")
        if kind == "positive" and not 0 < value < math.inf:
            raise ConfigError(f"{bad}; expected a positive finite number")
        return float(value)
    # kind == "betas"
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in value):
        raise ConfigError(f"{bad}; expected null or a non-empty list of numbers")
    return tuple(float(b) for b in value)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A checkpoint's scheduler config. Each field holds the value the named class (``class_name``)
    would use: the file's value, else that class's default. ``explicit`` names the keys the file
    gave, so :meth:`resolve` can answer for another class as diffusers' ``from_config`` would; in a
    config built by hand (``explicit=None``) the fields that differ from these defaults count as given."""

    class_name: str = "DDPMScheduler"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    variance_type: str | None = "fixed_small"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    sigma_min: float | None = None
    sigma_max: float | None = None
    explicit: frozenset[str] | None = None
    source: str = "scheduler_config.json"

    @classmethod
    def from_diffusers(cls, d: Mapping[str, Any], source: str = "scheduler_config.json") -> "SchedulerConfig":
        """Parse a diffusers ``scheduler_config.json`` dict.

        Raises ConfigError (a ValueError) naming ``source``, the key, the value and what is supported
        when: ``_class_name`` is not one of SUPPORTED_CLASSES; a key is unknown; or a value is one we
        do not implement (``variance_type: "fixed_large_log"``, an unknown beta_schedule / prediction_type,
        ``use_beta_sigmas: true``, ...) or that is invalid (``dynamic_thresholding_ratio`` outside [0, 1],
        ``sample_max_value`` <= 0).
        Keys starting with ``_`` are metadata; those listed in ``_use_default_values`` count as absent
        (diffusers' from_config drops them too)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        class_name = d.get("_class_name", "DDPMScheduler")
        if class_name not in CLASS_DEFAULTS:
            raise ConfigError(f"{source}: _class_name={class_name!r} is not a scheduler we implement; supported: "
                              f"{', '.join(SUPPORTED_CLASSES)} (the class only selects defaults for keys the file "
                              "omits; the sampler is chosen separately)")
        defaulted = set(d.get("_use_default_values") or ())
        given = {k: _check_value(k, v, source) for k, v in d.items()
                 if not k.startswith("_") and k not in defaulted}
        if given.get("trained_betas") is not None and "num_train_timesteps" in given and \
                len(given["trained_betas"]) != given["num_train_timesteps"]:
            raise ConfigError(f"{source}: trained_betas has {len(given['trained_betas'])} values but "
                              f"num_train_timesteps={given['num_train_timesteps']}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"class_name", "explicit", "source"}
        values = {k: v for k, v in {**CLASS_DEFAULTS[class_name], **given}.items() if k in fields}
        if values.get("trained_betas") is not None:
            values["num_train_timesteps"] = len(values["trained_betas"])
        return cls(class_name=class_name, explicit=frozenset(given), source=source, **values)

    def resolve(self, class_name: str, overrides: Mapping[str, Any] | None = None,
                source: str = "sampler options") -> dict[str, Any]:
        """The settings ``class_name`` would hold after diffusers' ``from_config(<this file>, **overrides)``:
        for each key of that class, an override, else the file's value, else the class default.
        Overrides are validated like file values; one the class does not have raises ConfigError."""
        defaults = CLASS_DEFAULTS[class_name]
        given = self.explicit
        if given is None:
            given = frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)
        out = {k: (getattr(self, k) if k in given else v) for k, v in defaults.items()}
        out["num_train_timesteps"] = self.num_train_timesteps  # trained_betas may set it
        for k, v in (overrides or {}).items():
            if k not in defaults:
                raise ConfigError(f"{source}: option {k!r} does not apply to {class_name}; options it reads: "
                                  f"{', '.join(sorted(defaults))}")
            out[k] = _check_value(k, v, source)
        return out


@functools.partial(jax.tree_util.register_dataclass, data_fields=["betas", "alphas", "alphas_cumprod"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """betas, alphas = 1 - betas and alphas_cumprod, each (num_train_timesteps,) float32 and equal to
    diffusers' tensors; ``config`` is static. A pytree: pass it to jit or close over it."""

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    config: SchedulerConfig

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction_type(self) -> str:
        return self.config.prediction_type


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` as its AVX2/AVX-512 CPU kernel computes
    it, bit for bit (the generic kernel rounds twice: within 1 ulp of this): a float32
    step; the first half counts up from start, the second down from end, each value rounded once
    (a float32 x small-int product is exact in float64, so float64 then float32 emulates the fma)."""
    a, b = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([a], np.float32)
    step = np.float64((b - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = np.float64(a) + step * i
    down = np.float64(b) - step * (steps - 1 - i)
    return np.where(i < steps // 2, up, down).astype(np.float32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch's float32 cumprod on CPU: accumulated in float64, each output rounded to float32."""
    return np.cumprod(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """squaredcos_cap_v2: betas discretising alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2,
    in float64 like diffusers' Python loop, then float32."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
                    np.float64).astype(np.float32)


def _zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last step has zero SNR (arXiv 2305.08891, Alg. 1), in float32 like diffusers:
    shift sqrt(alphas_cumprod) so its last value is 0, scale so its first is unchanged, then undo the
    square root and the cumulative product."""
    root = np.sqrt(cumprod_f32(np.float32(1) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    bar = root * root
    alphas = np.concatenate([bar[:1], bar[1:] / bar[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


def betas_for(config: SchedulerConfig) -> np.ndarray:
    """The float32 betas diffusers builds for ``config`` (before any sampler-specific tweak)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, np.float64).astype(np.float32)
    elif config.beta_schedule == "linear":
        betas = torch_linspace_f32(config.beta_start, config.beta_end, n)
    elif config.beta_schedule == "scaled_linear":
        root = torch_linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, n)
        betas = root * root
    elif config.beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:  # from_diffusers already rejected it; kept for configs built by hand
        raise ConfigError(f"{config.source}: beta_schedule={config.beta_schedule!r} is not supported; "
                          f"supported: {', '.join(BETA_SCHEDULES)}")
    if config.rescale_betas_zero_snr:
        betas = _zero_terminal_snr(betas)
    return betas


def make_schedule(config: SchedulerConfig) -> NoiseSchedule:
    """The NoiseSchedule of ``config``: arrays equal to diffusers' float32 tensors."""
    betas = betas_for(config)
    alphas = (np.float32(1) - betas).astype(np.float32)
    return NoiseSchedule(jnp.asarray(betas), jnp.asarray(alphas), jnp.asarray(cumprod_f32(alphas)), config)


def schedule_from_config(d: Mapping[str, Any], source: str = "scheduler_config.json") -> NoiseSchedule:
    """``make_schedule(SchedulerConfig.from_diffusers(d, source))``."""
    return make_schedule(SchedulerConfig.from_diffusers(d, source))


def _per_example(values: jax.Array, timesteps: jax.Array, ndim: int) -> jax.Array:
    """values[timesteps] shaped (B, 1, ..., 1) to broadcast over an NHWC batch."""
    v = jnp.take(values, jnp.asarray(timesteps).reshape(-1), axis=0)
    return v.reshape((-1,) + (1,) * (ndim - 1))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """q(x_t | x_0): sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, per example; abar is cast to x0's
    dtype first, as diffusers' ``add_noise`` does."""
    ac = _per_example(schedule.alphas_cumprod.astype(x0.dtype), timesteps, x0.ndim)
    return jnp.sqrt(ac) * x0 + jnp.sqrt(1 - ac) * noise


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0 (diffusers' ``get_velocity``)."""
    ac = _per_example(schedule.alphas_cumprod.astype(x0.dtype), timesteps, x0.ndim)
    return jnp.sqrt(ac) * noise - jnp.sqrt(1 - ac) * x0


def training_target(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """What the model learns to output: noise (epsilon), the velocity (v_prediction) or x0 (sample)."""
    kind = schedule.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return get_velocity(schedule, x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise ConfigError(f"prediction_type {kind!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}")


def snr(schedule: NoiseSchedule, timesteps: jax.Array) -> jax.Array:
    """Signal-to-noise ratio (sqrt(abar) / sqrt(1 - abar))^2 per timestep, float32, shaped like
    ``timesteps`` (computed as diffusers' ``training_utils.compute_snr``, for min-SNR weighting)."""
    t = jnp.asarray(timesteps)
    ac = jnp.take(schedule.alphas_cumprod, t.reshape(-1), axis=0).reshape(t.shape)
    return (jnp.sqrt(ac) / jnp.sqrt(1.0 - ac)) ** 2


def predict_x0_and_eps(schedule: NoiseSchedule, model_output: jax.Array, sample: jax.Array,
                       timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x0, noise) implied by the model output at x_t = ``sample`` for the schedule's prediction
    type, by the formulas of diffusers' DDIM step. Undefined (inf/nan) where abar_t is 0 (zero-SNR
    last step) for epsilon, or 1 for sample prediction."""
    ac = _per_example(schedule.alphas_cumprod, timesteps, sample.ndim)
    a, s = jnp.sqrt(ac), jnp.sqrt(1 - ac)
    kind = schedule.prediction_type
    if kind == "epsilon":
        return (sample - s * model_output) / a, model_output
    if kind == "v_prediction":
        return a * sample - s * model_output, a * model_output + s * sample
    if kind == "sample":
        return model_output, (sample - a * model_output) / s
    raise ConfigError(f"prediction_type {kind!r} is not supported; supported: {', '.join(PREDICTION_TYPES)}")
