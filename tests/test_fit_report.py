"""Error bars, statistics, the closed-form optimum and the truth after any optimizer (issue 4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SMALL, only_run_dir

from fitcli.cli import app
from fitcli.config import config_from_dict
from fitcli.experiment import finish_stats
from fitcli.prepare import prepare
from fitcli.stats import expression_truth, linear_optimum, linear_optimum_chunked
from fitcli.train import train


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
