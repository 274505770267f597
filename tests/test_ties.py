"""Tied parameters (`params: {c2: {expr: "c1 + d"}}`): a tied fit is the fit of the model with
the tie substituted by hand, on every Jacobian path and optimizer; tied standard errors are the
delta method; the inequality pattern; config errors; what a run directory records; resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fitcli.cli import app
from fitcli.composition import TieCycle, tie_order
from fitcli.config import config_from_dict, load_config
from fitcli.experiment import execute, finish_stats
from fitcli.lm import SMALL_ROWS
from fitcli.prepare import prepare
from fitcli.train import train

PEAKS = "a1*exp(-((x-c1)/s1)**2) + a2*exp(-((x-c2)/s2)**2) + b"
# The same model with s2 = s1 and c2 = c1 + d written out.
PEAKS_BY_HAND = "a1*exp(-((x-c1)/s1)**2) + a2*exp(-((x-(c1 + d))/s1)**2) + b"
START = {"a1": 1.5, "c1": 0.8, "s1": 0.6, "a2": 1.0, "b": 0.0}
TIES = {"s2": {"expr": "s1"}, "c2": {"expr": "c1 + d"}, "d": 1.5}


def peaks_config(expr: str, params: dict, num: int = 120, **changes) -> dict:
    cfg = {
        "name": "peaks",
        "seed": 3,
        "device": "cpu",
        "epochs": 60,
        "snapshots": 2,
        "data": {
            "target": "2*exp(-((x-1)/0.5)**2) + 1.5*exp(-((x-3)/0.5)**2) + 0.3",
            "x": {"start": -2, "stop": 6, "num": num},
            "noise": {"std": 0.05},
        },
        "model": {"expr": expr, "params": params},
        "optimizer": {"name": "LevenbergMarquardt"},
    }
    cfg.update(changes)
    return cfg


def fit(raw: dict):
    """Train a config in this process: (prepared run, summary fields of the error bars)."""
    prep = prepare(config_from_dict(raw))
    result = train(
        prep.model, prep.stepper, epochs=prep.cfg.epochs, evaluate_loss=prep.evaluate_loss
    )
    return prep, finish_stats(prep, result)


def covariance(stats: dict, names: list[str]) -> np.ndarray:
    order = [stats["covariance_params"].index(n) for n in names]
    return np.array(stats["covariance"], dtype=float)[np.ix_(order, order)]


FREE = ["a1", "c1", "s1", "a2", "b", "d"]


@pytest.mark.parametrize(
    "path", ["lm-numpy", "lm-torch", "adam"], ids=["lm-numpy", "lm-torch", "adam"]
)
def test_a_tied_fit_is_the_fit_with_the_tie_substituted_by_hand(path):
    # More rows than the numpy path takes put LM on torch's autograd Jacobian.
    num = SMALL_ROWS + 100 if path == "lm-torch" else 120
    extra: dict = {}
    if path == "adam":
        extra = {"optimizer": {"name": "Adam", "lr": 0.02}, "epochs": 150}
    tied, tied_stats = fit(peaks_config(PEAKS, {**START, **TIES}, num, **extra))
    hand, hand_stats = fit(peaks_config(PEAKS_BY_HAND, {**START, "d": 1.5}, num, **extra))
    if path.startswith("lm"):
        # The path the test claims is the path that ran, for both models.
        on_host = path == "lm-numpy"
        assert (tied.stepper.lm.host is not None) == on_host
        assert (hand.stepper.lm.host is not None) == on_host
        assert tied_stats["uncertainty"]["status"] == "ok"
    got, want = tied.model.values(), hand.model.values()
    for name in FREE:
        assert got[name] == pytest.approx(want[name], rel=1e-10, abs=1e-12), name
    # The tied parameters are their ties of the fitted free ones.
    assert got["s2"] == got["s1"]
    assert got["c2"] == pytest.approx(got["c1"] + got["d"], rel=1e-15)
    np.testing.assert_allclose(
        covariance(tied_stats, FREE), covariance(hand_stats, FREE), rtol=1e-8, atol=1e-15
    )
    assert tied_stats["n_params"] == hand_stats["n_params"] == len(FREE)
    assert tied_stats["stderr"]["s2"] == pytest.approx(tied_stats["stderr"]["s1"], rel=1e-12)


def test_numpy_and_torch_jacobians_agree_through_chained_ties():
    from fitcli.lm_optim import NumpyModel
    from fitcli.model import model_function

    params = {
        **START,
        "d": {"value": 1.5, "min": 0},
        "c2": {"expr": "c1 + d"},
        "s2": {"expr": "sqrt(s1*w)"},  # a nonlinear tie of a tie and a free parameter
        "w": {"expr": "s1 + v"},
        "v": {"value": 0.2, "min": -1, "max": 1},
    }
    prep = prepare(config_from_dict(peaks_config(PEAKS, params)))
    model, x = prep.model, prep.x
    host = NumpyModel(model, x)
    theta = model.raw.detach().clone() + 0.1
    m, jac = host.jacobian(theta.numpy())
    fn = model_function(model)
    want = torch.autograd.functional.jacobian(lambda t: fn(t, x), theta)
    np.testing.assert_allclose(m, fn(theta, x).detach().numpy(), rtol=1e-13)
    np.testing.assert_allclose(jac, want.numpy(), rtol=1e-10, atol=1e-13)


def delta_method(fn, values: dict, free: list[str], cov: np.ndarray, h: float = 1e-6) -> float:
    """sqrt(g^T C g) with g the central-difference gradient of fn at the free values."""
    g = np.empty(len(free))
    for k, name in enumerate(free):
        step = h * max(1.0, abs(values[name]))
        up, down = dict(values), dict(values)
        up[name] += step
        down[name] -= step
        g[k] = (fn(up) - fn(down)) / (2 * step)
    return float(np.sqrt(g @ cov @ g))


def test_tied_standard_errors_are_the_delta_method():
    params = {
        **START,
        **TIES,
        "total": {"expr": "a1 + a2"},  # derived: appears in no model term
        "ratio": {"expr": "a1/a2*exp(c2 - c1)"},  # nonlinear, through another tie
    }
    prep, stats = fit(peaks_config(PEAKS, params))
    values = prep.model.values()
    free = stats["covariance_params"]
    cov = np.array(stats["covariance"], dtype=float)
    ties = {
        "s2": lambda p: p["s1"],
        "c2": lambda p: p["c1"] + p["d"],
        "total": lambda p: p["a1"] + p["a2"],
        "ratio": lambda p: p["a1"] / p["a2"] * np.exp(p["d"]),
    }
    for name, tie in ties.items():
        assert values[name] == pytest.approx(tie(values), rel=1e-14)
        want = delta_method(tie, values, free, cov)
        assert stats["stderr"][name] == pytest.approx(want, rel=1e-6), name


def test_a_linear_tie_of_a_linear_model_has_the_exact_covariance():
    # b = 2a + d: the model a*x + b*x**2 + c is linear in (a, c, d) with design [x + 2x^2, 1, x^2].
    rng = np.random.default_rng(7)
    x = np.linspace(-2, 3, 40)
    y = 0.5 * x + 1.7 * x**2 - 0.4 + rng.normal(0, 0.2, x.size)
    raw = {
        "name": "linear-tie",
        "device": "cpu",
        "epochs": 30,
        "snapshots": 1,
        "data": {"target": "0*x", "x": {"start": -2, "stop": 3, "num": 40}},
        "model": {
            "expr": "a*x + b*x**2 + c",
            "params": {"b": {"expr": "2*a + d"}, "d": 0.0},
        },
        "optimizer": {"name": "LevenbergMarquardt"},
    }
    prep = prepare(config_from_dict(raw))
    prep.y.copy_(torch.as_tensor(y))
    prep.dataset.y[:] = y
    result = train(prep.model, prep.stepper, epochs=30, evaluate_loss=prep.evaluate_loss)
    stats = finish_stats(prep, result)
    assert stats["covariance_params"] == ["a", "c", "d"]
    design = np.stack([x + 2 * x**2, np.ones_like(x), x**2], axis=1)
    theta, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
    s2 = float(rss[0]) / (x.size - 3)
    cov = s2 * np.linalg.inv(design.T @ design)
    values = prep.model.values()
    np.testing.assert_allclose([values[n] for n in ("a", "c", "d")], theta, rtol=1e-10)
    np.testing.assert_allclose(np.array(stats["covariance"]), cov, rtol=1e-9)
    g = np.array([2.0, 0.0, 1.0])
    assert stats["stderr"]["b"] == pytest.approx(math.sqrt(g @ cov @ g), rel=1e-9)
    assert values["b"] == pytest.approx(2 * theta[0] + theta[2], rel=1e-10)


def test_an_inequality_is_a_tie_to_a_bounded_parameter():
    # y = c1 + c2*x with c2 >= c1, written c2 = c1 + d, d >= 0; the data want c2 < c1, so the
    # fit ends on the bound d = 0, where the model is c1*(1 + x): its least squares is known.
    raw = {
        "name": "inequality",
        "seed": 1,
        "device": "cpu",
        "epochs": 200,
        "snapshots": 1,
        "data": {
            "target": "2 + 0.5*x",
            "x": {"start": 0, "stop": 4, "num": 50},
            "noise": {"std": 0.05},
        },
        "model": {
            "expr": "c1 + c2*x",
            "params": {"c2": {"expr": "c1 + d"}, "d": {"value": 1.0, "min": 0}},
        },
        "optimizer": {"name": "LevenbergMarquardt"},
    }
    prep, stats = fit(raw)
    values = prep.model.values()
    x, y = prep.dataset.x, prep.dataset.y
    assert values["c2"] >= values["c1"]
    assert values["d"] == pytest.approx(0.0, abs=1e-6)
    assert values["c1"] == pytest.approx(float(y @ (1 + x) / ((1 + x) @ (1 + x))), rel=1e-6)
    assert stats["uncertainty"]["status"] == "at_bound"
    assert "d" in stats["uncertainty"]["reason"]
    # d counts as fixed at its bound: c2's error is c1's.
    assert stats["stderr"]["c2"] == pytest.approx(stats["stderr"]["c1"], rel=1e-12)


def test_tie_order_is_topological_and_names_a_cycle():
    assert tie_order({"c": ["b", "a"], "b": ["a"]}) == ["b", "c"]
    with pytest.raises(TieCycle) as exc:
        tie_order({"a": ["b"], "b": ["c"], "c": ["a"], "q": ["a"]})
    assert exc.value.chain == ["a", "b", "c", "a"]
    assert "a -> b -> c -> a" in str(exc.value)


BAD_TIES = {
    "cycle": ({"a": {"expr": "b"}, "b": {"expr": "a"}}, "a", "ties form a cycle: a -> b -> a"),
    "self": ({"a": {"expr": "2*a"}}, "a", "ties form a cycle: a -> a"),
    "unknown": ({"a": {"expr": "bb + 1"}}, "a", "'bb' in the tie of a is neither"),
    "fixed": (
        {"a": {"expr": "b"}, "b": {"value": 2, "vary": False}},
        "a",
        "which is fixed (vary: false): a -> b",
    ),
    "x": ({"a": {"expr": "b*x"}}, "a", "a tie cannot use x"),
    "value": ({"a": {"expr": "b", "value": 3, "min": 0}}, "a", "cannot also have value, min"),
    "constant": ({"a": {"expr": "3"}}, "a", "this tie mentions no parameter"),
    "syntax": ({"a": {"expr": "b +"}}, "a", "syntax error"),
}


@pytest.mark.parametrize("case", sorted(BAD_TIES))
def test_bad_ties_are_config_errors_naming_the_key(runner, tmp_path, case):
    params, name, message = BAD_TIES[case]
    raw = {
        "data": {"target": "2*x", "x": {"start": 0, "stop": 1, "num": 10}},
        "model": {"expr": "a*x + b", "params": params},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "runs"
    result = runner.invoke(app, ["train", str(path), "-o", str(out), "--progress", "none"])
    assert result.exit_code == 2, result.output
    assert f"model.params.{name}.expr: " in result.output and message in result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_a_name_only_in_ties_must_be_declared_and_is_then_free():
    raw = peaks_config(PEAKS, {**START, **TIES})
    cfg = config_from_dict(raw)
    assert list(cfg.model.params) == ["a1", "c1", "s1", "a2", "c2", "s2", "b", "d"]
    prep = prepare(cfg)
    assert prep.model.free_names == ("a1", "c1", "s1", "a2", "b", "d")


def train_cli(runner, raw: dict, tmp_path: Path, run: str, *args: str):
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = runner.invoke(
        app, ["train", str(path), "--run-dir", str(tmp_path / run), "--progress", "none", *args]
    )
    return result, tmp_path / run


def test_run_directory_records_the_ties(runner, tmp_path):
    params = {**START, **TIES, "total": {"expr": "a1 + a2"}}
    result, run = train_cli(runner, peaks_config(PEAKS, params), tmp_path, "run")
    assert result.exit_code == 0, result.output
    s = json.loads((run / "summary.json").read_text())
    assert s["tied"] == {"c2": "c1 + d", "s2": "s1", "total": "a1 + a2"}
    assert s["covariance_params"] == FREE and s["n_params"] == len(FREE)
    assert s["params"]["total"] == pytest.approx(s["params"]["a1"] + s["params"]["a2"])
    assert all(s["stderr"][n] is not None for n in s["params"])
    assert "c2 = c1 + d" in result.output and "total = a1 + a2" in result.output
    # metrics.csv and the snapshots carry every parameter, tied ones included.
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[4:] == list(s["params"])
    # The resolved config reruns: a tied parameter is written as its expression alone.
    resolved = load_config(run / "config.yaml")
    assert resolved.model.params is not None
    assert resolved.model.params["c2"].model_dump() == {"expr": "c1 + d"}
    plot = runner.invoke(app, ["plot", str(run)])
    assert plot.exit_code == 0, plot.output
    page = (run / "report.html").read_text()
    assert "<td>c2 = c1 + d</td>" in page


def test_resume_of_a_tied_run_ends_where_the_uninterrupted_run_ends(runner, tmp_path):
    raw = peaks_config(PEAKS, {**START, **TIES}, optimizer={"name": "Adam", "lr": 0.02})
    raw["epochs"] = 30
    result, reference = train_cli(runner, raw, tmp_path, "reference")
    assert result.exit_code == 0, result.output
    path = tmp_path / "reference.yaml"
    run = tmp_path / "stopped"
    run.mkdir()
    stopped = execute(
        prepare(load_config(path)), run, command=["test"], on_epoch=lambda e, loss: e >= 11
    )
    assert stopped["status"] == "interrupted"
    resumed = runner.invoke(app, ["train", "--resume", str(run), "--progress", "none"])
    assert resumed.exit_code == 0, resumed.output
    a, b = (json.loads((p / "summary.json").read_text()) for p in (run, reference))
    assert a["params"] == b["params"] and a["stderr"] == b["stderr"]
    assert a["tied"] == b["tied"]
    assert (run / "metrics.csv").read_text().splitlines()[1:] != []


def test_ties_evaluate_with_a_leading_run_dimension():
    # What the batched sweep programs do: one row of free parameters per run.
    params = {**START, **TIES, "total": {"expr": "a1*a2 + c2"}}
    prep = prepare(config_from_dict(peaks_config(PEAKS, params)))
    model, x = prep.model, prep.x
    ext = torch.tensor([[2.0, 1.0, 0.5, 1.5, 0.3, 2.0], [1.0, -1.0, 0.7, 0.5, 0.0, 0.5]])
    batched = model.full_vector(ext)
    single = torch.stack([model.full_vector(row) for row in ext])
    assert torch.equal(batched, single)
    names = list(model.names)
    assert batched[1, names.index("total")] == 1.0 * 0.5 + (-1.0 + 0.5)
    yhat = model.predict_external(ext, x)
    assert torch.equal(yhat, torch.stack([model.predict_external(row, x) for row in ext]))
