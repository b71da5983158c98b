"""Float32 error bounds for the parity tests against PyTorch.

Two float32 implementations of one formula (ours: numpy on the host plus XLA on the device;
diffusers: torch) agree only up to rounding, and how each rounds depends on the CPU and on the
libraries' kernels: torch's CPU sqrt (MKL) is faithful but not correctly rounded, numpy's SIMD
float32 log / exp err by up to ~4 ulp, XLA contracts ``a * b + c`` into an FMA, torch's
DEFAULT-capability ``linspace`` rounds twice where its AVX2/AVX512 build fuses. A tolerance read
off one machine's output therefore fails on another. The bounds here follow from the arithmetic.

Rounding model (ulp(x): spacing of float32 at |x|; an error of k ulp is at most k * 2**-23 * |x|):

* ``+ - * /`` and float64 -> float32 conversion are correctly rounded (IEEE 754) in numpy, torch
  and XLA: error <= 0.5 ulp (``CR``). Applied to the same float32 operands they give the same bits
  on every machine (an FMA only removes a rounding, so it is not covered by this: operations one
  side may fuse are marked ``same=False``).
* ``SQRT_ULP = 1``: torch's CPU ``sqrt`` / ``** 0.5`` go through MKL's vector math, faithful
  (< 1 ulp, 0.75 observed), not correctly rounded; numpy's and XLA's sqrt are.
* ``LIBM_ULP = 4``: log, exp, sin, cos are correctly rounded nowhere; numpy's SIMD float32 log
  and exp are documented below 4 ulp (3.2 observed), Sleef / MKL (torch) and XLA below ~1.2 ulp.
* float64 host arithmetic (np.interp, the Karras ramp, ``_sigma_to_t``) errs by a few float64 ulp
  per operation, including libm's log / exp / pow: ``F64_REL = 2**-50`` relative per operation.
* torch's CPU ``cumprod`` of float32 accumulates in float64 (``at::acc_type<float, false>`` is
  double) and rounds each output once, as ``schedules.cumprod_f32`` does.

Two tools use it:

* :class:`Twin`: elementwise interval arithmetic for short host-side computations (beta schedules,
  sigma tables, timesteps). A Twin holds a value ``v`` and a radius ``d`` with the invariant that
  BOTH implementations' results lie in ``[v - d, v + d]``; ``d == 0`` means both hold the float32
  value ``v`` bit for bit. A correctly rounded operation on such operands keeps ``d == 0``;
  otherwise the radius propagates through a rigorous bound of the operation's derivative and the
  operation's own rounding is added. Checking each side against ``(v, d)`` also checks it against
  the formula (``v`` is the formula evaluated exactly on the operands), so a wrong formula fails.
* :func:`trajectory_bound`: first-order (linearised) forward error analysis of a multi-step
  elementwise recurrence (a sampler loop with an elementwise stand-in model). Interval arithmetic
  would lose the cancellation inside a step (``x - x0(x)``) and blow up geometrically over steps;
  instead the step's tensor operations are written once with :class:`F` values, every result is
  perturbed by a rounding variable ``e`` (``r * (1 + e)``, ``|e| <= ulps * 2**-23``), and one
  reverse pass through the whole loop gives the derivative of the final sample with respect to
  every rounding variable, every per-step scalar and the initial state. The bound is
  ``sum |derivative| * (bound of that variable or radius of that input)``: the worst case of the
  linearised error, with every correlation kept (a sigma read by two steps, the two state variables
  of a multistep solver). Second-order terms (products of two relative errors, ~1e-13) are covered
  by a 1e-3 relative margin. The per-step scalars are Twins: where both sides compute them with the
  same correctly rounded operations from the same bits (radius 0) they enter exactly, so the bound
  is on the distance to the exact loop run with those scalars, which both sides share.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Sequence

import numpy as np

CR = 0.5  # correctly rounded: error <= 0.5 ulp
SQRT_ULP = 1.0  # torch CPU sqrt / ** 0.5 (MKL): faithful
LIBM_ULP = 4.0  # log / exp / sin / cos in numpy, torch, XLA
ULP_REL = 2.0 ** -23  # ulp(x) <= ULP_REL * |x| for normal float32 x
F64_REL = 2.0 ** -50  # one float64 operation (libm functions included), relative
FIRST_ORDER_MARGIN = 1e-3  # relative slack for the neglected second-order terms


# ------------------------------------------------------------------------------------------
# ulp helpers


def ulp32(x) -> np.ndarray:
    """Spacing of float32 at |x| (float64; the smallest subnormal at 0): the ulp of any float32
    whose magnitude is at most |x|."""
    x = np.abs(np.asarray(x, np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        return np.spacing(x.astype(np.float32)).astype(np.float64)


def _ordered(a) -> np.ndarray:
    """float32 bit patterns as integers consecutive in float order (+0 and -0 both map to 0)."""
    bits = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def ulp_diff(a, b) -> np.ndarray:
    """Distance between float32 values in ulps: how many representable floats lie between them."""
    return np.abs(_ordered(a) - _ordered(b))


def _where(shape, flat_index: int) -> str:
    return str(np.unravel_index(flat_index, shape)) if shape else "()"


def assert_close_ulp(ours, ref, max_ulp: float, what: str) -> None:
    """Every element of ``ours`` within ``max_ulp`` float32 ulps of ``ref``."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    diff = ulp_diff(ours, ref)
    if diff.size and diff.max() > max_ulp:
        i = int(np.argmax(diff))
        raise AssertionError(f"{what}: {int((diff > max_ulp).sum())} of {diff.size} elements differ by more than "
                             f"{max_ulp} ulp; worst at {_where(diff.shape, i)}: {ours.flat[i]!r} vs "
                             f"{ref.flat[i]!r} ({int(diff.flat[i])} ulp)")


def assert_within(actual, center, radius, what: str) -> None:
    """|actual - center| <= radius elementwise (float64; equal infinities pass)."""
    actual = np.asarray(actual, np.float64)
    center, radius = np.broadcast_to(center, actual.shape), np.broadcast_to(radius, actual.shape)
    with np.errstate(invalid="ignore"):
        err = np.where(actual == center, 0.0, np.abs(actual - center))
    bad = ~(err <= radius)
    if bad.any():
        with np.errstate(all="ignore"):
            excess = np.where(radius > 0, err / np.where(radius > 0, radius, 1.0), np.inf)
        i = int(np.argmax(np.where(bad, np.nan_to_num(excess, nan=np.inf), -1.0)))
        a, c, r = actual.flat[i], center.flat[i], radius.flat[i]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements outside the bound; worst at "
            f"{_where(actual.shape, i)}: {a!r} vs {c!r}: |diff| = {abs(a - c):.4g} > bound {r:.4g} "
            f"(= {r / ulp32(c):.3g} ulp of the value)")


# ------------------------------------------------------------------------------------------
# Twin: both implementations within v +- d


def _scalar_like(x, f64: bool) -> "Twin":
    if isinstance(x, Twin):
        return x
    return Twin(np.asarray(x, np.float64 if f64 else np.float32), 0.0, f64=f64)


class Twin:
    """Both implementations' values of one quantity lie in ``[v - d, v + d]`` (elementwise).

    ``f64`` marks a quantity both sides hold in float64 (host numpy arithmetic); otherwise float32.
    Operators and methods evaluate the formula on ``v`` and bound the radius: propagated radius
    (rigorous, from the operation's derivative over the interval) plus the operation's own
    rounding (``ulps`` ulps of the result; ``F64_REL`` for float64). Where every operand has
    ``d == 0``, the operation is correctly rounded (``ulps <= CR``) and both sides execute it as
    that one operation (``same=True``), the result is exact: ``v`` is the float32 result and
    ``d == 0``."""

    __array_priority__ = 100  # numpy scalars on the left defer to Twin's reflected operators

    def __init__(self, v, d=0.0, f64: bool = False):
        self.v = np.asarray(v, np.float64)
        self.d = np.array(np.broadcast_to(np.asarray(d, np.float64), self.v.shape))
        self.f64 = f64

    @classmethod
    def measured(cls, ours, theirs, f64: bool = False) -> "Twin":
        """Two sides' actual values: centred on ours, radius their difference."""
        ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
        return cls(ours, np.abs(ours - theirs), f64=f64)

    @staticmethod
    def concat(parts: Sequence["Twin"]) -> "Twin":
        return Twin(np.concatenate([np.atleast_1d(p.v) for p in parts]),
                    np.concatenate([np.atleast_1d(p.d) for p in parts]), f64=all(p.f64 for p in parts))

    @staticmethod
    def where(cond, a: "Twin", b: "Twin") -> "Twin":
        return Twin(np.where(cond, a.v, b.v), np.where(cond, a.d, b.d), f64=a.f64 and b.f64)

    def __getitem__(self, idx) -> "Twin":
        return Twin(self.v[idx], self.d[idx], self.f64)

    def __len__(self) -> int:
        return len(self.v)

    @property
    def shape(self):
        return self.v.shape

    def __repr__(self) -> str:
        return f"Twin(v={self.v!r}, d={self.d!r}, f64={self.f64})"

    # -- core ---------------------------------------------------------------------------------

    def _finish(self, exact_fn, v64, dprop, ulps, same, exact_in) -> "Twin":
        """Result of an operation: exact where allowed, else v64 with radius dprop + rounding."""
        with np.errstate(all="ignore"):
            mag = np.abs(v64) + dprop
            rounding = F64_REL * mag if self.f64 else ulps * ulp32(mag)
            exact = exact_in & (ulps <= CR) & same
            if np.any(exact):
                vexact = exact_fn()
                v = np.where(exact, vexact, v64)
            else:
                v = v64
            return Twin(v, np.where(exact, 0.0, dprop + rounding), f64=self.f64)

    def _binary(self, other, op, dprop_fn, ulps=CR, same=True, reflect=False) -> "Twin":
        o = _scalar_like(other, self.f64)
        a, b = (o, self) if reflect else (self, o)
        dtype = np.float64 if self.f64 else np.float32
        with np.errstate(all="ignore"):
            v64 = op(a.v, b.v)
            dprop = dprop_fn(a, b, v64)
        out = Twin(v64, 0.0, self.f64)
        return out._finish(lambda: op(a.v.astype(dtype), b.v.astype(dtype)).astype(np.float64), v64, dprop,
                           ulps, same, (a.d == 0) & (b.d == 0))

    # -- arithmetic (rigorous radius propagation) ----------------------------------------------

    @staticmethod
    def _d_add(a, b, r):
        return a.d + b.d

    @staticmethod
    def _d_mul(a, b, r):
        return np.abs(a.v) * b.d + np.abs(b.v) * a.d + a.d * b.d

    @staticmethod
    def _d_div(a, b, r):
        den = np.abs(b.v) - b.d
        return np.where(den > 0, (a.d + np.abs(r) * b.d) / np.where(den > 0, den, 1.0), np.inf)

    def add(self, other, same=True, ulps=CR):
        return self._binary(other, np.add, self._d_add, ulps, same)

    def sub(self, other, same=True, ulps=CR):
        return self._binary(other, np.subtract, self._d_add, ulps, same)

    def mul(self, other, same=True, ulps=CR):
        return self._binary(other, np.multiply, self._d_mul, ulps, same)

    def div(self, other, same=True, ulps=CR):
        return self._binary(other, np.divide, self._d_div, ulps, same)

    __add__ = add
    __sub__ = sub
    __mul__ = mul
    __truediv__ = div

    def __radd__(self, other):
        return self._binary(other, np.add, self._d_add, reflect=True)

    def __rsub__(self, other):
        return self._binary(other, np.subtract, self._d_add, reflect=True)

    def __rmul__(self, other):
        return self._binary(other, np.multiply, self._d_mul, reflect=True)

    def __rtruediv__(self, other):
        return self._binary(other, np.divide, self._d_div, reflect=True)

    def __neg__(self):
        return Twin(-self.v, self.d, self.f64)

    def _unary(self, f, dprop, ulps, same=True) -> "Twin":
        dtype = np.float64 if self.f64 else np.float32
        with np.errstate(all="ignore"):
            v64 = f(self.v)
        return Twin(v64, 0.0, self.f64)._finish(lambda: f(self.v.astype(dtype)).astype(np.float64), v64, dprop,
                                                ulps, same, self.d == 0)

    def square(self, ulps=CR) -> "Twin":
        """x * x (torch's ``x ** 2`` multiplies): |x^2 - y^2| <= d (2|v| + d)."""
        return self._unary(np.square, self.d * (2 * np.abs(self.v) + self.d), ulps)

    def sqrt(self, ulps=CR) -> "Twin":
        v, d = self.v, self.d
        with np.errstate(all="ignore"):
            lo = np.sqrt(np.maximum(v - d, 0.0))
            dprop = np.minimum(np.sqrt(d), d / (np.sqrt(np.maximum(v, 0.0)) + lo))
            dprop = np.where(d == 0, 0.0, dprop)
        return self._unary(np.sqrt, dprop, ulps)

    def log(self, ulps=LIBM_ULP) -> "Twin":
        v, d = self.v, self.d
        with np.errstate(all="ignore"):
            dprop = np.where(d == 0, 0.0, np.where(d < v, -np.log1p(-d / np.where(v > 0, v, 1.0)), np.inf))
        return self._unary(np.log, dprop, ulps)

    def exp(self, ulps=LIBM_ULP) -> "Twin":
        with np.errstate(all="ignore"):
            dprop = np.where(self.d == 0, 0.0, np.exp(self.v) * np.expm1(self.d))
        return self._unary(np.exp, dprop, ulps)

    def cos(self, ulps=LIBM_ULP) -> "Twin":
        """cos (1-Lipschitz); its rounding also gets an absolute 2**-24 floor for results near 0."""
        out = self._unary(np.cos, np.where(self.d == 0, 0.0, np.minimum(self.d, 2.0)), ulps)
        return Twin(out.v, np.where(out.d == 0, 0.0, out.d + 2.0 ** -24), out.f64)

    def pow(self, p: float, ulps=LIBM_ULP) -> "Twin":
        """x ** p for x > 0 (libm pow): the derivative p x^(p-1) bounded over [v - d, v + d]."""
        v, d = self.v, self.d
        with np.errstate(all="ignore"):
            slope = np.abs(p) * np.maximum(np.maximum(v - d, 0.0) ** (p - 1), (v + d) ** (p - 1))
            dprop = np.where(d == 0, 0.0, slope * d)
        return self._unary(lambda x: x ** p, dprop, ulps)

    def maximum(self, floor: float) -> "Twin":
        """max(x, floor): 1-Lipschitz, exact."""
        return Twin(np.maximum(self.v, floor), self.d, self.f64)

    def max(self) -> "Twin":
        """The largest element: |max x - max y| <= max |x - y|."""
        return Twin(self.v.max(), self.d.max(), self.f64)

    def f32(self) -> "Twin":
        """float64 -> float32 conversion (correctly rounded); identity on a float32 Twin."""
        if not self.f64:
            return self
        v32 = self.v.astype(np.float32).astype(np.float64)
        rounding = CR * ulp32(np.abs(self.v) + self.d)
        return Twin(np.where(self.d == 0, v32, self.v), np.where(self.d == 0, 0.0, self.d + rounding), f64=False)

    def to_f64(self) -> "Twin":
        return Twin(self.v, self.d, f64=True)

    def cumprod(self) -> "Twin":
        """Cumulative product of non-negative factors as torch's CPU kernel and ``cumprod_f32`` compute
        it: a float64 running product, each output rounded to float32 once. Each side's output is within
        |prod(a) - prod(v)| <= prod(|v| + d) - prod(|v|), plus (t + 1) float64 roundings of the running
        product (2**-53 each, doubled for our own float64 evaluation of v), plus 0.5 ulp."""
        assert not self.f64 and np.all(self.v >= 0)
        with np.errstate(all="ignore"):
            v = np.cumprod(self.v)
            hi = np.cumprod(self.v + self.d)
            n = np.arange(1, len(v) + 1, dtype=np.float64)
            d = (hi - v) + n * 2.0 ** -52 * hi
            d = d + CR * ulp32(v + d)
        return Twin(v, d)

    def interp(self, x) -> "Twin":
        """``np.interp(x, arange(len), self)`` in float64 (both sides call it on their float32 table):
        a convex combination, so the radius is (1 - w) d[j] + w d[j + 1]; exact for an exact table."""
        x = np.asarray(x, np.float64)
        n = len(self.v)
        j = np.clip(np.floor(x).astype(np.int64), 0, n - 2)
        w = np.clip(x - j, 0.0, 1.0)
        v = np.interp(x, np.arange(n), self.v)
        d = (1 - w) * self.d[j] + w * self.d[j + 1]
        exact = (self.d[j] == 0) & (self.d[j + 1] == 0)
        return Twin(v, np.where(exact, 0.0, d + 4 * F64_REL * np.abs(v)), f64=True)


def assert_ints_from(frac: Twin, mode: str, ours, ref, what: str) -> None:
    """Integer timesteps made from fractional ones by ``np.round`` (mode "round") or an int cast
    ("trunc"; the values are >= 0). Where ``frac``'s interval holds no rounding boundary both sides
    must equal the integer of the formula; where it holds one (a value within its radius of k + 1/2,
    or of an integer for a cast) either neighbour is allowed: two correct implementations may differ."""
    f = np.round if mode == "round" else np.floor
    lo, hi = f(frac.v - frac.d), f(frac.v + frac.d)
    for side, vals in (("ours", ours), ("diffusers", ref)):
        vals = np.asarray(vals)
        bad = (vals < lo) | (vals > hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise AssertionError(f"{what} ({side}): {vals.tolist()} but the formula gives {lo.astype(int).tolist()}"
                                 f" (first mismatch at {i}: {int(vals[i])}, fractional value {frac.v[i]!r} "
                                 f"+- {frac.d[i]:.3g})")


def torch_linspace32(start: Twin | float, end: Twin | float, steps: int) -> Twin:
    """``torch.linspace(start, end, steps)`` in float32 (and ``schedules.torch_linspace_f32``):
    step = (end - start) / (steps - 1), then start + step * i for the first half and
    end - step * (steps - 1 - i) for the rest. The step is two correctly rounded operations; the
    multiply-add is fused in torch's AVX2/AVX512 build and in our emulation but rounded twice in
    the DEFAULT build, so it is not the same operation on both sides (``same=False``)."""
    start, end = _scalar_like(start, False), _scalar_like(end, False)
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float32)
    up = start.add(step.mul(Twin(i), same=False), same=False)
    down = end.sub(step.mul(Twin(np.float32(steps - 1) - i), same=False), same=False)
    return Twin.where(i < steps // 2, up, down)


# ------------------------------------------------------------------------------------------
# First-order error analysis of elementwise float32 recurrences (jax)

_HOOKS: list = []


class _Hooks:
    """Rounding variables of one evaluation: ``bounds`` lists each variable's bound; with ``eps``
    (zeros) given, each operation result r becomes r * (1 + e_rel) (+ e_abs where a floor is set)."""

    def __init__(self, eps=None):
        self.eps = eps
        self.bounds: list[float] = []

    def __call__(self, r, ulps: float, floor: float = 0.0):
        terms = [(ulps * ULP_REL, "rel")] + ([(floor, "abs")] if floor else [])
        for bound, kind in terms:
            k = len(self.bounds)
            self.bounds.append(bound)
            if self.eps is not None:
                r = r * (1 + self.eps[k]) if kind == "rel" else r + self.eps[k]
        return r


def _hook(r, ulps, floor=0.0):
    return _HOOKS[-1](r, ulps, floor) if _HOOKS else r


@contextlib.contextmanager
def _hooks(h: _Hooks):
    _HOOKS.append(h)
    try:
        yield h
    finally:
        _HOOKS.pop()


class F:
    """A float32 quantity in a formula under first-order rounding analysis (wraps a jnp array).

    Every arithmetic result passes through a rounding variable: ``CR`` for + - * /, ``SQRT_ULP``
    for sqrt, ``LIBM_ULP`` for log / exp / sin / cos (sin and cos also get an absolute 2**-24
    floor for results near zero). Python numbers are exact float32 constants (both torch and
    XLA convert a Python scalar operand to float32 before the operation)."""

    __slots__ = ("x",)
    __array_priority__ = 100

    def __init__(self, x):
        self.x = x

    @staticmethod
    def _of(o):
        return o.x if isinstance(o, F) else o

    def __add__(self, o):
        return F(_hook(self.x + F._of(o), CR))

    def __radd__(self, o):
        return F(_hook(F._of(o) + self.x, CR))

    def __sub__(self, o):
        return F(_hook(self.x - F._of(o), CR))

    def __rsub__(self, o):
        return F(_hook(F._of(o) - self.x, CR))

    def __mul__(self, o):
        return F(_hook(self.x * F._of(o), CR))

    def __rmul__(self, o):
        return F(_hook(F._of(o) * self.x, CR))

    def __truediv__(self, o):
        return F(_hook(self.x / F._of(o), CR))

    def __rtruediv__(self, o):
        return F(_hook(F._of(o) / self.x, CR))

    def __neg__(self):
        return F(-self.x)

    def square(self):
        return F(_hook(self.x * self.x, CR))

    def sqrt(self):
        """Faithful sqrt; exactly 0 at 0 with a zero derivative there (an exact 0 on both sides
        stays exact; a radius reaching 0 would need a non-linear bound, so the caller must not
        pass one)."""
        import jax.numpy as jnp
        pos = self.x > 0
        return F(_hook(jnp.where(pos, jnp.sqrt(jnp.where(pos, self.x, 1.0)), 0.0), SQRT_ULP))

    def log(self):
        import jax.numpy as jnp
        return F(_hook(jnp.log(self.x), LIBM_ULP))

    def exp(self):
        import jax.numpy as jnp
        return F(_hook(jnp.exp(self.x), LIBM_ULP))

    def sin(self):
        import jax.numpy as jnp
        return F(_hook(jnp.sin(self.x), LIBM_ULP, 2.0 ** -24))

    def cos(self):
        import jax.numpy as jnp
        return F(_hook(jnp.cos(self.x), LIBM_ULP, 2.0 ** -24))

    def clip(self, lo: float, hi: float):
        """Clamp (exact). For the error bound its derivative is taken as 1 everywhere: clamping is
        1-Lipschitz, so this is an upper bound even for elements at the edge."""
        import jax
        import jax.numpy as jnp
        return F(self.x + jax.lax.stop_gradient(jnp.clip(self.x, lo, hi) - self.x))

    @staticmethod
    def where(cond, a, b):
        import jax.numpy as jnp
        return F(jnp.where(cond, F._of(a), F._of(b)))


class Tables:
    """Per-step scalar tables inside a step: ``tab("name", offset)`` is entry k + offset (clamped to
    the table) of the table, broadcast over the elements, as an F value."""

    def __init__(self, tables, k):
        self.tables, self.k = tables, k

    def __call__(self, name: str, offset: int = 0) -> F:
        import jax.numpy as jnp
        table = self.tables[name]
        return F(table[jnp.clip(self.k + offset, 0, table.shape[0] - 1)])


def trajectory_bound(step: Callable, state: Mapping[str, np.ndarray], state_err: Mapping[str, np.ndarray],
                     tables: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     per_step: Mapping[str, np.ndarray], n_steps: int, output: str = "x"
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """First-order bound on |implementation - exact| of ``state[output]`` after ``n_steps`` steps.

    ``step(state: dict[str, F], tab: Tables, inp: dict[str, F]) -> dict[str, F]`` is elementwise over
    the state arrays (shape (N,)) and written like the reference formula, the same operations in the
    same order; its structure must not depend on the step. ``tables`` maps a name to (values,
    radii) of per-step scalars (shared by all elements; an entry may be read by several steps, e.g. a
    sigma as "next" in one step and "current" in the following); ``per_step`` maps a name to exact
    (n_steps, N) inputs (noise, flags); ``state_err`` bounds each initial state's error.

    The whole loop is differentiated at once (reverse mode through ``lax.scan``), so the bound is
    sum_i |d out / d input_i| * radius_i + sum_ops |d out / d e_op| * bound(e_op) with every
    correlation kept: errors carried in two state variables, or one table entry read by two steps,
    combine with their signs before the absolute value is taken. Returns (final state, bound)."""
    import jax
    import jax.numpy as jnp

    n_el = len(np.asarray(next(iter(state.values()))))
    names = list(state)
    tabs = {k: jnp.asarray(np.broadcast_to(np.asarray(v[0], np.float64)[:, None], (len(v[0]), n_el)),
                           jnp.float32) for k, v in tables.items()}
    inp = {k: jnp.asarray(v, jnp.float32) for k, v in per_step.items()}
    probe = _Hooks()
    with _hooks(probe):
        out = step({k: F(jnp.asarray(state[k], jnp.float32)) for k in names}, Tables(tabs, 0),
                   {k: F(v[0]) for k, v in inp.items()})
    assert set(out) == set(names), (sorted(out), names)
    n_hooks = len(probe.bounds)
    hook_bounds = jnp.asarray(probe.bounds, jnp.float32)

    def run(s0, tab_values, eps):
        def body(carry, xs):
            k, i, e = xs
            with _hooks(_Hooks(list(e))):
                o = step({n: F(v) for n, v in carry.items()}, Tables(tab_values, k),
                         {n: F(v) for n, v in i.items()})
            return {n: o[n].x for n in names}, None
        final, _ = jax.lax.scan(body, s0, (jnp.arange(n_steps), inp, eps))
        return final

    @jax.jit
    def analyse(s0, tab_values):
        eps = jnp.zeros((n_steps, n_hooks, n_el), jnp.float32)
        final, pull = jax.vjp(run, s0, tab_values, eps)
        g_s, g_tab, g_eps = pull({n: (jnp.ones_like(v) if n == output else jnp.zeros_like(v))
                                  for n, v in final.items()})
        return final, g_s, g_tab, g_eps

    s0 = {k: jnp.asarray(v, jnp.float32) for k, v in state.items()}
    final, g_s, g_tab, g_eps = analyse(s0, tabs)
    bound = sum(np.abs(np.asarray(g_s[k], np.float64)) * np.asarray(state_err[k], np.float64) for k in names)
    for k, (_, radius) in tables.items():
        radius = np.asarray(radius, np.float64)[:, None]
        g = np.abs(np.asarray(g_tab[k], np.float64))
        bound = bound + np.where(radius > 0, g * radius, 0.0).sum(axis=0)
    bound = bound + np.einsum("khn,h->n", np.abs(np.asarray(g_eps, np.float64)), np.asarray(hook_bounds, np.float64))
    bound = bound * (1 + FIRST_ORDER_MARGIN)
    assert np.all(np.isfinite(bound)), f"error bound of {output!r} is not finite"
    return {k: np.asarray(v) for k, v in final.items()}, bound
