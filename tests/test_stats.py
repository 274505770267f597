"""Fit statistics against scipy's curve_fit and hand formulas; singular and unconverged fits;
error bars, statistics, the closed-form optimum and the truth after any optimizer."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from conftest import SMALL, only_run_dir
from scipy.optimize import curve_fit

from fitcli.cli import app
from fitcli.config import config_from_dict
from fitcli.experiment import finish_stats
from fitcli.prepare import prepare
from fitcli.stats import (
    expression_truth,
    fit_statistics,
    linear_optimum,
    linear_optimum_chunked,
    truth_distance,
)
from fitcli.train import train

RNG = np.random.default_rng(42)
XS = np.linspace(0.1, 5, 80)
SIGMA = 0.05 + 0.03 * XS
YS = 2.5 * np.exp(-0.9 * XS) + 0.3 + RNG.normal(0, SIGMA)
NAMES = ["a", "k", "c"]


def decay_np(x, a, k, c):
    return a * np.exp(-k * x) + c


def decay(t, x):
    return t[0] * torch.exp(-t[1] * x) + t[2]


def gaussian_np(x, a, mu, s):
    return a * np.exp(-((x - mu) ** 2) / (2 * s**2))


def gaussian(t, x):
    return t[0] * torch.exp(-((x - t[1]) ** 2) / (2 * t[2] ** 2))


@pytest.mark.parametrize("sigma, absolute_sigma", [(None, False), (SIGMA, False), (SIGMA, True)])
@pytest.mark.parametrize("problem", ["decay", "gaussian"])
def test_covariance_matches_curve_fit(problem, sigma, absolute_sigma):
    if problem == "decay":
        f_np, f, ys, p0 = decay_np, decay, YS, [1, 1, 0]
    else:
        f_np, f, p0 = gaussian_np, gaussian, [1, 2, 1]
        ys = gaussian_np(XS, 1.7, 2.2, 0.8) + RNG.normal(0, SIGMA)
    popt, pcov = curve_fit(
        f_np, XS, ys, p0=p0, sigma=sigma, absolute_sigma=absolute_sigma, xtol=1e-15, ftol=1e-15
    )
    weights = torch.tensor(1 / sigma) if sigma is not None else None
    stats = fit_statistics(
        f,
        torch.tensor(popt),
        torch.tensor(XS),
        torch.tensor(ys),
        NAMES,
        weights=weights,
        absolute_sigma=absolute_sigma,
    )
    assert stats.status == "ok", stats.reason
    # curve_fit's Jacobian is a finite difference: agreement to ~1e-5 of the largest entry.
    scale = np.abs(pcov).max()
    np.testing.assert_allclose(np.array(stats.covariance), pcov, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose([stats.stderr[n] for n in NAMES], np.sqrt(np.diag(pcov)), rtol=1e-5)
    corr = pcov / np.outer(np.sqrt(np.diag(pcov)), np.sqrt(np.diag(pcov)))
    np.testing.assert_allclose(np.array(stats.correlation), corr, rtol=1e-5, atol=1e-5)


def test_goodness_of_fit_against_hand_formulas():
    popt, _ = curve_fit(decay_np, XS, YS, p0=[1, 1, 0], sigma=SIGMA)
    stats = fit_statistics(
        decay,
        torch.tensor(popt),
        torch.tensor(XS),
        torch.tensor(YS),
        NAMES,
        weights=torch.tensor(1 / SIGMA),
    )
    w = 1 / SIGMA
    r = w * (YS - decay_np(XS, *popt))
    rss = float(r @ r)
    ybar = np.sum(w**2 * YS) / np.sum(w**2)
    tss = float(np.sum(w**2 * (YS - ybar) ** 2))
    n, p = XS.size, 3
    assert (stats.n_points, stats.n_params) == (n, p)
    assert stats.rss == pytest.approx(rss, rel=1e-12)
    assert stats.r2 == pytest.approx(1 - rss / tss, rel=1e-12)
    assert stats.chi2_reduced == pytest.approx(rss / (n - p), rel=1e-12)
    assert stats.aic == pytest.approx(n * math.log(rss / n) + 2 * p, rel=1e-12)
    assert stats.bic == pytest.approx(n * math.log(rss / n) + math.log(n) * p, rel=1e-12)
    assert stats.condition_number is not None and stats.condition_number > 1


def test_linear_optimum_matches_numpy_lstsq():
    design = np.stack([np.ones_like(XS), XS, XS**2, np.sin(XS)], 1)
    for w in (None, 1 / SIGMA):
        a = design * w[:, None] if w is not None else design
        b = YS * w if w is not None else YS
        expected, res, *_ = np.linalg.lstsq(a, b, rcond=None)
        theta, rss = linear_optimum(
            torch.tensor(design), torch.tensor(YS), torch.tensor(w) if w is not None else None
        )
        np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-10)
        assert rss == pytest.approx(float(res[0]), rel=1e-10)


def test_linear_optimum_rank_deficient_is_minimum_norm():
    design = np.stack([np.ones_like(XS), XS, XS], 1)
    expected, *_ = np.linalg.lstsq(design, YS, rcond=None)
    theta, _ = linear_optimum(torch.tensor(design), torch.tensor(YS))
    np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-10)


def test_duplicate_basis_columns_are_singular_and_named():
    def fn(t, x):
        return t[0] * x + t[1] * x + t[2]

    x = torch.tensor(XS)
    y = torch.tensor(1.5 * XS + 0.2)
    stats = fit_statistics(fn, torch.tensor([1.0, 0.5, 0.2]), x, y, ["a", "b", "c"])
    assert stats.status == "singular"
    assert "a, b" in stats.reason and "c" not in stats.reason.split(":")[1].split("are")[0]
    assert stats.stderr["a"] is None and stats.stderr["b"] is None
    assert stats.stderr["c"] is not None
    json.dumps(asdict(stats), allow_nan=False)


def test_parameter_without_effect_is_singular():
    stats = fit_statistics(
        lambda t, x: t[0] * x + 0 * t[1],
        torch.tensor([1.0, 2.0]),
        torch.tensor(XS),
        torch.tensor(YS),
        ["a", "unused"],
    )
    assert stats.status == "singular"
    assert "unused" in stats.reason and stats.stderr["unused"] is None
    assert stats.stderr["a"] is not None


def test_not_converged_away_from_the_minimum():
    popt, pcov = curve_fit(decay_np, XS, YS, p0=[1, 1, 0], xtol=1e-15, ftol=1e-15)
    x, y = torch.tensor(XS), torch.tensor(YS)
    at_min = fit_statistics(decay, torch.tensor(popt), x, y, NAMES)
    assert at_min.status == "ok"
    moved = popt.copy()
    moved[1] += 2 * math.sqrt(pcov[1, 1])
    stats = fit_statistics(decay, torch.tensor(moved), x, y, NAMES)
    assert stats.status == "not_converged"
    assert stats.reason.startswith("gradient still large")
    assert "k" in stats.reason
    assert all(v is not None for v in stats.stderr.values())


def test_at_bound_parameters_are_named_and_fixed():
    popt, _ = curve_fit(decay_np, XS, YS, p0=[1, 1, 0])
    stats = fit_statistics(
        decay, torch.tensor(popt), torch.tensor(XS), torch.tensor(YS), NAMES, at_bound=["c"]
    )
    assert stats.status == "at_bound"
    assert "c" in stats.reason
    assert stats.stderr["c"] is None
    assert stats.stderr["a"] is not None
    json.dumps(asdict(stats), allow_nan=False)


def test_too_few_points_does_not_crash():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    stats = fit_statistics(decay, torch.tensor([1.0, 0.5, 0.0]), x, x.clone(), NAMES)
    assert stats.status == "singular"
    assert stats.chi2_reduced is None
    assert all(v is None for v in stats.stderr.values())
    json.dumps(asdict(stats), allow_nan=False)


def test_truth_distance():
    got = truth_distance(
        {"a": 1.2, "b": 3.0, "c": 0.0}, {"a": 1.0, "b": 3.5}, {"a": 0.1, "b": None}
    )
    assert got["a"] == pytest.approx(2.0)
    assert got["b"] is None and got["c"] is None


# Error bars and statistics after any optimizer, through the recipe (`finish_stats`).


def run(raw: dict):
    cfg = config_from_dict(raw)
    prep = prepare(cfg)
    result = train(prep.model, prep.stepper, epochs=cfg.epochs, evaluate_loss=prep.evaluate_loss)
    return prep, result, finish_stats(prep, result)


def small(**changes) -> dict:
    cfg = json.loads(json.dumps(SMALL))
    cfg.update(changes)
    return cfg


def test_sgd_run_reports_optimum_gap_and_truth():
    prep, result, stats = run(small(epochs=40))
    ds = prep.dataset
    design = np.stack([ds.x, np.sin(ds.x), np.cos(ds.x / 4)], 1)
    coef, res, *_ = np.linalg.lstsq(design, ds.y, rcond=None)
    assert stats["optimum_loss"] == pytest.approx(res[0] / ds.n, rel=1e-10)
    assert stats["gap"] == pytest.approx(
        (result.final_loss - stats["optimum_loss"]) / stats["optimum_loss"], rel=1e-12
    )
    assert stats["gap"] > 0
    assert stats["truth"] == pytest.approx({"theta0": 0.0, "theta1": 1.5, "theta2": 1.2})
    values = prep.model.values()
    for name in ("theta1", "theta2"):
        d = (values[name] - stats["truth"][name]) / stats["stderr"][name]
        assert stats["truth_distance"][name] == pytest.approx(d)
    # 40 epochs of SGD do not reach the minimum; the error bars say so.
    assert stats["uncertainty"]["status"] == "not_converged"
    assert stats["n_points"] == 200 and stats["n_params"] == 3
    json.dumps(stats, allow_nan=False)


def test_target_outside_the_basis_has_no_truth():
    _, _, stats = run(small(epochs=5, data={**SMALL["data"], "target": "exp(x/5)"}))
    assert "truth" not in stats and stats["optimum_loss"] > 0


def test_l1_loss_has_no_least_squares_optimum():
    _, _, stats = run(small(epochs=5, loss="l1"))
    assert "optimum_loss" not in stats and "stderr" in stats


def test_adam_on_an_expression_with_bounds_gets_truth_and_error_bars():
    raw = small(
        epochs=300,
        optimizer={"name": "Adam", "lr": 0.1},
        data={**SMALL["data"], "target": "2*exp(-0.3*x**2) + 0.5", "noise": {"std": 0.05}},
        model={
            "expr": "a*exp(-k*x**2) + c",
            "params": {"a": {"value": 1.0, "min": 0.0, "max": 10.0}, "k": 0.5, "c": 0.0},
        },
    )
    prep, _, stats = run(raw)
    assert stats["truth"] == {"a": 2.0, "k": 0.3, "c": 0.5}
    assert all(abs(v) < 5 for v in stats["truth_distance"].values())
    assert stats["uncertainty"]["condition_number"] > 1
    assert len(stats["covariance"]) == 3


def test_float32_run_gets_float64_error_bars():
    _, _, s64 = run(small(epochs=40))
    _, _, s32 = run(small(epochs=40, dtype="float32"))
    for name in ("theta0", "theta1", "theta2"):
        assert s32["stderr"][name] == pytest.approx(s64["stderr"][name], rel=1e-4)


def test_summary_table_shows_value_plus_minus_stderr(runner, write_config, tmp_path):
    result = runner.invoke(
        app, ["train", str(write_config()), "--out", str(tmp_path), "--progress", "none"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    for name, value in summary["params"].items():
        assert f"{value:.8g} ± {summary['stderr'][name]:.3g}" in result.output
    assert "optimum" in result.output and "gap" in result.output
    assert "error bars  not_converged" in result.output
    assert "(fit-truth)/σ" in result.output


def test_linear_optimum_chunked_equals_the_whole_problem():
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.normal(size=(500, 4)))
    y = torch.tensor(rng.normal(size=500))
    w = torch.tensor(rng.uniform(0.5, 2, 500))
    theta, rss = linear_optimum(a, y, w)
    got, got_rss, rank = linear_optimum_chunked(lambda sl: a[sl], y, 500, 4, w, chunk_rows=33)
    np.testing.assert_allclose(got.numpy(), theta.numpy(), rtol=1e-10, atol=1e-12)
    assert got_rss == pytest.approx(rss, rel=1e-10) and rank == 4
    dup = torch.cat([a, a[:, :1]], 1)
    _, dup_rss, dup_rank = linear_optimum_chunked(lambda sl: dup[sl], y, 500, 5, chunk_rows=100)
    assert dup_rank == 4 and dup_rss == pytest.approx(linear_optimum(a, y)[1], rel=1e-10)


@pytest.mark.parametrize(
    "expr, target, expected",
    [
        ("a*sin(b*x) + c", "1.5*sin(2*x) + 0.5", {"a": 1.5, "b": 2.0, "c": 0.5}),
        ("a*sin(b*x) + c", "1.5*sin(2*x) - 0.5", {"a": 1.5, "b": 2.0, "c": -0.5}),
        ("a*exp(-k*x)", "2*exp(-0.25*x)", {"a": 2.0, "k": 0.25}),
        ("a*x + a", "2*x + 2", {"a": 2.0}),
        ("a*x + a", "2*x + 3", {}),
        ("a*sin(x)", "sin(x)*1.5", {}),
        ("a*x", "a*x +", {}),
    ],
)
def test_expression_truth(expr, target, expected):
    names = sorted(expected) or ["a"]
    assert expression_truth(expr, target, names) == expected


@pytest.mark.parametrize(
    ("params", "sigma", "status"),
    [
        ({"a": 2.0, "k": 1.0, "c": 0.1}, False, "ok"),
        (
            {"a": {"value": 2.0, "min": 0.0, "max": 10.0}, "k": {"value": 1.0, "min": 0.0}},
            True,
            "ok",
        ),
        ({"a": 2.0, "k": 1.0, "c": {"value": 0.3, "vary": False}}, True, "ok"),
        ({"a": 2.0, "k": {"value": 0.5, "max": 0.6}, "c": 0.1}, False, "at_bound"),
    ],
    ids=["free", "bounded-weighted", "fixed", "at-bound"],
)
def test_error_bars_from_the_numpy_jacobian_equal_autograd_ones(monkeypatch, params, sigma, status):
    # Small CPU float64 fits take J^T J from the numpy model's exact Jacobian (`run_report`):
    # every number of the report must agree with autograd's J^T J to rounding.
    from fitcli import stats
    from fitcli.data import dataset_from_arrays

    raw = {
        "name": "t",
        "device": "cpu",
        "dtype": "float64",
        "epochs": 200,
        "data": {"file": "data.csv"},  # replaced by the arrays
        "model": {"expr": "a*exp(-k*x) + c", "params": params},
        "optimizer": {"name": "LevenbergMarquardt"},
    }
    prep = prepare(config_from_dict(raw), dataset_from_arrays(XS, YS, SIGMA if sigma else None))
    result = train(prep.model, prep.stepper, epochs=200, evaluate_loss=prep.evaluate_loss)
    used = []
    real = stats._host_jtj_jtr
    monkeypatch.setattr(stats, "_host_jtj_jtr", lambda *a: used.append(1) or real(*a))
    fast = finish_stats(prep, result)
    assert used, "the numpy path was not taken"
    monkeypatch.setattr(stats, "host_eligible", lambda *a: False)
    slow = finish_stats(prep, result)
    assert fast["uncertainty"]["status"] == slow["uncertainty"]["status"] == status

    def close(a, b, path="summary"):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), path
            for k in a:
                close(a[k], b[k], f"{path}.{k}")
        elif isinstance(a, list):
            assert len(a) == len(b), path
            for i, (u, v) in enumerate(zip(a, b, strict=True)):
                close(u, v, f"{path}[{i}]")
        elif isinstance(a, float) and b is not None:
            assert a == pytest.approx(b, rel=1e-12, abs=1e-300), path
        else:
            assert a == b, path

    # A covariance entry to rounding of its scale sqrt(C_ii C_jj) (an off-diagonal entry can be
    # orders of magnitude smaller, by cancellation), the correlations to 1e-12 absolute.
    for key, scaled in (("covariance", True), ("correlation", False)):
        a, b = np.array(fast.pop(key), dtype=float), np.array(slow.pop(key), dtype=float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=key)  # None: None
        scale = np.sqrt(np.outer(np.diag(b), np.diag(b))) if scaled else 1.0
        diff = np.where(np.isnan(b), 0.0, np.abs(a - b))
        assert (diff <= 1e-12 * np.where(np.isnan(scale), 1.0, scale)).all(), key
    close(fast, slow)


def test_basis_optimum_and_truth_come_from_one_qr_pass(monkeypatch):
    """y and y_true share one QR reduction of the design, with y's result what it has alone."""
    from fitcli import stats as stats_mod

    prep, result, _ = run(small(epochs=5))
    calls = []
    real = stats_mod.reduce_least_squares

    def counting(rows, ys, *a, **k):
        calls.append(len(ys))
        return real(rows, ys, *a, **k)

    monkeypatch.setattr(stats_mod, "reduce_least_squares", counting)
    got = finish_stats(prep, result)
    assert calls == [2]
    monkeypatch.setattr(stats_mod, "reduce_least_squares", real)
    ds = prep.dataset
    x = torch.as_tensor(ds.x)

    def rows(sl):
        return torch.stack([b(x[sl]) for b in prep.model.basis], dim=-1)

    _, rss, _ = linear_optimum_chunked(rows, torch.as_tensor(ds.y), ds.n, 3)
    t_opt, _, _ = linear_optimum_chunked(rows, torch.as_tensor(ds.y_true), ds.n, 3)
    assert got["optimum_loss"] == rss / ds.n  # exactly: the same reduction of y
    assert list(got["truth"].values()) == pytest.approx(t_opt.tolist(), rel=0, abs=1e-12)
