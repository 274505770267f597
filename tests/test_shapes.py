"""Lineshapes: each against lmfit.lineshapes (or a numpy formula written here) on both Jacobian
paths, their exact derivatives against torch autograd, the call's checks, and `fitcli shapes`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lmfit import lineshapes as ls
from scipy import special

from fitcli.cli import app
from fitcli.errors import ExpressionError
from fitcli.expr import FUNCTION_NAMES, MAX_EXPANDED, parse_expression
from fitcli.shapes import ROLE_KINDS, SHAPES, UNAVAILABLE, signature
from fitcli.symdiff import compile_jacobian, compile_value

# A grid through the awkward places: far tails, the center, tiny and huge |x|, both signs.
GRID = np.concatenate(
    [np.linspace(-12.0, 12.0, 97), [-1e-9, 0.0, 1e-9, 1e-4, 0.3, 1 - 1e-9, 1.0, 30.0, -30.0]]
)
POSITIVE = np.concatenate([np.geomspace(1e-6, 1e3, 80), [0.5, 1.0, 2.0]])


def _form(fn, form):
    return lambda x, *a: fn(x, *a, form=form)


# name -> (lmfit function, grid, argument tuples after x: all given, and fewer)
LMFIT = {
    "gaussian": (ls.gaussian, GRID, [(2.5, 0.7, 1.3), (1.0, -2.0, 0.05), (3.0, 1.0), (-2.0,), ()]),
    "gaussian2d": (
        ls.gaussian2d,
        GRID,
        [(0.4, 2.5, 0.7, -0.3, 1.3, 0.6), (-2.0, 1.0, -2.0, 0.5, 0.05, 2.0), (0.4, 3.0), ()],
    ),
    "lorentzian": (ls.lorentzian, GRID, [(2.5, 0.7, 1.3), (1.0, -2.0, 0.05), (3.0,), ()]),
    "split_lorentzian": (
        ls.split_lorentzian,
        GRID,
        [(2.5, 0.7, 1.3, 0.4), (1.0, -2.0, 0.05, 3.0), (2.0, 0.5, 2.0), ()],
    ),
    "voigt": (ls.voigt, GRID, [(2.5, 0.7, 1.3, 0.4), (1.0, -2.0, 0.3, 3.0), (2.0, 0.5, 0.8), ()]),
    "pvoigt": (ls.pvoigt, GRID, [(2.5, 0.7, 1.3, 0.2), (1.0, -2.0, 0.3, 0.9), (2.0, 0.5), ()]),
    "moffat": (ls.moffat, GRID, [(2.5, 0.7, 1.3, 2.5), (1.0, -2.0, 0.3, 0.6), (2.0, 0.5), ()]),
    "pearson4": (
        ls.pearson4,
        GRID,
        [(2.5, 0.7, 1.3, 1.7, 0.8), (1.0, -2.0, 0.3, 4.0, -3.0), (2.0, 0.5, 1.1, 2.0), ()],
    ),
    "pearson7": (ls.pearson7, GRID, [(2.5, 0.7, 1.3, 1.7), (1.0, -2.0, 0.3, 12.0), (2.0,), ()]),
    "breit_wigner": (
        ls.breit_wigner,
        GRID,
        [(2.5, 0.7, 1.3, 0.4), (1.0, -2.0, 0.3, -3.0), (2.0, 0.5), ()],
    ),
    "damped_oscillator": (
        ls.damped_oscillator,
        GRID,
        [(2.5, 1.7, 0.3), (1.0, -2.0, 0.05), (2.0,), ()],
    ),
    "dho": (ls.dho, GRID, [(2.5, 1.7, 0.3, 0.8), (1.0, 2.0, 0.5, 3.0), (2.0, 0.5), ()]),
    "logistic": (ls.logistic, GRID, [(2.5, 0.7, 1.3), (1.0, -2.0, 0.05), (2.0,), ()]),
    "lognormal": (ls.lognormal, POSITIVE, [(2.5, 0.7, 1.3), (1.0, -2.0, 0.3), (2.0,), ()]),
    "students_t": (ls.students_t, GRID, [(2.5, 0.7, 1.3), (1.0, -2.0, 7.5), (2.0, 1.0), ()]),
    "expgaussian": (
        ls.expgaussian,
        GRID,
        [(2.5, 0.7, 1.3, 0.4), (1.0, -2.0, 0.6, 2.0), (2.0, 0.5), ()],
    ),
    "doniach": (ls.doniach, GRID, [(2.5, 0.7, 1.3, 0.3), (1.0, -2.0, 0.3, 0.1), (2.0,), ()]),
    "skewed_gaussian": (
        ls.skewed_gaussian,
        GRID,
        [(2.5, 0.7, 1.3, 2.0), (1.0, -2.0, 0.3, -5.0), (2.0, 0.5), ()],
    ),
    "skewed_voigt": (
        ls.skewed_voigt,
        GRID,
        [(2.5, 0.7, 1.3, 0.4, 2.0), (1.0, -2.0, 0.6, 1.5, -3.0), (2.0, 0.5, 0.8), ()],
    ),
    "sine": (ls.sine, GRID, [(2.5, 0.7, 1.3), (1.0, 3.0), ()]),
    "expsine": (ls.expsine, GRID, [(2.5, 0.7, 1.3, 0.2), (1.0, 3.0, 0.5), ()]),
    "thermal_bose": (
        _form(ls.thermal_distribution, "bose"),
        GRID,
        [(2.5, 0.7, 1.3), (1.0, -2.0, -0.5), (0.5,), ()],
    ),
    "thermal_maxwell": (
        _form(ls.thermal_distribution, "maxwell"),
        GRID,
        [(2.5, 0.7, 1.3), (1.0, -2.0, -0.5), (0.5,), ()],
    ),
    "thermal_fermi": (
        _form(ls.thermal_distribution, "fermi"),
        GRID,
        [(2.5, 0.7, 1.3), (1.0, -2.0, -0.5), (0.5,), ()],
    ),
    "bose": (ls.bose, GRID[GRID != 0.7], [(2.5, 0.7, 1.3), (1.0, -2.0, -0.5), (0.5, 0.1), ()]),
    "fermi": (ls.fermi, GRID, [(2.5, 0.7, 1.3), (1.0, -2.0, -0.5), (0.5,), ()]),
    "exponential": (ls.exponential, GRID, [(2.5, 1.3), (1.0, -2.0), (2.0,), ()]),
    "powerlaw": (ls.powerlaw, POSITIVE, [(2.5, 1.3), (1.0, -2.0), (2.0,), ()]),
    "linear": (ls.linear, GRID, [(2.5, 1.3), (1.0,), ()]),
    "parabolic": (ls.parabolic, GRID, [(2.5, 1.3, -0.7), (1.0, 2.0), ()]),
}
for _form_name in ("linear", "atan", "erf", "logistic"):
    LMFIT[f"step_{_form_name}"] = (
        _form(ls.step, _form_name),
        GRID,
        [(2.5, 0.7, 1.3), (1.0, -2.0, -0.5), (2.0, 0.5), ()],
    )
    LMFIT[f"rectangle_{_form_name}"] = (
        _form(ls.rectangle, _form_name),
        GRID,
        [(2.5, -1.7, 1.3, 2.0, 0.4), (1.0, -2.0, 0.5, 5.0), (2.0, 0.5), ()],
    )


def _direct(name: str):
    """Numpy formulas for the shapes lmfit does not have, written from their definitions."""
    return {
        "hill": lambda x, v=1, k=1, n=1: v * x**n / (k**n + x**n),
        "michaelis_menten": lambda x, v=1, k=1: v * x / (k + x),
        "dose_response4": lambda x, b=0, t=1, c=1, h=1: b + (t - b) / (1 + (c / x) ** h),
        "dose_response5": lambda x, b=0, t=1, c=1, h=1, s=1: b + (t - b) / (1 + (c / x) ** h) ** s,
        "gompertz": lambda x, a=1, b=1, c=1: a * np.exp(-b * np.exp(-c * x)),
        "richards": lambda x, a=1, m=0, k=1, nu=1: a / (1 + nu * np.exp(-k * (x - m))) ** (1 / nu),
        "double_exponential": lambda x, a1=1, t1=1, a2=1, t2=10: (
            a1 * np.exp(-x / t1) + a2 * np.exp(-x / t2)
        ),
        "biexponential_decay": lambda x, a1=1, k1=1, a2=1, k2=0.1, c=0: (
            c + a1 * np.exp(-k1 * x) + a2 * np.exp(-k2 * x)
        ),
        "stretched_exponential": lambda x, a=1, t=1, b=1: a * np.exp(-((x / t) ** b)),
        "powerlaw_cutoff": lambda x, a=1, k=-1, c=1: a * x**k * np.exp(-x / c),
        "sigmoid_step": lambda x, b=0, t=1, c=0, w=1: b + (t - b) * special.expit((x - c) / w),
        "arrhenius": lambda x, a=1, e=1: a * np.exp(-e / x),
    }[name]


DIRECT = {
    "hill": (POSITIVE, [(2.5, 0.7, 1.3), (1.0, 2.0), ()]),
    "michaelis_menten": (POSITIVE, [(2.5, 0.7), (1.0,), ()]),
    "dose_response4": (POSITIVE, [(0.3, 2.5, 0.7, 1.3), (1.0, -2.0, 3.0, -0.8), (0.5,), ()]),
    "dose_response5": (POSITIVE, [(0.3, 2.5, 0.7, 1.3, 0.6), (1.0, -2.0, 3.0, 2.0), ()]),
    "gompertz": (GRID, [(2.5, 0.7, 1.3), (1.0, 2.0), ()]),
    "richards": (GRID, [(2.5, 0.7, 1.3, 0.4), (1.0, 2.0, 0.5), ()]),
    "double_exponential": (GRID, [(2.5, 0.7, 1.3, 4.0), (1.0, 2.0), ()]),
    "biexponential_decay": (GRID, [(2.5, 0.7, 1.3, 0.04, 0.2), (1.0, 2.0), ()]),
    "stretched_exponential": (POSITIVE, [(2.5, 0.7, 0.4), (1.0, 2.0), ()]),
    "powerlaw_cutoff": (POSITIVE, [(2.5, 0.7, 13.0), (1.0, -1.5), ()]),
    "sigmoid_step": (GRID, [(0.3, 2.5, 0.7, 1.3), (1.0, -2.0, 3.0, -0.5), ()]),
    "arrhenius": (POSITIVE * 300, [(2.5e3, 700.0), (1.0,), ()]),
}


VOIGT = {"voigt", "skewed_voigt"}  # their formulas call voigt_profile (fitcli.faddeeva)


def _needs_voigt(name: str) -> None:
    if name in VOIGT and "voigt_profile" not in FUNCTION_NAMES:
        pytest.skip("voigt_profile is not in the expression functions yet")


def _evaluate(name: str, x: np.ndarray, values: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The shape called with parameters p0, p1, ... in fitcli: torch float64 and symdiff."""
    names = [f"p{k}" for k in range(len(values))]
    e = parse_expression(f"{name}({', '.join(['x', *names])})")
    params = dict(zip(names, values, strict=True))
    t = e(torch.tensor(x, dtype=torch.float64), params).numpy()
    with np.errstate(all="ignore"):
        n = compile_value(e)(x, params)
    return t, n


def _close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-12) -> None:
    """Relative rtol, with an absolute floor near zeros of rtol times the curve's largest value."""
    finite = np.isfinite(want)
    floor = rtol * np.max(np.abs(want[finite]), initial=0.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=floor)


def test_registry_has_at_least_40_shapes_and_the_lmfit_set():
    assert len(SHAPES) >= 40
    assert set(LMFIT) | set(DIRECT) == set(SHAPES)  # every shape is checked below
    for name in ls.functions:
        if name in ("thermal_distribution", "step", "rectangle"):
            continue  # one name per form
        assert name in SHAPES or name in UNAVAILABLE


def test_every_argument_has_a_guess_role():
    for shape in SHAPES.values():
        assert shape.args[0] == "x"
        assert set(shape.roles) == set(shape.args[1:]), shape.name
        for role in shape.roles.values():
            assert role.kind in ROLE_KINDS, (shape.name, role)
            if role.kind in ("fraction", "shape"):
                assert role.start is not None, (shape.name, role)
        # defaults are trailing, as in a Python signature
        assert list(shape.defaults) == list(shape.args[shape.required :]), shape.name


@pytest.mark.parametrize("name", sorted(LMFIT))
def test_lmfit_shape_matches_lmfit(name):
    _needs_voigt(name)
    fn, x, cases = LMFIT[name]
    for values in cases:
        want = fn(x.copy(), *values)
        t, n = _evaluate(name, x, values)
        _close(t, want)
        _close(n, want)


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_other_shape_matches_its_formula(name):
    x, cases = DIRECT[name]
    fn = _direct(name)
    for values in cases:
        with np.errstate(all="ignore"):
            want = fn(x, *values)
        t, n = _evaluate(name, x, values)
        _close(t, want)
        _close(n, want)


def _jacobian_case(name: str) -> tuple[np.ndarray, tuple]:
    if name in LMFIT:
        _, x, cases = LMFIT[name]
    else:
        x, cases = DIRECT[name]
    return x, cases[0]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_symdiff_jacobian_matches_autograd(name):
    _needs_voigt(name)
    x, values = _jacobian_case(name)
    # away from the kinks of the piecewise shapes, where each side has its own derivative
    x = x[np.abs(x) < 11]
    names = [f"p{k}" for k in range(len(values))]
    e = parse_expression(f"{name}({', '.join(['x', *names])})")
    xt = torch.tensor(x, dtype=torch.float64)

    def f(theta):
        return e(xt, {k: theta[i] for i, k in enumerate(names)})

    theta = torch.tensor(values, dtype=torch.float64)
    want = torch.func.jacrev(f)(theta).numpy()
    with np.errstate(all="ignore"):
        y, got = compile_jacobian(e, names)(x, dict(zip(names, values, strict=True)))
    _close(y, f(theta).numpy())
    for k in range(len(names)):
        _close(got[:, k], want[:, k])


def test_a_shape_of_an_expression_is_the_formula_of_that_expression():
    e = parse_expression("gaussian(log(x) * w, a)")
    assert e.params == ("w", "a")
    x = POSITIVE
    t = e(torch.tensor(x, dtype=torch.float64), {"w": 0.7, "a": 2.0}).numpy()
    _close(t, ls.gaussian(np.log(x) * 0.7, 2.0))


def test_voigt_gamma_defaults_to_sigma():
    _needs_voigt("voigt")
    e = parse_expression("voigt(x, a, c, s)")
    assert e.params == ("a", "c", "s")
    t = e(torch.tensor(GRID, dtype=torch.float64), {"a": 2.0, "c": 0.5, "s": 0.8}).numpy()
    _close(t, ls.voigt(GRID, 2.0, 0.5, 0.8, 0.8))


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("gaussian(x, a, c, s, w)", "gaussian(x, amplitude=1, center=0, sigma=1) takes 1 to 4"),
        ("gaussian()", "gaussian(x, amplitude=1, center=0, sigma=1) takes 1 to 4 arguments (0"),
        ("linear(x, 1, 2, 3)", "linear(x, slope=1, intercept=0) takes 1 to 3 arguments (4 given)"),
        ("gaussian(x, sigma=s)", "keyword arguments are not allowed in gaussian()"),
        ("gaussian * x", "lineshape 'gaussian' must be called, as gaussian(x, amplitude=1,"),
        ("a * voigt + 1", "'voigt' is taken: name the parameter otherwise, e.g. voigt_"),
    ],
)
def test_bad_shape_calls_are_refused(source, message):
    with pytest.raises(ExpressionError) as info:
        parse_expression(source)
    assert message in str(info.value)


def test_nested_shapes_are_bounded():
    # sigma appears twice in gaussian's formula: each level of nesting doubles the tree
    source = "x"
    for _ in range(20):
        source = f"gaussian(x, 1, 0, {source})"
    with pytest.raises(ExpressionError, match=f"more than {MAX_EXPANDED} nodes"):
        parse_expression(source)
    # a few levels are fine, and evaluate on both paths
    small = "gaussian(x, a, 0, gaussian(x, 1, c, gaussian(x, 2, 0, s)))"
    e = parse_expression(small)
    x = np.linspace(-3, 3, 7)
    t = e(torch.tensor(x, dtype=torch.float64), {"a": 1.5, "c": 0.2, "s": 0.9}).numpy()
    inner = ls.gaussian(x, 2, 0, 0.9)
    want = np.array(
        [
            ls.gaussian(xi, 1.5, 0, ls.gaussian(xi, 1, 0.2, si))
            for xi, si in zip(x, inner, strict=True)
        ]
    )
    _close(t, want)


def test_many_shapes_side_by_side_are_bounded_in_total():
    term = "s"
    for _ in range(9):  # about 12,000 nodes: allowed on its own
        term = f"gaussian(x, a, c, {term})"
    parse_expression(term)
    with pytest.raises(ExpressionError, match="too large once its lineshapes are expanded"):
        parse_expression(" + ".join([term] * 5))


def test_train_recovers_two_gaussians_on_a_line(write_config, runner, tmp_path):
    truth = {"a1": 3.0, "c1": -1.5, "s1": 0.6, "a2": 2.0, "c2": 2.0, "s2": 0.9}
    truth |= {"slope": 0.2, "intercept": 0.5}
    target = "gaussian(x, 3, -1.5, 0.6) + gaussian(x, 2, 2, 0.9) + linear(x, 0.2, 0.5)"
    start = {"a1": 2.0, "c1": -1.0, "s1": 1.0, "a2": 1.0, "c2": 2.5, "s2": 1.0}
    start |= {"slope": 0.0, "intercept": 0.0}
    path = write_config(
        {
            "epochs": 100,
            "snapshots": 2,
            "data.target": target,
            "data.x": {"start": -5, "stop": 5, "num": 200},
            "data.noise": {"std": 0.01},
            "model": {
                "expr": "gaussian(x, a1, c1, s1) + gaussian(x, a2, c2, s2)"
                " + linear(x, slope, intercept)",
                "params": start,
            },
            "optimizer": {"name": "LM"},
        }
    )
    result = runner.invoke(app, ["train", str(path), "--out", str(tmp_path / "runs"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for name, value in truth.items():
        assert summary["params"][name] == pytest.approx(value, abs=0.05), name


def test_cli_lists_every_shape(runner):
    result = runner.invoke(app, ["shapes"])
    assert result.exit_code == 0, result.output
    for name in SHAPES:
        assert name in result.stdout
    result = runner.invoke(app, ["shapes", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [s["name"] for s in listed["shapes"]] == list(SHAPES)
    assert listed["shapes"][0]["signature"] == signature(SHAPES["gaussian"])
    assert set(listed["unavailable"]) == set(UNAVAILABLE)


def test_cli_shows_one_shape(runner):
    result = runner.invoke(app, ["shapes", "pvoigt"])
    assert result.exit_code == 0, result.output
    for text in ("pvoigt(x, amplitude=1, center=0, sigma=1, fraction=0.5)", "lorentzian(x,"):
        assert text in result.stdout
    assert "fraction" in result.stdout and "start 0.5" in result.stdout
    result = runner.invoke(app, ["shapes", "voigt", "--json"])
    shown = json.loads(result.stdout)
    assert shown["formula"] == SHAPES["voigt"].formula
    assert shown["defaults"]["gamma"] == "sigma"
    assert shown["roles"]["sigma"]["kind"] == "width"


def test_cli_unknown_shape_suggests_close_names(runner):
    result = runner.invoke(app, ["shapes", "gausian"])
    assert result.exit_code == 2
    assert "unknown lineshape 'gausian'" in result.stderr
    assert "gaussian" in result.stderr


def test_loggamma_re_matches_scipy_on_both_paths():
    # pearson4's primitive: log|Gamma(a + ib)|, from tiny a to large, both signs of b, negative a
    a = np.concatenate([np.geomspace(1e-15, 1e4, 120), 0.37 - np.geomspace(1e-3, 30, 40)])
    for b in (0.0, 1e-8, 0.3, -2.5, 40.0, 300.0):
        z = a + 1j * b
        want = special.loggamma(z).real
        e = parse_expression("loggamma_re(x, b)")
        t = e(torch.tensor(a, dtype=torch.float64), {"b": b}).numpy()
        y, jac = compile_jacobian(e, ["b"])(a, {"b": b})
        # absolute near log|Gamma|'s zeros (a = 1, 2), relative elsewhere
        np.testing.assert_allclose(t, want, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(jac[:, 0], -special.psi(z).imag, rtol=1e-12, atol=1e-13)
        bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(e(torch.tensor(a, dtype=torch.float64), {"b": bt}).sum(), bt)
        assert float(grad) == pytest.approx(
            float(np.sum(-special.psi(z).imag)), rel=1e-11, abs=1e-11
        )
