"""fitcli.quantiles: the normal and Student's t quantiles of the bands, without scipy, against
scipy.stats' ppf over a wide range of degrees of freedom and levels, and against a 40-digit
mpmath reference where scipy itself is not exact (close to the centre)."""

from __future__ import annotations

import mpmath
import pytest
from scipy import stats

from fitcli.quantiles import CORNISH_FISHER_DOF, norm_ppf, t_ppf

LEVELS = [0.01, 0.1, 0.3, 0.5, 0.6827, 0.9, 0.95, 0.99, 0.999, 0.9999, 1 - 1e-6, 1 - 1e-9]
DOFS = [
    1, 2, 3, 4, 5, 7, 9, 10, 11, 15, 20, 30, 50, 99, 100, 101, 150, 500, 997, 1000, 4999,
    CORNISH_FISHER_DOF, 10**4, 5 * 10**4, 10**5, 10**6, 10**7, 10**8,
]  # fmt: skip


def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("level", LEVELS)
def test_t_quantile_matches_scipy(level):
    p = 0.5 + level / 2
    for dof in DOFS:
        ours, ref = t_ppf(p, dof), float(stats.t.ppf(p, dof))
        assert relative(ours, ref) < 1e-12, (dof, level, ours, ref)
        assert t_ppf(1 - p, dof) == -t_ppf(1 - (1 - p), dof)  # the lower tail by symmetry


@pytest.mark.parametrize("level", [*LEVELS, 1e-6, 1 - 1e-12])
def test_normal_quantile_matches_scipy(level):
    p = 0.5 + level / 2
    assert relative(norm_ppf(p), float(stats.norm.ppf(p))) < 1e-13
    assert relative(norm_ppf(1 - p), float(stats.norm.ppf(1 - p))) < 1e-13


def t_reference(p: float, dof: int) -> mpmath.mpf:
    """t with P(T > t) = I_x(dof/2, 1/2) / 2 = 1 - p, x = dof/(dof+t^2), in the tail, or with
    P(|T| < t) = I_{1-x}(1/2, dof/2) = 2p - 1 near the centre, solved to 40 digits from
    scipy's value."""
    with mpmath.workdps(40):
        nu, q, c = mpmath.mpf(dof), 1 - mpmath.mpf(p), 2 * mpmath.mpf(p) - 1

        def tail(t):
            return mpmath.betainc(nu / 2, 0.5, 0, nu / (nu + t * t), regularized=True) / 2 - q

        def central(t):
            return mpmath.betainc(0.5, nu / 2, 0, t * t / (nu + t * t), regularized=True) - c

        start = mpmath.mpf(float(stats.t.ppf(p, dof))) or mpmath.mpf(1e-300)
        return mpmath.findroot(tail if p > 0.75 else central, start, tol=mpmath.mpf(10) ** -60)


@pytest.mark.parametrize("dof", [1, 2, 4, 6, 15, 200, 4999, CORNISH_FISHER_DOF, 10**9])
def test_t_quantile_matches_mpmath_near_the_centre_and_in_the_tails(dof):
    # Near the centre scipy's stdtrit loses digits (1e-4 relative at dof 4, level 1e-6); the
    # quantile from the central probability does not.
    for level in [1e-12, 1e-6, 0.05, 0.95, 1 - 1e-9]:
        p = 0.5 + level / 2
        assert relative(t_ppf(p, dof), t_reference(p, dof)) < 1e-13, (dof, level)


def test_bad_arguments_are_refused():
    for p in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            t_ppf(p, 3)
        with pytest.raises(ValueError):
            norm_ppf(p)
    with pytest.raises(ValueError):
        t_ppf(0.9, 0)
