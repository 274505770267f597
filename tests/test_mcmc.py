"""MCMC intervals (`uncertainty.method: mcmc`, `fitcli ci --method mcmc`): emcee's posterior
against the exact posteriors of linear models, the chains' diagnostics, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from conftest import ROOT
from nist_problems import load_suite
from scipy import stats as sps

import fitcli
from fitcli.cli import app
from fitcli.mcmc import split_rhat

RNG = np.random.default_rng(7)
X = np.linspace(0.0, 4.0, 40)
DESIGN = np.stack([np.ones_like(X), X, X**2], axis=1)
TRUE = np.array([1.0, 2.0, -0.5])
Y = DESIGN @ TRUE + RNG.normal(0.0, 0.3, X.size)
SIGMA = np.full(X.size, 0.3)
EXPR = "a + b*x + c*x**2"
START = {"a": 0.0, "b": 0.0, "c": 0.0}


def _fit(**kw):
    return fitcli.fit(x=X, y=Y, expr=EXPR, params=START, optimizer="LM", epochs=50, **kw)


def _linear_reference(weights: np.ndarray | None, absolute: bool, level: float):
    """Least squares by numpy: the estimate and the exact posterior's central interval of a
    linear model under a flat prior: normal with known sigma, Student t (n - p dof) with the
    noise integrated out under Jeffreys' prior."""
    w = np.ones_like(X) if weights is None else weights
    a, b = DESIGN * w[:, None], Y * w
    theta, *_ = np.linalg.lstsq(a, b, rcond=None)
    cov = np.linalg.inv(a.T @ a)
    n, p = a.shape
    if absolute:
        q = sps.norm.ppf((1 + level) / 2)
    else:
        cov = cov * float(np.sum((b - a @ theta) ** 2)) / (n - p)
        q = sps.t.ppf((1 + level) / 2, n - p)
    half = q * np.sqrt(np.diag(cov))
    return theta, half, cov


@pytest.mark.parametrize("absolute", [False, True])
def test_linear_model_credible_intervals_are_the_exact_posterior(absolute):
    kw = {"sigma": SIGMA, "data.absolute_sigma": True} if absolute else {}
    doc = _fit(**kw).intervals("mcmc", 0.95, steps=3000, seed=1)
    theta, half, _ = _linear_reference(1 / SIGMA if absolute else None, absolute, 0.95)
    assert doc["method"] == "mcmc" and doc["converged"], doc["reason"]
    assert doc["likelihood"] == (
        "gaussian, sigma absolute" if absolute else "gaussian, noise integrated out"
    )
    for k, name in enumerate("abc"):
        entry = doc["params"][name]
        (iv,) = entry["intervals"]
        assert entry["estimate"] == pytest.approx(theta[k], rel=1e-7, abs=1e-9)
        # Monte Carlo error of a 2.5% quantile from about 3,000 effective samples is about
        # 0.05 standard deviations, 2.5% of the half-width: 10% is four times that.
        assert iv["lower"] == pytest.approx(theta[k] - half[k], abs=0.1 * half[k])
        assert iv["upper"] == pytest.approx(theta[k] + half[k], abs=0.1 * half[k])
        assert entry["r_hat"] < 1.05 and entry["effective_samples"] > 1000


def test_credible_band_of_a_linear_model_is_its_confidence_band():
    doc = _fit().intervals("mcmc", [0.68, 0.95], steps=3000, seed=2)
    band = doc["band"]
    grid = np.asarray(band["x"])
    assert grid[0] == X.min() and grid[-1] == X.max() and 1900 <= band["draws"] <= 2100
    theta, _, cov = _linear_reference(None, False, 0.95)
    g = np.stack([np.ones_like(grid), grid, grid**2], axis=1)
    fit = g @ theta
    se = np.sqrt(np.einsum("ij,jk,ik->i", g, cov, g))
    half = sps.t.ppf(0.975, X.size - 3) * se
    # Monte Carlo error from about 2,000 nearly independent draws: the median's about 0.014,
    # a 2.5% quantile's about 0.03 of the half-width here.
    assert np.all(np.abs(np.asarray(band["median"]) - fit) < 0.07 * half)
    assert np.all(np.abs(np.asarray(band["cred_lower_95"]) - (fit - half)) < 0.12 * half)
    assert np.all(np.abs(np.asarray(band["cred_upper_95"]) - (fit + half)) < 0.12 * half)
    inner = np.asarray(band["cred_upper_68"]) - np.asarray(band["cred_lower_68"])
    assert np.all(inner < np.asarray(band["cred_upper_95"]) - np.asarray(band["cred_lower_95"]))


def test_seeded_and_bounded():
    r = fitcli.fit(
        x=X,
        y=Y,
        expr=EXPR,
        optimizer="LM",
        epochs=50,
        params={"a": 0.0, "b": {"value": 1.0, "max": 2.1}, "c": 0.0},
    )
    one = r.intervals("mcmc", 0.99, steps=1000, seed=5)
    two = r.intervals("mcmc", 0.99, steps=1000, seed=5)
    other = r.intervals("mcmc", 0.99, steps=1000, seed=6)
    assert one["params"] == two["params"] and one["band"] == two["band"]
    assert one["params"] != other["params"]
    # The flat prior stops at the bound: no posterior draw beyond b's max.
    assert one["params"]["b"]["intervals"][0]["upper"] <= 2.1


def test_a_short_chain_is_not_called_converged():
    doc = _fit().intervals("mcmc", 0.95, steps=100, burn=0, seed=0)
    assert doc["converged"] is False
    assert "autocorrelation times" in doc["reason"] and "run more steps" in doc["reason"]
    assert doc["reason"] in doc["notes"]


def test_an_improper_posterior_is_reported_not_summarised():
    # NIST BoxBOD, b1*(1 - exp(-b2*x)) on six points: the curve hardly changes once b2 is
    # large, so under a flat prior b2's posterior does not fall off and the walkers drift away.
    pr = load_suite(ROOT / "tests" / "data" / "nist")["BoxBOD"]
    x, y = np.array(pr.x), np.array(pr.y)
    expr, start = "b1*(1 - exp(-b2*x))", {"b1": pr.certified[0], "b2": pr.certified[1]}
    r = fitcli.fit(x=x, y=y, expr=expr, params=start, optimizer="LM", epochs=100)
    # Long enough for the walkers to run off whatever the random stream (at 5000 steps some
    # seeds stopped at an R-hat); at 20000, seed 0's overflowed to inf and emcee raised, before
    # the flat prior stopped at mcmc.FLAT_LIMIT.
    doc = r.intervals("mcmc", 0.95, steps=20000, seed=0)
    assert doc["converged"] is False
    assert "do not settle (b2 reaches" in doc["reason"] and "give it bounds" in doc["reason"]
    assert "skipped" in doc["band"]
    json.dumps(doc, allow_nan=False)  # what intervals.json and summary.json must hold
    bounded = fitcli.fit(
        x=x,
        y=y,
        expr=expr,
        optimizer="LM",
        epochs=100,
        params={"b1": start["b1"], "b2": {"value": start["b2"], "min": 0.0, "max": 5.0}},
    )
    doc = bounded.intervals("mcmc", 0.95, steps=3000, seed=0)
    assert "do not settle" not in doc["reason"]
    assert doc["params"]["b2"]["intervals"][0]["upper"] <= 5.0


def test_split_rhat_tells_mixed_from_stuck_chains():
    rng = np.random.default_rng(0)
    mixed = rng.normal(size=(2000, 8, 2))
    stuck = mixed + np.arange(8)[None, :, None]  # every walker around its own mean
    assert np.all(np.abs(split_rhat(mixed) - 1) < 0.01)
    assert np.all(split_rhat(stuck) > 2)
    # A trend within each chain shows in the split halves.
    drift = mixed + np.linspace(0, 3, 2000)[:, None, None]
    assert np.all(split_rhat(drift) > 1.2)


def test_bad_sampler_settings_are_input_errors():
    r = _fit()
    with pytest.raises(fitcli.InputError, match="walkers"):
        r.intervals("mcmc", 0.95, walkers=4, steps=200)
    with pytest.raises(fitcli.InputError, match="burn"):
        r.intervals("mcmc", 0.95, steps=200, burn=200)


CONFIG = {
    "name": "mcmc-quad",
    "device": "cpu",
    "epochs": 50,
    "snapshots": 2,
    "data": {
        "x": {"start": 0, "stop": 4, "num": 40},
        "target": "1 + 2*x - 0.5*x**2",
        "noise": {"std": 0.3},
    },
    "model": {"expr": EXPR, "params": START},
    "optimizer": {"name": "LM"},
    "uncertainty": {"method": "mcmc", "steps": 1500, "level": [0.68, 0.95]},
}


def test_train_and_ci_with_mcmc(tmp_path, runner):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    run = tmp_path / "run"
    out = runner.invoke(app, ["train", str(cfg), "--run-dir", str(run), "--progress", "none"])
    assert out.exit_code == 0, out.output
    summary = json.loads((run / "summary.json").read_text())
    doc = json.loads((run / "intervals.json").read_text())
    assert summary["intervals"] == doc and doc["method"] == "mcmc" and doc["steps"] == 1500
    assert "R-hat" in out.output
    # The same run, the same seed stream: fitcli.load gives the same chain.
    again = fitcli.load(run).intervals()
    assert again["params"] == doc["params"]
    out = runner.invoke(app, ["plot", str(run)])
    assert out.exit_code == 0, out.output
    html = (run / "report.html").read_text()
    assert "Intervals (mcmc)" in html and "R-hat" in html and doc["reason"] in html
    # The credible band is drawn from intervals.json's band: its traces are in the page.
    assert 'id="fitcli-credible"' in html and "95% credible band" in html
    assert "posterior median of the curve" in html
    out = runner.invoke(
        app, ["ci", str(run), "--method", "mcmc", "--steps", "600", "--seed", "4", "--json"]
    )
    assert out.exit_code == 0, out.output
    ci = json.loads(out.stdout)
    assert ci["steps"] == 600 and ci["seed"] == 4 and ci["burn"] == 150
    assert json.loads((run / "intervals.json").read_text()) == ci
    out = runner.invoke(app, ["ci", str(run), "--method", "mcmc", "--walkers", "5"])
    assert out.exit_code == 2 and "walkers" in out.output and "Traceback" not in out.output


def test_config_burn_not_below_steps_is_a_config_error(tmp_path, runner):
    cfg = tmp_path / "c.yaml"
    bad = json.loads(json.dumps(CONFIG))
    bad["uncertainty"].update(steps=500, burn=500)
    cfg.write_text(yaml.safe_dump(bad))
    out = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "runs")])
    assert out.exit_code == 2 and "burn" in out.output and "uncertainty" in out.output
    assert not (tmp_path / "runs").exists()
