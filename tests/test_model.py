"""Models: bounds by reparametrisation, fixed parameters, gradients against hand-written torch."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fitcli.config import config_from_dict
from fitcli.expr import parse_expression
from fitcli.model import BasisModel, ExprModel, ParamInfo, build_model, to_internal


def expr_model(expr: str, infos: list[ParamInfo]) -> ExprModel:
    return ExprModel(parse_expression(expr), infos, torch.float64)


@given(
    lo=st.floats(-1e3, 1e3),
    width=st.floats(1e-3, 1e3),
    frac=st.floats(0.001, 0.999),
)
@settings(max_examples=200, deadline=None)
def test_internal_external_round_trip_both_bounds(lo, width, frac):
    hi = lo + width
    value = lo + frac * width
    info = ParamInfo("a", value, lo, hi)
    m = expr_model("a*x", [info])
    assert m.values()["a"] == pytest.approx(value, rel=1e-9, abs=1e-9 * width)


@given(value=st.floats(1e-6, 1e6), lower=st.booleans())
@settings(max_examples=200, deadline=None)
def test_internal_external_round_trip_one_bound(value, lower):
    info = ParamInfo("a", value, 0.0, None) if lower else ParamInfo("a", -value, None, 0.0)
    m = expr_model("a*x", [info])
    assert m.values()["a"] == pytest.approx(info.value, rel=1e-9)


def test_bounds_hold_throughout_training():
    """A huge learning rate pushes hard against the bounds; they must hold every epoch."""
    m = expr_model("a*x + b", [ParamInfo("a", 0.5, 0.0, 1.0), ParamInfo("b", 0.5, -1.0, None)])
    x = torch.linspace(0, 1, 50, dtype=torch.float64)
    y = 10 * x - 50  # optimum a=10, b=-50 lies outside both bounds
    opt = torch.optim.SGD([m.raw], lr=5.0)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.mean((m(x) - y) ** 2)
        loss.backward()
        opt.step()
        v = m.values()
        assert 0.0 <= v["a"] <= 1.0 and v["b"] >= -1.0
    # residual (a-10)x + b + 50 > 0 everywhere: both are pressed against their lower bounds
    assert v["a"] < 0.01 and v["b"] < -0.99


def test_fixed_parameter_never_moves_and_is_not_optimised():
    m = expr_model("a*x + c", [ParamInfo("a", 1.0), ParamInfo("c", 3.0, vary=False)])
    assert m.free_names == ("a",) and m.raw.shape == (1,)
    x = torch.linspace(0, 1, 20, dtype=torch.float64)
    opt = torch.optim.Adam([m.raw], lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        torch.mean((m(x) - (2 * x + 7)) ** 2).backward()
        opt.step()
    assert m.values()["c"] == 3.0 and m.values()["a"] != 1.0


def test_expression_gradients_match_hand_written_torch():
    m = expr_model(
        "a*sin(b*x) + c", [ParamInfo("a", 1.3), ParamInfo("b", 0.7), ParamInfo("c", -0.2)]
    )
    x = torch.linspace(-3, 3, 40, dtype=torch.float64)
    y = torch.cos(x)
    loss = torch.mean((m(x) - y) ** 2)
    (g,) = torch.autograd.grad(loss, m.raw)
    a, b, c = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (1.3, 0.7, -0.2))
    ref = torch.mean((a * torch.sin(b * x) + c - y) ** 2)
    ref_g = torch.autograd.grad(ref, (a, b, c))
    assert torch.allclose(g, torch.stack(ref_g), rtol=1e-13, atol=0)


def test_basis_model_is_design_matrix_times_theta():
    basis = [parse_expression(s, allow_params=False) for s in ("x", "sin(x)", "cos(x/4)")]
    m = BasisModel(basis, [0.1, -0.2, 0.3], torch.float64)
    x = torch.linspace(-10, 10, 100, dtype=torch.float64)
    expect = 0.1 * x - 0.2 * torch.sin(x) + 0.3 * torch.cos(x / 4)
    assert torch.allclose(m(x), expect, rtol=1e-14, atol=1e-14)
    assert torch.equal(m.bind(x)(), m(x))
    idx = torch.tensor([3, 50, 7])
    assert torch.allclose(m.predict_rows(x, idx), expect[idx], rtol=1e-14, atol=1e-14)


def test_basis_init_is_drawn_under_the_seed():
    raw = {
        "data": {"target": "x", "x": {"start": 0, "stop": 1, "num": 5}},
        "model": {"basis": ["x", "1"]},
    }
    cfg = config_from_dict(raw)
    a = build_model(cfg.model, 123, torch.float64).values()
    b = build_model(cfg.model, 123, torch.float64).values()
    c = build_model(cfg.model, 124, torch.float64).values()
    assert a == b and a != c
    cfg2 = config_from_dict({**raw, "model": {"basis": ["x", "1"], "init": [2, 3]}})
    assert build_model(cfg2.model, 0, torch.float64).values() == {"theta0": 2.0, "theta1": 3.0}


def test_at_bound_names_parameters_on_their_bounds():
    m = expr_model("a*x + b", [ParamInfo("a", 0.5, 0.0, 1.0), ParamInfo("b", 1.0)])
    with torch.no_grad():
        m.raw[0] = 60.0  # sigmoid saturates: a == 1.0 in float64
    assert m.at_bound() == ["a"]


def test_to_internal_inverse_of_softplus_is_stable():
    info = ParamInfo("a", 1e-8, 0.0, None)
    u = to_internal(info, 1e-8)
    assert math.isfinite(u)
    assert float(
        torch.nn.functional.softplus(torch.tensor(u, dtype=torch.float64))
    ) == pytest.approx(1e-8, rel=1e-6)


def test_batched_parameters_broadcast():
    m = expr_model("a*x + b", [ParamInfo("a", 1.0, 0, 5), ParamInfo("b", 2.0)])
    x = torch.linspace(0, 1, 7, dtype=torch.float64)
    raw = torch.stack([m.raw.detach(), m.raw.detach() + 0.1])
    out = m.predict(raw, x)
    assert out.shape == (2, 7)
    assert torch.allclose(out[0], m(x).detach())


@pytest.mark.parametrize("rows", [4, 1 << 17])
def test_the_start_check_names_the_first_point_where_the_model_is_not_finite(monkeypatch, rows):
    # The check evaluates the model chunk by chunk on large data: the point it names is the
    # first one in the data's order where numpy's log is not finite, in whichever chunk.
    import numpy as np

    from fitcli import model as model_module
    from fitcli.errors import DataError

    monkeypatch.setattr(model_module, "CHECK_ROWS", rows)
    m = expr_model("a*log(x - c)", [ParamInfo("a", 2.0), ParamInfo("c", 0.5)])
    xs = np.concatenate([np.linspace(1, 3, 9), [0.25, 0.4], np.linspace(1, 2, 8)])
    first = int(np.flatnonzero(~np.isfinite(2.0 * np.log(xs - 0.5)))[0])
    with pytest.raises(DataError, match=f"at x = {float(xs[first])!r} with"):
        model_module.check_finite_start(m, torch.as_tensor(xs), xs)
    good = xs[xs > 0.5]
    model_module.check_finite_start(m, torch.as_tensor(good), good)  # finite: no error
