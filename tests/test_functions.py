"""The expression language's special functions against independent references.

Values and first derivatives of the torch path (`fitcli.special`, torch.special) and of the
numpy path (`fitcli.symdiff`, scipy.special) against mpmath at 30 digits (mpmath comes with
torch, through sympy) and scipy, on grids that include large arguments, tiny ones, 0 and branch
points. Near a zero of an oscillating function a relative error means nothing, so the Bessel
functions are measured against their envelope max(|f|, sqrt(2 / (pi u))).
"""

# ruff: noqa: E501  (the reference table below reads best one function a line)
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import scipy.special as sc
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fitcli.expr import parse_expression
from fitcli.symdiff import compile_jacobian

mpmath.mp.dps = 30
POS = np.concatenate([np.geomspace(1e-8, 1e-2, 12), np.linspace(0.05, 30, 60), [50, 100, 300]])
ALL = np.concatenate([-POS[::-1], [0.0], POS])


def mp(f, u):
    return np.array([float(f(mpmath.mpf(float(v)))) for v in u])


def envelope(ref, u):
    return np.maximum(np.abs(ref), np.sqrt(2 / (np.pi * np.maximum(np.abs(u), 1e-300))))


# name, grid, value (mpmath), derivative (mpmath), scale: "rel" or "env"
CASES = [
    ("erf", ALL[np.abs(ALL) < 20], mpmath.erf, lambda u: 2 / mpmath.sqrt(mpmath.pi) * mpmath.exp(-u * u), "rel"),
    ("erfc", ALL[np.abs(ALL) < 20], mpmath.erfc, lambda u: -2 / mpmath.sqrt(mpmath.pi) * mpmath.exp(-u * u), "rel"),
    ("erfcx", np.concatenate([ALL[ALL > -25], [1e3, 1e5, 1e7]]), lambda u: mpmath.exp(u * u) * mpmath.erfc(u),
     lambda u: 2 * u * mpmath.exp(u * u) * mpmath.erfc(u) - 2 / mpmath.sqrt(mpmath.pi), "rel"),
    ("erfinv", np.concatenate([np.linspace(-0.999, 0.999, 41), 1 - np.geomspace(1e-14, 1e-3, 8), [1e-10]]),
     mpmath.erfinv, lambda u: mpmath.sqrt(mpmath.pi) / 2 * mpmath.exp(mpmath.erfinv(u) ** 2), "rel"),
    ("gamma", np.concatenate([POS[POS < 171], [171.5], -np.linspace(0.1, 20.9, 23) + 0.05]),
     mpmath.gamma, lambda u: mpmath.gamma(u) * mpmath.digamma(u), "rel"),
    ("lgamma", np.concatenate([POS, [1e4, 1e6], -np.linspace(0.1, 20.9, 23) + 0.05]),
     lambda u: mpmath.log(abs(mpmath.gamma(u))), mpmath.digamma, "rel"),
    ("digamma", np.concatenate([POS, [1e4, 1e6], -np.linspace(0.1, 20.9, 23) + 0.05]),
     mpmath.digamma, lambda u: mpmath.psi(1, u), "rel"),
    ("j0", ALL, lambda u: mpmath.besselj(0, u), lambda u: -mpmath.besselj(1, u), "env"),
    ("j1", ALL, lambda u: mpmath.besselj(1, u), lambda u: (mpmath.besselj(0, u) - mpmath.besselj(2, u)) / 2, "env"),
    ("y0", POS, lambda u: mpmath.bessely(0, u), lambda u: -mpmath.bessely(1, u), "env"),
    ("y1", POS, lambda u: mpmath.bessely(1, u), lambda u: (mpmath.bessely(0, u) - mpmath.bessely(2, u)) / 2, "env"),
    ("i0", ALL, lambda u: mpmath.besseli(0, u), lambda u: mpmath.besseli(1, u), "rel"),
    ("i1", ALL, lambda u: mpmath.besseli(1, u), lambda u: (mpmath.besseli(0, u) + mpmath.besseli(2, u)) / 2, "rel"),
    ("i0e", ALL, lambda u: mpmath.besseli(0, u) * mpmath.exp(-abs(u)),
     lambda u: (mpmath.besseli(1, u) - mpmath.sign(u) * mpmath.besseli(0, u)) * mpmath.exp(-abs(u)), "rel"),
    ("i1e", ALL, lambda u: mpmath.besseli(1, u) * mpmath.exp(-abs(u)),
     lambda u: ((mpmath.besseli(0, u) + mpmath.besseli(2, u)) / 2 - mpmath.sign(u) * mpmath.besseli(1, u)) * mpmath.exp(-abs(u)), "rel"),
    ("k0", POS, lambda u: mpmath.besselk(0, u), lambda u: -mpmath.besselk(1, u), "rel"),
    ("k1", POS, lambda u: mpmath.besselk(1, u), lambda u: -(mpmath.besselk(0, u) + mpmath.besselk(2, u)) / 2, "rel"),
    ("sigmoid", ALL, lambda u: 1 / (1 + mpmath.exp(-u)), lambda u: mpmath.exp(-u) / (1 + mpmath.exp(-u)) ** 2, "rel"),
    ("logit", np.concatenate([np.geomspace(1e-12, 0.5, 20), 1 - np.geomspace(1e-12, 0.4, 20)]),
     lambda u: mpmath.log(u / (1 - u)), lambda u: 1 / (u * (1 - u)), "rel"),
    ("softplus", ALL, lambda u: mpmath.log1p(mpmath.exp(u)), lambda u: 1 / (1 + mpmath.exp(-u)), "rel"),
    ("log1p", np.concatenate([-1 + np.geomspace(1e-12, 0.9, 12), ALL[ALL > -0.5]]), lambda u: mpmath.log(1 + u),
     lambda u: 1 / (1 + u), "rel"),
    ("expm1", ALL[ALL < 300], mpmath.expm1, mpmath.exp, "rel"),
    ("sinc", np.concatenate([ALL, [1e5 + 0.5, 12345.25]]),
     lambda u: mpmath.sinpi(u) / (mpmath.pi * u) if u else mpmath.mpf(1),
     lambda u: (mpmath.cospi(u) - mpmath.sinpi(u) / (mpmath.pi * u)) / u if u else mpmath.mpf(0), "rel"),
    ("cbrt", ALL[ALL != 0], lambda u: mpmath.sign(u) * mpmath.cbrt(abs(u)),
     lambda u: 1 / (3 * mpmath.cbrt(abs(u)) ** 2), "rel"),
]  # fmt: skip


def _torch_value_and_derivative(name: str, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = parse_expression(f"{name}(x)")
    x = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    y = e(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    return y.detach().numpy(), g.numpy()


def _numpy_value_and_derivative(name: str, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # d/da of name(a) at a = u, one point at a time through the numpy path
    e = parse_expression(f"{name}(a)")
    f = compile_jacobian(e, ["a"])
    out = [f(np.zeros(1), {"a": v}) for v in u]
    return np.array([y[0] for y, _ in out]), np.array([j[0, 0] for _, j in out])


def _errors(got, ref, u, scale):
    finite = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), finite) or np.all(np.isfinite(got[finite]))
    denominator = envelope(ref, u) if scale == "env" else np.abs(ref)
    denominator = np.where(denominator == 0, 1e-300, denominator)
    return np.abs(got[finite] - ref[finite]) / denominator[finite]


@pytest.mark.parametrize(
    ("name", "grid", "value", "derivative", "scale"), CASES, ids=[c[0] for c in CASES]
)
def test_values_and_derivatives_match_mpmath_on_both_paths(name, grid, value, derivative, scale):
    ref_v, ref_d = mp(value, grid), mp(derivative, grid)
    for path in (_torch_value_and_derivative, _numpy_value_and_derivative):
        with np.errstate(all="ignore"):
            v, d = path(name, grid)
        # 1e-12, except the conditioning of the function itself: gamma near its poles and at
        # 171, erfcx and i0e at large |u| amplify the argument's own rounding.
        value_error = _errors(v, ref_v, grid, scale)
        derivative_error = _errors(d, ref_d, grid, scale)
        assert value_error.max(initial=0) <= 1e-12, (path.__name__, value_error.max())
        assert derivative_error.max(initial=0) <= 1e-12, (path.__name__, derivative_error.max())


def test_two_argument_functions_match_scipy_and_numpy():
    # (B(a, b) in b cancels in psi(b) - psi(a + b) for a << b, on any formula: a >= 0.01 here)
    a = np.concatenate([np.linspace(0.1, 30, 15), [0.01, 100.0]])
    b = np.concatenate([np.linspace(0.2, 7, 15), [3.0, 1e-6]])
    cases = {
        "beta(x, b)": (sc.beta(a, b), sc.beta(a, b) * (sc.psi(b) - sc.psi(a + b))),
        "atan2(x, b)": (np.arctan2(a, b), -a / (a * a + b * b)),
        "hypot(x, b)": (np.hypot(a, b), b / np.hypot(a, b)),
        "max(x, b)": (np.maximum(a, b), (b > a).astype(float)),
        "min(x, b, 5)": (np.minimum(np.minimum(a, b), 5), ((b < a) & (b <= 5)).astype(float)),
        "clip(x, b, 6)": (np.clip(a, b, 6), (a < b).astype(float)),
    }
    for source, (value, d_b) in cases.items():
        e = parse_expression(source)
        y, jac = compile_jacobian(e, ["b"])(a, {"b": 0.0})  # b per point below
        for k in range(a.size):
            xs = np.array([a[k]])
            y, jac = compile_jacobian(e, ["b"])(xs, {"b": b[k]})
            assert y[0] == pytest.approx(value[k], rel=1e-13, abs=0), source
            assert jac[0, 0] == pytest.approx(d_b[k], rel=1e-12, abs=1e-300), source
            t = torch.tensor(b[k], dtype=torch.float64, requires_grad=True)
            yt = e(torch.tensor(xs), {"b": t})
            (g,) = torch.autograd.grad(yt.sum(), t)
            assert float(yt) == pytest.approx(value[k], rel=1e-13, abs=0), source
            assert float(g) == pytest.approx(d_b[k], rel=1e-12, abs=1e-300), source


def test_piecewise_values():
    x = torch.tensor([-2.0, -0.0, 0.0, 0.5, 1.0, 3.0, math.nan], dtype=torch.float64)
    got = parse_expression("heaviside(x)")(x)
    np.testing.assert_array_equal(got.numpy(), np.heaviside(x.numpy(), 0.5))
    got = parse_expression("where(0 < x <= 1, 1, 0)")(x).numpy()
    np.testing.assert_array_equal(got, np.where((x.numpy() > 0) & (x.numpy() <= 1), 1.0, 0.0))
    got = parse_expression("sign(x) + where(x >= 1, x, -x)")(x).numpy()
    want = np.sign(x.numpy()) + np.where(x.numpy() >= 1, x.numpy(), -x.numpy())
    np.testing.assert_array_equal(got, want)


def test_where_gradient_is_the_chosen_branchs_even_when_the_other_is_nan():
    # where(x > c, sqrt(x - c), 0) in c: sqrt's derivative is NaN where x < c and inf at x = c;
    # a plain torch.where would pass 0 * NaN = NaN into dc.
    source = "a * where(x > c, sqrt(x - c), 0)"
    x = np.linspace(0.0, 2.0, 9)  # includes x == c
    values = {"a": 2.0, "c": 0.5}
    with np.errstate(all="ignore"):
        _, jac = compile_jacobian(parse_expression(source), ["a", "c"])(x, values)
    shifted = np.sqrt(np.clip(x - 0.5, 0, None))
    want_dc = np.where(x > 0.5, -2.0 * 0.5 / np.where(x > 0.5, shifted, 1.0), 0.0)
    np.testing.assert_allclose(jac[:, 1], want_dc, rtol=1e-14)
    np.testing.assert_allclose(jac[:, 0], np.where(x > 0.5, shifted, 0.0), rtol=1e-14)
    e = parse_expression(source)
    xt = torch.tensor(x)
    theta = torch.tensor([2.0, 0.5], dtype=torch.float64, requires_grad=True)
    y = e(xt, {"a": theta[0], "c": theta[1]})
    (grad,) = torch.autograd.grad(y.sum(), theta)
    assert torch.isfinite(grad).all()
    np.testing.assert_allclose(grad.numpy(), jac.sum(axis=0), rtol=1e-13)
    rev = torch.func.jacrev(lambda t: e(xt, {"a": t[0], "c": t[1]}))(theta.detach())
    np.testing.assert_allclose(rev.numpy(), jac, rtol=1e-13)
    # Nested: the inner where's guard composes with the outer one's.
    nested = "where(x > c, where(x > 1, log(x - 1), sqrt(x - c)), 0)"
    with np.errstate(all="ignore"):
        _, jn = compile_jacobian(parse_expression(nested), ["c"])(x, values)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    yn = parse_expression(nested)(xt, {"c": t})
    (gn,) = torch.autograd.grad(yn.sum(), t)
    assert math.isfinite(float(gn)) and float(gn) == pytest.approx(jn.sum(), rel=1e-13)


@pytest.mark.parametrize(
    "name", ["erf", "erfcx", "j0", "j1", "y1", "k1", "digamma", "sinc", "gamma", "sigmoid"]
)
def test_float32_follows_float64(name):
    u = np.linspace(0.3, 9.0, 31)
    e = parse_expression(f"{name}(x)")
    x32 = torch.tensor(u, dtype=torch.float32, requires_grad=True)
    x64 = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    y32, y64 = e(x32), e(x64)
    assert y32.dtype == torch.float32
    (g32,) = torch.autograd.grad(y32.sum(), x32)
    (g64,) = torch.autograd.grad(y64.sum(), x64)
    scale_y = y64.abs().max().item()
    scale_g = g64.abs().max().item()
    np.testing.assert_allclose(
        y32.detach().double().numpy(), y64.detach().numpy(), atol=1e-5 * scale_y
    )
    np.testing.assert_allclose(g32.double().numpy(), g64.numpy(), atol=1e-5 * scale_g)


FLOATS = st.floats(-40, 40, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(FLOATS, FLOATS)
def test_identities_hold(u, w):
    t = torch.tensor([u], dtype=torch.float64)
    p = {"w": torch.tensor(w, dtype=torch.float64)}

    def ev(source):
        return float(parse_expression(source)(t, p))

    assert ev("sigmoid(x) + sigmoid(-x)") == pytest.approx(1.0, rel=1e-15)
    assert ev("erf(x) + erfc(x)") == pytest.approx(1.0, rel=1e-15)
    assert ev("softplus(x) - softplus(-x)") == pytest.approx(u, rel=1e-13, abs=1e-13)
    assert ev("min(x, w) + max(x, w)") == pytest.approx(u + w, rel=1e-15, abs=1e-300)
    assert ev("clip(x, -1, 1)") == min(max(u, -1.0), 1.0)
    assert ev("heaviside(x - w)") == np.heaviside(u - w, 0.5)
    assert ev("where(x > w, 1, 0) + where(x <= w, 1, 0)") == 1.0
    assert ev("atan2(x, w)") == pytest.approx(math.atan2(u, w), rel=1e-13, abs=1e-300)
    assert ev("cbrt(x) ** 3") == pytest.approx(u, rel=1e-14, abs=1e-300)
    if abs(u) < 0.99:
        assert ev("erf(erfinv(x))") == pytest.approx(u, rel=1e-14, abs=1e-300)
        assert ev("logit(sigmoid(x))") == pytest.approx(u, rel=1e-10, abs=1e-12)
    if u > 0.1:
        assert ev("exp(lgamma(x))") == pytest.approx(sc.gamma(u), rel=1e-12)
        assert ev("gamma(x + 1) / gamma(x)") == pytest.approx(u, rel=1e-12)
    assert ev("j0(x)") == pytest.approx(sc.j0(u), rel=1e-12, abs=1e-14)
    assert ev("j1(x)") == pytest.approx(sc.j1(u), rel=1e-12, abs=1e-14)
    # the Wronskian of J and Y: J1 Y0 - J0 Y1 = 2 / (pi u)
    if u > 0.01:
        assert ev("j1(x) * y0(x) - j0(x) * y1(x)") == pytest.approx(2 / (math.pi * u), rel=1e-11)
