"""torch implementations of the expression language's special functions, with exact derivatives.

Where torch's own function is accurate in float64 and has an exact backward (``erf``,
``lgamma``, ``i0`` ...), `fitcli.expr.FUNCTION_TABLE` points at it directly. This module holds
the rest:

- functions torch lacks: ``gamma``, ``beta``, ``cbrt``, ``heaviside`` (torch's has no
  derivative), ``min``/``max``/``clip`` with the selected argument's derivative;
- functions whose torch backward is missing or inexact, as custom ``torch.autograd.Function``s
  with the exact derivative: ``j0' = -j1``, ``j1' = j0 - j1/u``, ``y0' = -y1``,
  ``y1' = y0 - y1/u``, ``k0' = -k1``, ``k1' = -k0 - k1/u``, ``digamma' = trigamma``,
  ``erfcx' = 2u erfcx(u) - 2/sqrt(pi)`` (its asymptotic series for large u, where that
  difference cancels), ``sigmoid' = sigmoid(u) sigmoid(-u)`` and ``expm1' = exp(u)`` (torch
  computes both from the rounded value, which loses them in the tails);
- functions whose torch values are not accurate to float64: ``j0``, ``j1``, ``y0``, ``y1``
  (torch's are good to about 1e-6 below 20; here Miller's backward recurrence with Neumann's
  series for Y, torch's own above 20), ``softplus`` (torch's switches to u above 20) and
  ``sinc`` (reduced exactly, ``sin(pi u) = (-1)^n sin(pi (u - n))``).

Every custom Function has a forward-mode rule (``jvp``) and a generated vmap rule, so
``torch.func.jacfwd`` / ``jacrev`` work through it, and its backward is built of
differentiable torch ops (the LM core differentiates a backward pass once more). Only torch
operations are used, so everything runs on CUDA too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "beta",
    "cbrt",
    "clip",
    "digamma",
    "erfcx",
    "expm1",
    "gamma",
    "heaviside",
    "j0",
    "j1",
    "k0",
    "k1",
    "maximum",
    "minimum",
    "sigmoid",
    "sinc",
    "softplus",
    "trigamma",
    "y0",
    "y1",
]

Tensor = torch.Tensor
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_EULER_GAMMA = 0.57721566490153286061


def _elementwise(
    name: str, value: Callable[[Tensor], Tensor], derivative: Callable[[Tensor, Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """``value`` as a one-argument autograd Function whose derivative is ``derivative(u, v)``."""

    def forward(u: Tensor) -> Tensor:
        return value(u)

    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        (u,) = inputs
        ctx.save_for_backward(u, output)
        ctx.save_for_forward(u, output)

    def backward(ctx: Any, g: Tensor) -> Tensor:
        u, v = ctx.saved_tensors
        return g * derivative(u, v)

    def jvp(ctx: Any, t: Tensor) -> Tensor:
        u, v = ctx.saved_tensors
        return t * derivative(u, v)

    cls = type(
        name,
        (torch.autograd.Function,),
        {
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        },
    )
    apply = cls.apply  # type: ignore[attr-defined]

    def fn(u: Tensor) -> Tensor:
        return apply(u)

    fn.__name__ = name
    return fn


def _ratio_near_zero(
    u: Tensor, numerator: Callable[[Tensor], Tensor], c2: float, c4: float, small: float = 1e-4
) -> Tensor:
    """``numerator(u) / u`` with the series ``1/2 + c2 u^2 + c4 u^4`` below ``small`` (the
    limit 1/2 at 0 for j1 and i1). Both branches are finite everywhere (no where-NaN trap)."""
    tiny = u.abs() < small
    safe = torch.where(tiny, torch.ones_like(u), u)
    u2 = u * u
    return torch.where(tiny, 0.5 + u2 * (c2 + c4 * u2), numerator(safe) / safe)


# --- Bessel functions of the first and second kind: J0, J1, Y0, Y1 ---------------------------

_MILLER_LIMIT = 20.0  # below: Miller's recurrence; above: torch's own (accurate there)
_MILLER_START = 80  # J_80(20) ~ 1e-39: starting the recurrence there costs no accuracy
_SERIES_LIMIT = 1e-5  # below: two terms of the power series


def _bessel_jy(u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """J0, J1, Y0, Y1 at u (Y is NaN below 0, -inf at 0)."""
    a = u.abs()
    mid = (a >= _SERIES_LIMIT) & (a < _MILLER_LIMIT)
    # Miller: J_{n-1} = (2n / a) J_n - J_{n+1} from J_{N+1} = 0, J_N = 1, normalised by
    # J0 + 2 (J2 + J4 + ...) = 1. Neumann's series give Y0 and Y1 from the same J_n:
    #   Y0 = (2/pi) (log(a/2) + gamma) J0 - (4/pi) sum_k (-1)^k J_2k / k
    #   Y1 = (2/pi) ((log(a/2) + gamma) J1 - J0 / a + sum_k (-1)^k (J_2k-1 - J_2k+1) / k)
    am = torch.where(mid, a, torch.ones_like(a))
    two_over = 2.0 / am
    j_next = torch.zeros_like(am)  # J_{n+1}
    j = torch.full_like(am, 1e-30)  # J_n
    norm = torch.zeros_like(am)
    s0 = torch.zeros_like(am)
    s1 = torch.zeros_like(am)
    one, down = am.new_tensor(1.0), am.new_tensor(1e-150 if am.dtype == torch.float64 else 1e-30)
    for n in range(_MILLER_START, 0, -1):
        j_prev = n * two_over * j - j_next  # J_{n-1}
        if n % 2 == 0:  # j is J_2k, j_prev is J_2k-1, j_next is J_2k+1 with k = n / 2
            k = n // 2
            sign = -1.0 if k % 2 else 1.0
            norm = norm + 2.0 * j
            s0 = s0 + (sign / k) * j
            s1 = s1 + (sign / k) * (j_prev - j_next)
        j_next, j = j, j_prev
        # Rescale where the recurrence grows large (small a: by up to 2n/a a step).
        scale = torch.where(j.abs() > 1 / down, down, one)
        j, j_next, norm, s0, s1 = j * scale, j_next * scale, norm * scale, s0 * scale, s1 * scale
    norm = norm + j  # + J0
    j0m, j1m = j / norm, j_next / norm
    log_term = torch.log(am / 2.0) + _EULER_GAMMA
    y0m = (2.0 / math.pi) * (log_term * j0m) - (4.0 / math.pi) * (s0 / norm)
    y1m = (2.0 / math.pi) * (log_term * j1m - j0m / am + s1 / norm)

    # power series near 0
    a2 = a * a
    log_small = torch.log(a / 2.0) + _EULER_GAMMA
    j0s = 1.0 - a2 / 4.0
    j1s = (a / 2.0) * (1.0 - a2 / 8.0)
    y0s = (2.0 / math.pi) * (log_small * j0s + a2 / 4.0)
    y1s = -2.0 / (math.pi * a) + (2.0 / math.pi) * log_small * (a / 2.0) - (a / 2.0) / math.pi

    small = a < _SERIES_LIMIT
    big_a = torch.where(mid | small, torch.full_like(a, _MILLER_LIMIT), a)
    j0 = torch.where(small, j0s, torch.where(mid, j0m, torch.special.bessel_j0(big_a)))
    j1 = torch.where(small, j1s, torch.where(mid, j1m, torch.special.bessel_j1(big_a)))
    y0 = torch.where(small, y0s, torch.where(mid, y0m, torch.special.bessel_y0(big_a)))
    y1 = torch.where(small, y1s, torch.where(mid, y1m, torch.special.bessel_y1(big_a)))
    nan = torch.full_like(a, math.nan)
    j0 = torch.where(torch.isnan(u), u, torch.where(torch.isinf(u), torch.zeros_like(u), j0))
    j1 = torch.where(torch.isnan(u), u, torch.where(torch.isinf(u), torch.zeros_like(u), j1))
    j1 = torch.where(u < 0, -j1, j1)
    y0 = torch.where(u < 0, nan, torch.where(u == 0, -math.inf, y0))
    y1 = torch.where(u < 0, nan, torch.where(u == 0, -math.inf, y1))
    y0 = torch.where(u == math.inf, torch.zeros_like(u), torch.where(torch.isnan(u), u, y0))
    y1 = torch.where(u == math.inf, torch.zeros_like(u), torch.where(torch.isnan(u), u, y1))
    return j0, j1, y0, y1


def _j0(u: Tensor) -> Tensor:
    return _bessel_jy(u)[0]


def _j1(u: Tensor) -> Tensor:
    return _bessel_jy(u)[1]


def _y0(u: Tensor) -> Tensor:
    return _bessel_jy(u)[2]


def _y1(u: Tensor) -> Tensor:
    return _bessel_jy(u)[3]


j0: Callable[[Tensor], Tensor] = _elementwise("j0", _j0, lambda u, v: -j1(u))
j1: Callable[[Tensor], Tensor] = _elementwise(
    "j1", _j1, lambda u, v: j0(u) - _ratio_near_zero(u, j1, -1 / 16, 1 / 384)
)
y0: Callable[[Tensor], Tensor] = _elementwise("y0", _y0, lambda u, v: -y1(u))
y1: Callable[[Tensor], Tensor] = _elementwise("y1", _y1, lambda u, v: y0(u) - v / u)

# --- modified Bessel functions of the second kind (torch's values are exact, no backward) -----

k0: Callable[[Tensor], Tensor] = _elementwise(
    "k0", torch.special.modified_bessel_k0, lambda u, v: -k1(u)
)
k1: Callable[[Tensor], Tensor] = _elementwise(
    "k1", torch.special.modified_bessel_k1, lambda u, v: -k0(u) - v / u
)

# --- gamma family ---------------------------------------------------------------------------


def trigamma(u: Tensor) -> Tensor:
    """psi'(u) = sum_k 1 / (u + k)^2: ten terms, then the asymptotic series at u + 10; below
    0.5 the reflection psi'(1 - u) + psi'(u) = pi^2 / sin^2(pi u)."""
    reflect = u < 0.5
    z = torch.where(reflect, 1.0 - u, u)
    total = torch.zeros_like(z)
    for k in range(10):
        total = total + 1.0 / ((z + k) * (z + k))
    w = z + 10.0
    r = 1.0 / w
    r2 = r * r
    # 1/w + 1/(2w^2) + 1/(6w^3) - 1/(30w^5) + 1/(42w^7) - 1/(30w^9) + 5/(66w^11) - 691/(2730w^13)
    tail = r2 * (
        1.0 / 6
        + r2 * (-1.0 / 30 + r2 * (1.0 / 42 + r2 * (-1.0 / 30 + r2 * (5.0 / 66 - r2 * 691 / 2730))))
    )
    total = total + r + 0.5 * r2 + r * tail
    s = _sin_pi(torch.where(reflect, u, torch.full_like(u, 0.5)))
    return torch.where(reflect, math.pi**2 / (s * s) - total, total)


digamma: Callable[[Tensor], Tensor] = _elementwise(
    "digamma", torch.special.digamma, lambda u, v: trigamma(u)
)


def _gamma_sign(u: Tensor) -> Tensor:
    # Gamma(u) < 0 for u in (-1, 0), (-3, -2), ...: an odd ceil(-u) below 0.
    negative_odd = (u < 0) & (torch.remainder(torch.ceil(-u), 2.0) == 1.0)
    return torch.where(negative_odd, u.new_tensor(-1.0), u.new_tensor(1.0))


def gamma(u: Tensor) -> Tensor:
    """Gamma(u) = sign * exp(log|Gamma(u)|); its derivative, by autograd, Gamma(u) psi(u)."""
    return _gamma_sign(u.detach()) * torch.exp(torch.lgamma(u))


def beta(a: Tensor, b: Tensor) -> Tensor:
    """B(a, b) = Gamma(a) Gamma(b) / Gamma(a + b); d/da = B (psi(a) - psi(a + b))."""
    a, b = torch.broadcast_tensors(a, b)
    sign = _gamma_sign(a.detach()) * _gamma_sign(b.detach()) * _gamma_sign((a + b).detach())
    return sign * torch.exp(torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))


# --- error function family ----------------------------------------------------------------

_ERFCX_ASYMPTOTIC = 50.0


def _erfcx_derivative(u: Tensor, v: Tensor) -> Tensor:
    # 2u erfcx(u) - 2/sqrt(pi) cancels for large u; there its series
    # -(1 / (sqrt(pi) u^2)) sum_n (-1)^n (2n+1)!! / (2u^2)^n.
    large = u > _ERFCX_ASYMPTOTIC
    w = torch.where(large, u, torch.full_like(u, _ERFCX_ASYMPTOTIC))
    q = 1.0 / (2.0 * w * w)
    series = torch.ones_like(w)
    term = torch.ones_like(w)
    for n in range(1, 9):
        term = term * (-(2 * n + 1)) * q
        series = series + term
    asymptotic = -series / (math.sqrt(math.pi) * w * w)
    return torch.where(large, asymptotic, 2.0 * u * v - _TWO_OVER_SQRT_PI)


erfcx: Callable[[Tensor], Tensor] = _elementwise("erfcx", torch.special.erfcx, _erfcx_derivative)

# --- logistic, exponential and friends -----------------------------------------------------

sigmoid: Callable[[Tensor], Tensor] = _elementwise(
    "sigmoid", torch.sigmoid, lambda u, v: v * torch.sigmoid(-u)
)
expm1: Callable[[Tensor], Tensor] = _elementwise("expm1", torch.expm1, lambda u, v: torch.exp(u))


def _softplus(u: Tensor) -> Tensor:
    # log(1 + exp(u)) = max(u, 0) + log1p(exp(-|u|)), accurate in both tails
    return torch.clamp(u, min=0) + torch.log1p(torch.exp(-u.abs()))


softplus: Callable[[Tensor], Tensor] = _elementwise(
    "softplus", _softplus, lambda u, v: torch.sigmoid(u)
)


def _sin_pi(u: Tensor) -> Tensor:
    """sin(pi u), reduced exactly: (-1)^n sin(pi (u - n)) with n = round(u)."""
    n = torch.round(u)
    odd = torch.remainder(n, 2.0) == 1.0
    s = torch.sin(math.pi * (u - n))
    return torch.where(odd, -s, s)


def _cos_pi(u: Tensor) -> Tensor:
    n = torch.round(u)
    odd = torch.remainder(n, 2.0) == 1.0
    c = torch.sin(math.pi * (0.5 - (u - n).abs()))  # cos(pi r) = sin(pi (1/2 - |r|)): 0 at 1/2
    return torch.where(odd, -c, c)


_SINC_SERIES = 0.25  # below: the Taylor series of the derivative (the formula cancels there)


def _sinc(u: Tensor) -> Tensor:
    zero = u == 0
    safe = torch.where(zero, torch.ones_like(u), u)
    return torch.where(zero, torch.ones_like(u), _sin_pi(safe) / (math.pi * safe))


def _sinc_derivative(u: Tensor, v: Tensor) -> Tensor:
    # (cos(pi u) - sinc(u)) / u, or near 0 its series pi * sum_k (-1)^k 2k z^(2k-1) / (2k+1)!
    # with z = pi u.
    small = u.abs() < _SINC_SERIES
    safe = torch.where(small, torch.ones_like(u), u)
    formula = (_cos_pi(safe) - _sinc(safe)) / safe
    z = math.pi * torch.where(small, u, torch.zeros_like(u))
    z2 = z * z
    series = torch.zeros_like(z)
    for k in range(10, 0, -1):
        series = series * z2 + (-1) ** k * 2 * k / math.factorial(2 * k + 1)
    return torch.where(small, math.pi * z * series, formula)


sinc: Callable[[Tensor], Tensor] = _elementwise("sinc", _sinc, _sinc_derivative)


def _cbrt(u: Tensor) -> Tensor:
    y = torch.sign(u) * u.abs().pow(1.0 / 3.0)
    # one Newton step: pow's rounded exponent 1/3 costs up to 1e-14 at extreme |u|
    finite = torch.isfinite(y) & (y != 0)
    safe = torch.where(finite, y, torch.ones_like(y))
    return torch.where(finite, safe - (safe - u / (safe * safe)) / 3.0, y)


cbrt: Callable[[Tensor], Tensor] = _elementwise("cbrt", _cbrt, lambda u, v: 1.0 / (3.0 * v * v))


def heaviside(u: Tensor) -> Tensor:
    """0 below 0, 1 above, 1/2 at 0 (NaN stays NaN); derivative 0."""
    return torch.where(torch.isnan(u), u, 0.5 * (torch.sign(u) + 1.0))


# --- selections: the selected argument's derivative -----------------------------------------


def _max2(a: Tensor, b: Tensor) -> Tensor:
    # The first argument on ties; NaN in either gives NaN.
    return torch.where((a >= b) | torch.isnan(a), a, b)


def _min2(a: Tensor, b: Tensor) -> Tensor:
    return torch.where((a <= b) | torch.isnan(a), a, b)


def maximum(*args: Tensor) -> Tensor:
    """max(a, b, ...): the largest, the first of equals; its derivative is that argument's."""
    result = args[0]
    for arg in args[1:]:
        result = _max2(result, arg)
    return result


def minimum(*args: Tensor) -> Tensor:
    """min(a, b, ...): the smallest, the first of equals; its derivative is that argument's."""
    result = args[0]
    for arg in args[1:]:
        result = _min2(result, arg)
    return result


def clip(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """v inside [lo, hi], else the bound it passed (v's derivative inside, the bound's outside)."""
    return _min2(_max2(v, lo), hi)
