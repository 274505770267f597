"""fitcli.symdiff and the LM core's numpy path: exact derivatives against torch's autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fitcli.config import config_from_dict
from fitcli.expr import FUNCTION_NAMES, FUNCTION_TABLE, parse_expression
from fitcli.lm import _jacobian_columns, host_ok
from fitcli.lm_optim import NumpyModel
from fitcli.model import model_function
from fitcli.prepare import prepare
from fitcli.symdiff import compile_jacobian, compile_value
from fitcli.train import train

X = np.linspace(0.1, 0.9, 17)
VALUES = {"a": 1.3, "b": -0.7, "c": 0.4, "w": 2.1}


def autograd_jacobian(source: str, x: np.ndarray, values: dict, wrt: list[str]):
    """Value and Jacobian of the torch expression, one reverse pass per row block (exact)."""
    e = parse_expression(source)
    xt = torch.tensor(x, dtype=torch.float64)
    leaves = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=k in wrt) for k, v in values.items()
    }
    y = e(xt, {k: leaves[k] for k in e.params})
    cols = []
    for name in wrt:
        if not y.requires_grad:
            cols.append(np.zeros_like(x))
            continue
        col = []
        for i in range(x.shape[0]):
            (g,) = torch.autograd.grad(y[i], leaves[name], retain_graph=True, allow_unused=True)
            col.append(0.0 if g is None else float(g))
        cols.append(np.array(col))
    return y.detach().numpy(), np.stack(cols, axis=1) if cols else np.zeros((x.shape[0], 0))


CASES = [
    "a*sin(b*x)+c",
    "a*x**2 + b*x + c",
    "a - b - c + x",
    "a / b / x",
    "a * x / b * c",
    "x ** a ** 2",
    "a ** x",
    "x ** b",
    "(a*x) ** (c + x)",
    "-a * -x",
    "2 ** a + x",
    "exp(-a * x) * cos(w * x + b)",
    "a * exp(-(x - b) ** 2 / (2 * c ** 2))",
    "log(a*x) + log10(c*x) + log2(w*x)",
    "sqrt(a*x) * abs(b)",
    "tan(a*x) + sinh(a*x) + cosh(b*x) + tanh(c*x)",
    "arcsin(c*x) + arccos(c*x) + arctan(a*x)",
    "a / (1 + exp(-w * (x - c)))",
    "a * b",
    "sin(a)",
    "3 + x",
    "a ** 0 + b ** 1 + c ** 0.5 * x",
    "x + a + x + b + x + c + x + w + x + a + x + b",
    "a*a*a*x/w/w",
]


@pytest.mark.parametrize("source", CASES)
def test_value_and_jacobian_match_torch_autograd(source):
    e = parse_expression(source)
    wrt = list(e.params)
    y, jac = compile_jacobian(e, wrt)(X, VALUES)
    y_ref, jac_ref = autograd_jacobian(source, X, VALUES, wrt)
    assert y.shape == X.shape and jac.shape == (X.shape[0], len(wrt))
    np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=0)
    np.testing.assert_allclose(jac, jac_ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(compile_value(e)(X, VALUES), y_ref, rtol=1e-13, atol=0)


def _call_source(name: str) -> str:
    """A call of function `name` inside every domain on X, with both a and c in it."""
    f = FUNCTION_TABLE[name]
    if name == "where":
        return "where(x > c, sqrt(x - c) * a, a * c)"
    if name == "clip":
        return "clip(a * x, c, 0.9)"
    if name == "voigt_profile":
        return "voigt_profile(x, 0.5 + a * a, 0.3 + c * c)"
    if f.min_args == 1:
        return f"{name}(0.3 * a * x + 0.5 * c)"
    return f"{name}(a * x + 0.5, c * x + 0.2" + (", 0.3 * a)" if f.variadic else ")")


def test_every_function_has_a_derivative():
    for name in FUNCTION_NAMES:
        source = _call_source(name)
        e = parse_expression(source)
        _, jac = compile_jacobian(e, ["a", "c"])(X, VALUES)
        _, ref = autograd_jacobian(source, X, VALUES, ["a", "c"])
        np.testing.assert_allclose(jac, ref, rtol=1e-12, atol=1e-14, err_msg=name)
        # and forward mode, as the LM core's jacfwd computes it
        xt = torch.tensor(X)
        theta = torch.tensor([VALUES["a"], VALUES["c"]], dtype=torch.float64)
        fwd = torch.func.jacfwd(lambda t, e=e, xt=xt: e(xt, {"a": t[0], "c": t[1]}))(theta)
        np.testing.assert_allclose(jac, fwd.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)


def test_parameters_not_differentiated_are_constants_and_unused_ones_get_zero_columns():
    e = parse_expression("a * exp(-b * x) + c")
    y, jac = compile_jacobian(e, ["b", "c"])(X, VALUES)
    _, ref = autograd_jacobian("a * exp(-b * x) + c", X, VALUES, ["b", "c"])
    np.testing.assert_allclose(jac, ref, rtol=1e-13)
    assert np.all(jac[:, 1] == 1.0)  # d/dc


def test_power_of_zero_base_follows_torch():
    # d(u ** v)/dv at u == 0 and v >= 0 is 0 in torch (not 0 * log(0) = nan).
    x = np.array([0.0, 0.5, 1.0])
    for values in ({"a": 2.0}, {"a": 0.0}):
        with np.errstate(divide="ignore", invalid="ignore"):  # log(0) where the base is 0
            y, jac = compile_jacobian(parse_expression("x ** a"), ["a"])(x, values)
        y_ref, ref = autograd_jacobian("x ** a", x, values, ["a"])
        np.testing.assert_array_equal(np.isnan(jac), np.isnan(ref))
        np.testing.assert_allclose(jac, ref, rtol=1e-13)


def test_negative_base_to_a_fractional_power_is_nan_not_complex():
    with np.errstate(all="ignore"):
        y, jac = compile_jacobian(parse_expression("a ** 0.5 + x"), ["a"])(X, {"a": -4.0})
    assert y.dtype == np.float64 and np.isnan(y).all() and np.isnan(jac).all()


# -- random expressions ------------------------------------------------------------------------

LEAVES = st.sampled_from(["x", "a", "b", "c", "0.5", "2", "1.7"])
SAFE = ["sin", "cos", "atan", "tanh", "exp"]
# New functions, each wrapped so that its argument stays inside its domain (and away from the
# points where a derivative is infinite).
WRAPPED = [
    "erf({})", "erfc({})", "erfcx({})", "erfinv(0.9 * tanh({}))", "lgamma(2 + sin({}))",
    "gamma(2 + sin({}))", "digamma(2 + sin({}))", "j0({})", "j1({})", "y0(2.5 + sin({}))",
    "y1(2.5 + sin({}))", "i0({})", "i1({})", "i0e({})", "i1e({})", "k0(2.5 + sin({}))",
    "k1(2.5 + sin({}))", "sigmoid({})", "expit({})", "logit(0.5 + 0.4 * tanh({}))",
    "softplus({})", "log1p(1.5 + sin({}))", "expm1(tanh({}))", "sinc({})", "cbrt(2 + sin({}))",
]  # fmt: skip
PAIRS = [
    "atan2({}, {})",
    "hypot({}, {})",
    "min({}, {})",
    "max({}, {})",
    "beta(2 + sin({}), 2 + cos({}))",
]


def _combine(children):
    binary = st.tuples(children, st.sampled_from(["+", "-", "*", "/"]), children).map(
        lambda t: f"({t[0]} {t[1]} {t[2]})"
    )
    call = st.tuples(st.sampled_from(SAFE), children).map(lambda t: f"{t[0]}({t[1]})")
    wrapped = st.tuples(st.sampled_from(WRAPPED), children).map(lambda t: t[0].format(t[1]))
    pair = st.tuples(st.sampled_from(PAIRS), children, children).map(
        lambda t: t[0].format(t[1], t[2])
    )
    piecewise = st.tuples(children, children, children).map(
        lambda t: f"where({t[0]} > 0.3, {t[1]}, {t[2]})"
    )
    clip = st.tuples(children).map(lambda t: f"clip({t[0]}, -0.5, 0.8)")
    power = st.tuples(children, st.sampled_from(["2", "3", "0.5", "a"])).map(
        lambda t: f"(1.5 + tanh({t[0]})) ** {t[1]}"
    )
    return binary | call | power | wrapped | pair | piecewise | clip


EXPRESSIONS = st.recursive(LEAVES, _combine, max_leaves=12)
# Parameter values away from 0: b / b at b = 1e-150 is rounding noise in any formula.
MAGNITUDES = st.floats(0.05, 2) | st.floats(-2, -0.05)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=EXPRESSIONS, a=MAGNITUDES, b=MAGNITUDES, c=st.floats(0.2, 2))
@example(source="atan2(max(x, a), (b / x))", a=-0.5, b=0.5, c=1.0)
@example(source="hypot(x, where(x > 0.3, a, x))", a=1.0, b=1.0, c=1.0)
def test_random_expressions_match_autograd(source, a, b, c):
    e = parse_expression(source)
    values = {"a": a, "b": b, "c": c}
    x = np.linspace(-1.5, 1.5, 7)
    with np.errstate(all="ignore"):
        y, jac = compile_jacobian(e, list(e.params))(x, values)
    y_ref, ref = autograd_jacobian(source, x, values, list(e.params))
    both = np.isfinite(y_ref) & np.isfinite(y)
    # Values: the same operations in the same order, to rounding.
    np.testing.assert_allclose(
        y[both], y_ref[both], rtol=1e-10, atol=1e-10 * np.abs(y_ref[both]).max(initial=1)
    )
    finite = np.isfinite(ref) & np.isfinite(jac)
    # Derivatives may associate differently from autograd's reverse pass: compare against the
    # scale of each column.
    scale = np.where(finite, np.abs(ref), 0).max(axis=0, initial=0) + 1e-300
    with np.errstate(all="ignore"):
        error = np.abs(jac - ref)
    # Plus a floor: 1 - tanh(u)**2 near tanh(u) = 1 amplifies one ulp of difference between
    # numpy's and torch's tanh to 1e-8 relative of a tiny derivative.
    bound = 1e-8 * (np.abs(ref) + scale) + 1e-12 * (1 + scale)
    assert np.all(error[finite] <= bound[finite]), source
    # Non-finite derivatives only where the value itself or autograd's is non-finite, in that
    # row: a row with a non-finite autograd derivative passes through a non-finite intermediate
    # (b / x at x = 0), where forward mode's 0 * nan (the tangent of an unselected max argument
    # times atan2's partial at (0, inf)) and reverse mode's masking of it legitimately differ.
    odd_row = ~np.isfinite(ref).all(axis=1) | ~np.isfinite(y_ref)
    assert np.all(np.isfinite(jac) | ~np.isfinite(ref) | odd_row[:, None]), source


# -- the numpy model of a FitModel and the LM core's use of it ----------------------------------


def _prep(tmp_path, params, expr="a*exp(-k*x) + c", n=60, sigma=True, dtype="float64"):
    xs = np.linspace(0.0, 4.0, n)
    ys = 2.5 * np.exp(-0.9 * xs) + 0.3 + np.sin(7 * xs) * 0.05
    path = tmp_path / "d.csv"
    path.write_text(
        "x,y,err\n"
        + "".join(
            f"{x!r},{y!r},{0.05 + 0.01 * x!r}\n"
            for x, y in zip(xs.tolist(), ys.tolist(), strict=True)
        )
    )
    columns = {"x": "x", "y": "y", "sigma": "err"} if sigma else {"x": "x", "y": "y"}
    raw = {
        "name": "t",
        "device": "cpu",
        "dtype": dtype,
        "epochs": 300,
        "data": {"file": str(path), "columns": columns},
        "model": {"expr": expr, "params": params},
        "optimizer": {"name": "LevenbergMarquardt"},
    }
    return prepare(config_from_dict(raw))


BOUNDED = {
    "a": {"value": 1.0, "min": 0.0, "max": 10.0},
    "k": {"value": 0.5, "min": 0.0},
    "c": {"value": 0.3, "max": 2.0},
}


@pytest.mark.parametrize(
    "params",
    [
        {"a": 1.0, "k": 0.5, "c": 0.0},
        BOUNDED,
        {
            "a": {"value": 1.0, "min": -1.0, "max": 5.0},
            "k": 0.5,
            "c": {"value": 0.3, "vary": False},
        },
    ],
    ids=["free", "bounded", "fixed"],
)
def test_numpy_model_matches_the_torch_model_and_its_exact_jacobian(tmp_path, params):
    prep = _prep(tmp_path, params)
    model, x = prep.model, prep.x
    host = NumpyModel(model, x)
    theta = model.raw.detach().clone() + 0.1
    ref, m_ref = _jacobian_columns(lambda t: model.predict(t, x), theta)
    m, jac = host.jacobian(theta.numpy())
    np.testing.assert_allclose(m, m_ref.numpy(), rtol=1e-13)
    np.testing.assert_allclose(host.value(theta.numpy()), m_ref.numpy(), rtol=1e-13)
    np.testing.assert_allclose(jac, ref.numpy(), rtol=1e-10, atol=1e-14)
    assert host_ok(model_function(model), host, theta, x)


def test_numpy_model_of_a_basis_model(tmp_path):
    raw = {
        "name": "b",
        "device": "cpu",
        "dtype": "float64",
        "epochs": 50,
        "data": {
            "target": "1.5*sin(x) + 1.2*cos(x/4)",
            "x": {"start": -10, "stop": 10, "num": 200},
            "noise": {"std": 1.0},
        },
        "model": {"basis": ["x", "sin(x)", "cos(x/4)"]},
        "optimizer": {"name": "LevenbergMarquardt"},
    }
    prep = prepare(config_from_dict(raw))
    host = NumpyModel(prep.model, prep.x)
    theta = torch.tensor([0.1, -0.5, 2.0], dtype=torch.float64)
    ref, m_ref = _jacobian_columns(lambda t: prep.model.predict(t, prep.x), theta)
    m, jac = host.jacobian(theta.numpy())
    np.testing.assert_allclose(m, m_ref.numpy(), rtol=1e-12)
    np.testing.assert_allclose(jac, ref.numpy(), rtol=1e-12)
    assert prep.stepper.lm.host is not None


def _fit(prep):
    return train(prep.model, prep.stepper, epochs=300, evaluate_loss=prep.evaluate_loss)


@pytest.mark.parametrize(
    "params", [{"a": 1.0, "k": 0.5, "c": 0.0}, BOUNDED], ids=["free", "bounded"]
)
def test_lm_with_the_numpy_path_reaches_the_torch_path_answer(tmp_path, params):
    fast = _prep(tmp_path, params)
    slow = _prep(tmp_path, params)
    slow.stepper.lm.host = None  # torch's autograd all the way
    slow.stepper.lm._host_checked = True
    r_fast, r_slow = _fit(fast), _fit(slow)
    assert fast.stepper.lm.host is not None and slow.stepper.lm.host is None
    assert r_fast.status == r_slow.status == "completed"
    a, b = fast.model.values(), slow.model.values()
    for name in a:
        assert a[name] == pytest.approx(b[name], rel=1e-9), name
    assert fast.stepper.lm.n_iter == pytest.approx(slow.stepper.lm.n_iter, abs=3)


def test_a_numpy_model_that_disagrees_is_not_used(tmp_path):
    prep = _prep(tmp_path, {"a": 1.0, "k": 0.5, "c": 0.0})
    lm = prep.stepper.lm
    good = lm.host.jacobian

    def wrong(theta):
        m, jac = good(theta)
        jac = jac.copy()
        jac[5, 1] *= 1.001  # one entry of one row, within the rows host_ok checks
        return m, jac

    lm.host.jacobian = wrong
    # No longer the program its signature names: judged on its own, its verdict not kept.
    lm.host.signature = None
    result = _fit(prep)
    assert lm.host is None and lm.rowwise is not None  # fell back to torch at the first step
    assert result.status == "completed"
    assert prep.model.values()["k"] == pytest.approx(_fit_reference(tmp_path)["k"], rel=1e-9)


def _fit_reference(tmp_path):
    prep = _prep(tmp_path, {"a": 1.0, "k": 0.5, "c": 0.0})
    _fit(prep)
    return prep.model.values()


@pytest.mark.parametrize(("dtype", "n"), [("float32", 60), ("float64", 2000)])
def test_numpy_path_only_for_small_float64_fits(tmp_path, dtype, n):
    prep = _prep(tmp_path, {"a": 1.0, "k": 0.5, "c": 0.0}, n=n, dtype=dtype)
    assert prep.stepper.lm.host is None
    result = _fit(prep)
    assert result.status == "completed"
    assert math.isfinite(prep.model.values()["k"])


def test_host_ok_judges_a_model_that_is_not_row_wise_by_the_exact_jacobian():
    # Row i of this model depends on the parameters through rows 0..i (a cumulative sum): the
    # one-pass row-wise Jacobian, host_ok's first reference, is wrong for it, so a correct numpy
    # model must still pass (by the column-by-column Jacobian) and a wrong one still fail.
    x = torch.linspace(0.1, 2.0, 40, dtype=torch.float64)
    xn = x.numpy()

    def fn(theta, x):
        return theta[0] * x + torch.cumsum(theta[1] * x, 0)

    class Exact(NumpyModel):
        def __init__(self, scale=1.0):
            self.scale = scale

        def value(self, theta):
            return theta[0] * xn + np.cumsum(theta[1] * xn)

        def jacobian(self, theta):
            return self.value(theta), np.stack([xn, self.scale * np.cumsum(xn)], axis=1)

    theta = torch.tensor([0.7, -1.3], dtype=torch.float64)
    assert host_ok(fn, Exact(), theta, x)
    assert not host_ok(fn, Exact(1.001), theta, x)
