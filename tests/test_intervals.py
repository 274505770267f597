"""Profile-likelihood and bootstrap intervals (`fitcli.intervals`, `fitcli ci`), checked
against lmfit's `conf_interval`, the closed-form t-interval of a linear model, and a plain loop
of scipy `curve_fit` refits on the same resamples."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from nist_problems import load_suite
from scipy import stats as sps
from scipy.optimize import curve_fit

import fitcli
from fitcli import intervals
from fitcli.cli import app

NIST = ROOT / "tests" / "data" / "nist"


def _problem(result: fitcli.FitResult) -> intervals.Problem:
    model = result._float64_model()
    model.set_values(result.params)
    w = None if result.sigma is None else torch.from_numpy(1.0 / result.sigma)
    return intervals.Problem(model, torch.from_numpy(result.x), torch.from_numpy(result.y), w)


def _digits(found: float, ref: float) -> float:
    return 15.0 if found == ref else -math.log10(abs(found - ref) / abs(ref))


def _decay_data(n: int = 40, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 8, n)
    return x, 3.0 * np.exp(-x / 1.7) + 0.4 + rng.normal(0, 0.08, n)


CASES = {
    "Misra1a": ("b1*(1-exp(-b2*x))", lambda p, x: p["b1"] * (1 - np.exp(-p["b2"] * x))),
    "DanWood": ("b1*x**b2", lambda p, x: p["b1"] * x ** p["b2"]),
    "decay": ("a*exp(-x/tau) + c", lambda p, x: p["a"] * np.exp(-x / p["tau"]) + p["c"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_profile_matches_lmfit_conf_interval(name):
    import lmfit

    expr, numpy_model = CASES[name]
    if name == "decay":
        x, y = _decay_data()
        start = {"a": 2.0, "tau": 1.0, "c": 0.0}
    else:
        pr = load_suite(NIST)[name]
        x, y = np.array(pr.x), np.array(pr.y)
        start = {f"b{i + 1}": v for i, v in enumerate(pr.start(2))}
    result = fitcli.fit(x=x, y=y, expr=expr, params=start, epochs=300)
    doc = intervals.profile(_problem(result), 0.95)
    assert doc["method"] == "profile" and doc["notes"] == [] and doc["elapsed_s"] > 0

    def residual(params):
        return y - numpy_model({k: params[k].value for k in params}, x)

    params = lmfit.Parameters()
    for k, v in doc["params"].items():
        params.add(k, value=v["estimate"])
    mini = lmfit.Minimizer(residual, params)
    best = mini.minimize(method="leastsq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = lmfit.conf_interval(mini, best, sigmas=[0.95])
    for k, entry in doc["params"].items():
        (iv,) = entry["intervals"]
        (_, lo), (_, est), (_, hi) = ci[k]
        assert _digits(entry["estimate"] - iv["lower"], est - lo) >= 3, (k, iv, ci[k])
        assert _digits(iv["upper"] - entry["estimate"], hi - est) >= 3, (k, iv, ci[k])


def test_linear_model_profile_is_the_t_interval():
    """For a model linear in its parameters, S(v) - S_min is exactly quadratic in v: the
    F-test interval is estimate ± t_{(1+L)/2, n-p} stderr, the covariance's t-interval."""
    rng = np.random.default_rng(0)
    x = np.linspace(-2, 2, 30)
    y = 1.0 - 0.5 * x + 0.3 * x**2 + rng.normal(0, 0.2, x.size)
    result = fitcli.fit(x=x, y=y, basis=["1", "x", "x**2"], init=[0.0, 0.0, 0.0], epochs=50)
    doc = intervals.profile(_problem(result), [0.68, 0.95])
    design = np.stack([np.ones_like(x), x, x**2], axis=1)
    coef, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = x.size - 3
    cov = rss[0] / dof * np.linalg.inv(design.T @ design)
    for k, name in enumerate(["theta0", "theta1", "theta2"]):
        entry = doc["params"][name]
        assert entry["estimate"] == pytest.approx(coef[k], rel=1e-10, abs=1e-12)
        for iv in entry["intervals"]:
            half = sps.t.ppf(0.5 + iv["level"] / 2, dof) * math.sqrt(cov[k, k])
            assert iv["lower"] == pytest.approx(coef[k] - half, rel=1e-7)
            assert iv["upper"] == pytest.approx(coef[k] + half, rel=1e-7)


def test_badly_scaled_linear_profile_is_found_by_its_first_guess(monkeypatch):
    """The first guess, estimate ± sqrt(dS (J^T J)^-1_ii), is exact for a linear model however
    the parameters are scaled: one round of refits finds every end (an unscaled pseudo-inverse
    of J^T J, whose diagonal spans 1e19 here, loses the small parameter's variance, and the
    profile then walks out to it by doublings)."""
    rng = np.random.default_rng(1)
    x = np.linspace(1.0, 2.0, 20) * 1e9
    y = 2.0 + 3e-9 * x + rng.normal(0, 0.1, x.size)
    result = fitcli.fit(x=x, y=y, expr="b1 + b2*x", params={"b1": 1.0, "b2": 1e-9}, epochs=50)
    prob = _problem(result)
    calls = []
    original = intervals._refit
    monkeypatch.setattr(intervals, "_refit", lambda *a, **k: calls.append(1) or original(*a, **k))
    doc = intervals.profile(prob, 0.95)
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = x.size - 2
    cov = rss[0] / dof * np.linalg.inv(design.T @ design)
    for k, name in enumerate(["b1", "b2"]):
        (iv,) = doc["params"][name]["intervals"]
        half = sps.t.ppf(0.975, dof) * math.sqrt(cov[k, k])
        assert iv["lower"] == pytest.approx(coef[k] - half, rel=1e-6)
        assert iv["upper"] == pytest.approx(coef[k] + half, rel=1e-6)
    assert len(calls) == 2  # the polish of the estimate, then one round for every end


def test_profile_end_beyond_a_bound_is_null():
    x, y = _decay_data()
    # c = 0.403 held within [0.2, 0.43]: its 95% profile interval (0.34 to 0.46) reaches
    # past the upper bound only.
    params = {"a": 2.0, "tau": 1.0, "c": {"value": 0.4, "min": 0.2, "max": 0.43}}
    result = fitcli.fit(x=x, y=y, expr="a*exp(-x/tau) + c", params=params, epochs=300)
    doc = intervals.profile(_problem(result), 0.95)
    (iv,) = doc["params"]["c"]["intervals"]
    assert iv["upper"] is None and iv["lower"] is not None
    assert any("c upper" in n for n in doc["notes"])


# -- bootstrap ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decay_fit():
    x, y = _decay_data(60)
    return fitcli.fit(x=x, y=y, expr="a*exp(-x/tau) + c", params={"a": 2, "tau": 1, "c": 0})


def test_bootstrap_is_seeded(decay_fit):
    prob = _problem(decay_fit)
    one = intervals.bootstrap(prob, samples=40, seed=7)
    two = intervals.bootstrap(prob, samples=40, seed=7)
    other = intervals.bootstrap(prob, samples=40, seed=8)
    assert one["params"] == two["params"]
    assert one["params"] != other["params"]
    assert np.array_equal(
        intervals.resample_indices(60, 40, 7), intervals.resample_indices(60, 40, 7)
    )


def _curve_fit_loop(fit, indices, resampling):
    """The reference: one scipy curve_fit per resample, the same draws as `fitcli.intervals`."""
    x, y = fit.x, fit.y
    p = fit.params
    est = np.array([p["a"], p["tau"], p["c"]])

    def f(x, a, tau, c):
        return a * np.exp(-x / tau) + c

    est, _ = curve_fit(f, x, y, p0=est, ftol=1e-15, xtol=1e-15, gtol=1e-15)
    resid = y - f(x, *est)
    n = x.size
    centred = (resid - resid.mean()) * math.sqrt(n / (n - 3))
    out = []
    for idx in indices:
        if resampling == "residual":
            xs, ys = x, f(x, *est) + centred[idx]
        else:
            xs, ys = x[idx], y[idx]
        b, _ = curve_fit(f, xs, ys, p0=est, ftol=1e-15, xtol=1e-15, gtol=1e-15)
        out.append(b)
    return np.array(out)


@pytest.mark.parametrize("resampling", ["residual", "case"])
def test_bootstrap_matches_a_loop_of_curve_fit_refits(decay_fit, resampling):
    prob = _problem(decay_fit)
    seed, samples = 11, 30
    doc = intervals.bootstrap(prob, [0.9], samples=samples, resampling=resampling, seed=seed)
    assert doc["converged"] == samples and doc["resampling"] == resampling
    ref = _curve_fit_loop(decay_fit, intervals.resample_indices(60, samples, seed), resampling)
    for k, name in enumerate(["a", "tau", "c"]):
        lo, hi = np.quantile(ref[:, k], [0.05, 0.95])
        (iv,) = doc["params"][name]["intervals"]
        assert iv["lower"] == pytest.approx(lo, rel=1e-6)
        assert iv["upper"] == pytest.approx(hi, rel=1e-6)


def test_residual_and_case_resampling_differ(decay_fit):
    prob = _problem(decay_fit)
    res = intervals.bootstrap(prob, samples=30, resampling="residual", seed=1)
    case = intervals.bootstrap(prob, samples=30, resampling="case", seed=1)
    assert res["params"]["tau"]["intervals"] != case["params"]["tau"]["intervals"]


def test_batched_refit_equals_single_refits(decay_fit):
    prob = _problem(decay_fit)
    fit = intervals._polish(prob)
    idx = intervals.resample_indices(60, 12, 5)
    for resampling in ("residual", "case"):
        batched = intervals.refit_resamples(prob, fit.theta[0], idx, resampling)
        single = np.concatenate(
            [
                intervals.refit_resamples(prob, fit.theta[0], idx[k : k + 1], resampling)
                for k in range(12)
            ]
        )
        np.testing.assert_allclose(batched, single, rtol=1e-9)


# -- fitcli ci and the config --------------------------------------------------------------------

DECAY_CSV = ROOT / "configs" / "data" / "decay.csv"
CONFIG = {
    "name": "decay",
    "device": "cpu",
    "epochs": 60,
    "snapshots": 2,
    "data": {"file": str(DECAY_CSV), "columns": {"x": "time_s", "y": "counts"}},
    "model": {"expr": "A*exp(-x/tau) + B", "params": {"A": 80, "tau": 5, "B": 5}},
    "optimizer": {"name": "LM"},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from typer.testing import CliRunner

    base = tmp_path_factory.mktemp("ci")
    cfg = base / "decay.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = CliRunner().invoke(
        app, ["train", str(cfg), "--run-dir", str(base / "run"), "--progress", "none"]
    )
    assert out.exit_code == 0, out.output
    return base / "run"


def test_ci_writes_intervals_and_updates_the_summary(run_dir, runner):
    out = runner.invoke(app, ["ci", str(run_dir), "--method", "profile", "--level", "0.9"])
    assert out.exit_code == 0, out.output
    doc = json.loads((run_dir / "intervals.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["intervals"] == doc and summary["status"] == "completed"
    assert doc["method"] == "profile" and doc["levels"] == [0.9]
    assert set(doc["params"]) == {"A", "tau", "B"}
    ref = fitcli.load(run_dir).intervals("profile", 0.9)
    for name, entry in doc["params"].items():
        (iv,) = entry["intervals"]
        assert iv["lower"] < entry["estimate"] < iv["upper"]
        assert iv == ref["params"][name]["intervals"][0]
    assert "tau" in out.output and "-/+" in out.output


def test_ci_json_bootstrap(run_dir, runner):
    args = ["ci", str(run_dir), "--method", "bootstrap", "--samples", "20", "--json"]
    out = runner.invoke(app, [*args, "--resampling", "case", "--seed", "3"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["method"] == "bootstrap" and doc["samples"] == 20 and doc["seed"] == 3
    assert doc["resampling"] == "case"
    assert json.loads((run_dir / "intervals.json").read_text()) == doc
    again = runner.invoke(app, [*args, "--resampling", "case", "--seed", "3"])
    assert json.loads(again.stdout)["params"] == doc["params"]


def test_ci_refuses_what_is_not_a_completed_run(run_dir, runner, tmp_path):
    out = runner.invoke(app, ["ci", str(tmp_path)])
    assert out.exit_code == 2 and "not a fitcli run directory" in out.output
    out = runner.invoke(app, ["ci", str(run_dir), "--method", "gibbs"])
    assert out.exit_code == 2
    out = runner.invoke(app, ["ci", str(run_dir), "--method", "bootstrap", "--samples", "5"])
    assert out.exit_code == 2 and "--samples" in out.output
    out = runner.invoke(app, ["ci", str(run_dir), "--level", "1.5"])
    assert out.exit_code == 2 and "level" in out.output
    copy = tmp_path / "running"
    import shutil

    shutil.copytree(run_dir, copy)
    for status in ("running", "interrupted"):
        summary = json.loads((copy / "summary.json").read_text())
        summary["status"] = status
        (copy / "summary.json").write_text(json.dumps(summary))
        before = sorted(p.name for p in copy.iterdir())
        (copy / "intervals.json").unlink(missing_ok=True)
        out = runner.invoke(app, ["ci", str(copy)])
        assert out.exit_code == 2, out.output
        assert f"the run is {status}" in out.output
        assert not (copy / "intervals.json").exists()
        assert json.loads((copy / "summary.json").read_text()) == summary
        _ = before


def test_train_computes_the_configured_intervals(tmp_path, runner):
    cfg = tmp_path / "c.yaml"
    changed = {
        **CONFIG,
        "uncertainty": {"method": "bootstrap", "samples": 20, "level": [0.68, 0.95]},
    }
    cfg.write_text(yaml.safe_dump(changed))
    out = runner.invoke(
        app, ["train", str(cfg), "--run-dir", str(tmp_path / "r"), "--progress", "none"]
    )
    assert out.exit_code == 0, out.output
    doc = json.loads((tmp_path / "r" / "intervals.json").read_text())
    assert doc["method"] == "bootstrap" and doc["levels"] == [0.68, 0.95]
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["intervals"] == doc
    # The same draws as `fitcli ci` with the config's defaults.
    assert fitcli.load(tmp_path / "r").intervals()["params"] == doc["params"]
    assert "bootstrap" in out.output


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("uncertainty.method=prof", "uncertainty.method: must be one of covariance, profile"),
        ("uncertainty.level=1", "uncertainty.level: must be between 0 and 1"),
        ("uncertainty.level=[0.5, 0]", "uncertainty.level: must be between 0 and 1"),
        ("uncertainty.samples=9", "uncertainty.samples: must be >= 10"),
        ("uncertainty.resampling=rows", "uncertainty.resampling: must be one of residual, case"),
    ],
)
def test_uncertainty_config_is_validated(write_config, runner, override, words):
    out = runner.invoke(app, ["check", str(write_config()), override])
    assert out.exit_code == 2
    assert words in out.output


def test_profile_needs_least_squares(tmp_path):
    x, y = _decay_data()
    result = fitcli.fit(
        x=x, y=y, expr="a*exp(-x/tau) + c", params={"a": 2, "tau": 1, "c": 0}, loss="cauchy"
    )
    with pytest.raises(fitcli.InputError, match="least squares"):
        result.intervals("profile")


NUMPY_CASES = {
    "expression": ({"a": 2, "tau": 1, "c": 0}, False, "_LanesModel"),
    "sigma": ({"a": 2, "tau": 1, "c": 0}, True, "_LanesModel"),
    "bounds": (
        {"a": 2, "tau": {"value": 1, "min": 0.1, "max": 9}, "c": 0},
        True,
        "_LanesModel",
    ),
    "lower bound": ({"a": 2, "tau": {"value": 1, "min": 0.1}, "c": 0}, False, "_TorchLanesModel"),
    "tie": ({"a": 2, "tau": 1, "c": {"expr": "a / 10"}}, False, "_TorchLanesModel"),
}


@pytest.mark.parametrize("case", list(NUMPY_CASES))
def test_numpy_lanes_give_the_intervals_of_torch_lanes(monkeypatch, case):
    """A small problem on the CPU refits in numpy lanes (`Problem.host`): an expression by the
    symdiff model of all lanes (checked against torch; two-sided bounds too), one-sided
    bounds and ties by torch's Jacobian; they give the profile and bootstrap intervals of the
    torch lanes."""
    params, weighted, kind = NUMPY_CASES[case]
    x, y = _decay_data(60)
    sigma = 0.05 + 0.02 * x if weighted else None
    fit = fitcli.fit(x=x, y=y, sigma=sigma, expr="a*exp(-x/tau) + c", params=params)
    prob = _problem(fit)
    assert type(prob.host).__name__ == kind
    docs = [intervals.profile(prob, [0.68, 0.95]), intervals.bootstrap(prob, samples=20, seed=2)]
    monkeypatch.setattr(intervals, "_host_model", lambda prob: None)
    torch_prob = _problem(fit)
    assert torch_prob.host is None
    refs = [intervals.profile(torch_prob, [0.68, 0.95])]
    refs.append(intervals.bootstrap(torch_prob, samples=20, seed=2))
    for doc, ref in zip(docs, refs, strict=True):
        for name, entry in ref["params"].items():
            pairs = zip(doc["params"][name]["intervals"], entry["intervals"], strict=True)
            for iv, iv_ref in pairs:
                assert iv["lower"] == pytest.approx(iv_ref["lower"], rel=1e-9)
                assert iv["upper"] == pytest.approx(iv_ref["upper"], rel=1e-9)
