"""Quantiles of the normal and Student's t distributions, without scipy.

`bands.quantile` needs one multiplier per band level; importing scipy.special for it costs a
quarter of a second of every run, longer than computing the bands. Both functions solve
``upper_tail(x) = 1 - p`` by Newton's method on the logarithm of the upper tail (well scaled far
into the tails), the tail computed to full double precision:

- normal: ``Q(z) = erfc(z / sqrt(2)) / 2`` (`math.erfc`);
- Student's t with ``nu`` degrees of freedom, for t > 0: ``Q(t) = I_x(nu/2, 1/2) / 2`` with
  ``x = nu / (nu + t^2)``, the regularized incomplete beta function by its continued fraction
  (modified Lentz), and ``1 - I_{1-x}(1/2, nu/2)`` where that converges faster. Above
  `CORNISH_FISHER_DOF` degrees of freedom the Cornish-Fisher expansion in ``1/nu`` (Abramowitz
  and Stegun 26.7.5, to ``1/nu^4``) is exact to double precision and is used as it is.

They agree with `scipy.stats.norm.ppf` and `scipy.stats.t.ppf` to 1e-12 relative
(tests/test_quantiles.py).
"""

from __future__ import annotations

import math

CORNISH_FISHER_DOF = 5_000  # from here on the expansion is exact to double precision
_SQRT2 = math.sqrt(2.0)
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def norm_ppf(p: float) -> float:
    """The standard normal quantile at `p`, 0 < p < 1 (scipy.special.ndtri)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability must be between 0 and 1 (got {p})")
    if p < 0.5:
        return -_norm_upper(p, 1.0 - 2.0 * p)
    return _norm_upper(1.0 - p, 2.0 * p - 1.0)  # both exact (Sterbenz)


def t_ppf(p: float, dof: float) -> float:
    """Student's t quantile at `p`, 0 < p < 1, with `dof` > 0 degrees of freedom
    (scipy.special.stdtrit)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability must be between 0 and 1 (got {p})")
    if not dof > 0:
        raise ValueError(f"degrees of freedom must be positive (got {dof})")
    if p < 0.5:
        return -_t_upper(p, 1.0 - 2.0 * p, float(dof))
    return _t_upper(1.0 - p, 2.0 * p - 1.0, float(dof))


def _norm_upper(q: float, c: float) -> float:
    """z >= 0 with Q(z) = q, 0 < q <= 1/2; c = 1 - 2q, the central probability P(|Z| < z), given
    exactly: near the centre z follows from c (erf), in the tail from q (erfc)."""
    if c == 0.0:
        return 0.0
    # Abramowitz and Stegun 26.2.23 (error below 4.5e-4) as the start.
    s = math.sqrt(-2.0 * math.log(q))
    z = s - (2.515517 + s * (0.802853 + s * 0.010328)) / (
        1.0 + s * (1.432788 + s * (0.189269 + s * 0.001308))
    )
    z = max(z, c * 1.2533141373155003)  # sqrt(pi/2) c: the centre's own first-order start
    log_q, log_c = math.log(q), math.log(c)
    for _ in range(60):
        density = math.exp(-0.5 * z * z - _LOG_SQRT_2PI)
        if z < 1.0:  # log P(|Z| < z), rising with z
            central = math.erf(z / _SQRT2)
            step = (log_c - math.log(central)) * central / (2.0 * density)
        else:  # log Q(z), falling with z
            tail = 0.5 * math.erfc(z / _SQRT2)
            step = (math.log(tail) - log_q) * tail / density
        if z + step <= 0:
            step = -0.5 * z
        z += step
        if abs(step) <= 4e-16 * abs(z):
            break
    return z


def _cornish_fisher(z: float, nu: float) -> float:
    """Abramowitz and Stegun 26.7.5: the t quantile from the normal one, in powers of 1/nu."""
    z2 = z * z
    g1 = (z2 + 1.0) * z / 4.0
    g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0
    g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0
    g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0
    return z + (g1 + (g2 + (g3 + g4 / nu) / nu) / nu) / nu


def _log_gamma_ratio(a: float) -> float:
    """log(Gamma(a) / Gamma(a + 1/2)), exact to about 1e-16 absolute for every a > 0 (a
    difference of `math.lgamma` values loses digits as they grow: Stirling's series is used
    for large a instead, its leading terms cancelled analytically)."""
    if a < 50.0:
        return math.lgamma(a) - math.lgamma(a + 0.5)

    def series(x: float) -> float:  # lgamma(x) - Stirling's leading terms
        x2 = x * x
        return (1 / 12 - (1 / 360 - (1 / 1260 - (1 / 1680) / x2) / x2) / x2) / x

    return 0.5 - a * math.log1p(0.5 / a) - 0.5 * math.log(a) + series(a) - series(a + 0.5)


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), without its prefactor."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) <= 3e-16:  # within an ulp of 1: converged
            break
    return h


def _t_parts(t: float, nu: float) -> tuple[bool, float]:
    """(True, Q(t)) in the tail, where the continued fraction of Q converges fast, else
    (False, P(|T| < t) = 1 - 2 Q(t)), each computed directly, for t > 0."""
    a = 0.5 * nu
    t2 = t * t
    # log of x^a (1-x)^(1/2) / B(a, 1/2), x = nu / (nu + t^2), each part without cancellation;
    # log B(a, 1/2) = lgamma(a) + lgamma(1/2) - lgamma(a + 1/2).
    log_front = (
        -a * math.log1p(t2 / nu)
        + 0.5 * math.log(t2 / (nu + t2))
        - _log_gamma_ratio(a)
        - 0.5 * math.log(math.pi)
    )
    x = nu / (nu + t2)
    if x < (a + 1.0) / (a + 2.5):
        return True, 0.5 * math.exp(log_front) * _betacf(a, 0.5, x) / a  # I_x(a, 1/2) / 2
    # P(|T| < t) = I_{1-x}(1/2, a)
    return False, math.exp(log_front) * _betacf(0.5, a, t2 / (nu + t2)) / 0.5


def _t_upper(q: float, c: float, nu: float) -> float:
    """t >= 0 with Q(t) = q, 0 < q <= 1/2; c = 1 - 2q exactly (see `_norm_upper`)."""
    if c == 0.0:
        return 0.0
    z = _norm_upper(q, c)
    if nu >= CORNISH_FISHER_DOF:
        return _cornish_fisher(z, nu)
    t = _cornish_fisher(z, nu) if nu >= 10 else z
    # log of the density's constant: Gamma((nu+1)/2) / (sqrt(nu pi) Gamma(nu/2))
    log_c0 = -_log_gamma_ratio(0.5 * nu) - 0.5 * math.log(nu * math.pi)
    log_q, log_c = math.log(q), math.log(c)
    for _ in range(200):
        density = math.exp(log_c0 - 0.5 * (nu + 1.0) * math.log1p(t * t / nu))
        in_tail, value = _t_parts(t, nu)
        if in_tail:  # log Q(t), falling with t
            step = (math.log(value) - log_q) * value / density
        else:  # log P(|T| < t), rising with t
            step = (log_c - math.log(value)) * value / (2.0 * density)
        if t + step <= 0:
            step = -0.5 * t  # stay on the positive side
        t += step
        if abs(step) <= 4e-16 * abs(t):
            break
    return t
