"""Fault suite 7: runs that blow up stop in the epoch they blow up, exit 3, and keep the last
finite parameters (summary.json's equal metrics.csv's last row, all finite).

The first case is checked against an independent plain-torch replay of the same gradient
descent: the run must stop exactly one row before the first non-finite loss of the replay.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SMALL

from fitcli.cli import app

BASE = {**SMALL, "snapshots": 4}

CASES = {
    "huge-lr-sgd": {"epochs": 200, "optimizer": {"name": "SGD", "lr": 5.0}},
    "astronomical-lr": {"epochs": 50, "optimizer": {"name": "SGD", "lr": 1e300}},
    "momentum-minibatch": {
        "epochs": 300,
        "batch_size": 16,
        "optimizer": {"name": "SGD", "lr": 0.5, "momentum": 0.9},
    },
    # exp(a*x) on x up to 100 while the learning rate grows 10% an epoch: a creeps up, then
    # one step throws it past exp's range (float64: 709/100, float32: 88/100) mid-run.
    "exp-overflows-mid-run": {
        "epochs": 300,
        "data": {"target": "exp(0.05*x)", "x": {"start": 0, "stop": 100, "num": 100}},
        "model": {"expr": "exp(a*x)", "params": {"a": 0.01}},
        "optimizer": {"name": "SGD", "lr": 1e-7},
        "scheduler": {"name": "ExponentialLR", "gamma": 1.1},
    },
    "float32-exp-overflows-mid-run": {
        "epochs": 300,
        "dtype": "float32",
        "data": {"target": "exp(0.05*x)", "x": {"start": 0, "stop": 100, "num": 100}},
        "model": {"expr": "exp(a*x)", "params": {"a": 0.01}},
        "optimizer": {"name": "SGD", "lr": 1e-7},
        "scheduler": {"name": "ExponentialLR", "gamma": 1.1},
    },
    "sqrt-of-negative": {
        "epochs": 300,
        "data": {"target": "-2*x", "x": {"start": 0, "stop": 3, "num": 50}},
        "model": {"expr": "sqrt(a)*x", "params": {"a": 1.0}},
        "optimizer": {"name": "SGD", "lr": 0.2},
    },
}


def run_case(runner, tmp: Path, case: str) -> tuple[dict, list[dict], Path]:
    cfg = {**BASE, **CASES[case]}
    path = tmp / f"{case}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = tmp / case
    result = runner.invoke(app, ["train", str(path), "--run-dir", str(run), "--progress", "none"])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    summary = json.loads((run / "summary.json").read_text())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return summary, rows, run


@pytest.mark.parametrize("case", sorted(CASES))
def test_divergence_exits_3_and_keeps_the_last_finite_parameters(runner, tmp_path, case):
    summary, rows, run = run_case(runner, tmp_path, case)
    assert summary["status"] == "diverged" and summary["exit_code"] == 3
    assert 0 <= summary["epochs_run"] < CASES[case]["epochs"]
    if "mid-run" in case:
        assert summary["epochs_run"] > 50
    assert summary["final_loss"] is not None and math.isfinite(summary["final_loss"])
    params = summary["params"]
    assert all(v is not None and math.isfinite(v) for v in params.values()), params
    # The last row is the state the run stopped in, and every row is finite.
    last = rows[-1]
    assert int(last["epoch"]) == summary["epochs_run"]
    assert {k: float(last[k]) for k in params} == params
    assert float(last["loss"]) == summary["final_loss"]
    for row in rows:
        assert all(math.isfinite(float(v)) for v in row.values()), row
    # The last snapshot shows it, and the run can be resumed (with a saner learning rate).
    snaps = json.loads((run / "snapshots" / "params.json").read_text())["snapshots"]
    assert snaps[-1]["epoch"] == summary["epochs_run"] and snaps[-1]["params"] == params


def test_divergence_is_caught_in_the_epoch_it_happens(runner, tmp_path):
    """Replay plain full-batch gradient descent in torch: the first row whose loss is not
    finite is row k; fitcli must stop with row k-1 as its last (not later, not earlier)."""
    summary, rows, _ = run_case(runner, tmp_path, "huge-lr-sgd")
    data = list(csv.DictReader((tmp_path / "huge-lr-sgd" / "data.csv").open()))
    x = torch.tensor([float(r["x"]) for r in data], dtype=torch.float64)
    y = torch.tensor([float(r["y"]) for r in data], dtype=torch.float64)
    phi = torch.stack([x, torch.sin(x), torch.cos(x / 4)], dim=-1)
    theta = torch.tensor([float(rows[0][f"theta{k}"]) for k in range(3)], dtype=torch.float64)
    theta.requires_grad_(True)
    first_bad = None
    for k in range(CASES["huge-lr-sgd"]["epochs"] + 1):
        loss = torch.mean((phi @ theta - y) ** 2)
        if not math.isfinite(loss.item()):
            first_bad = k
            break
        if k < len(rows) - 1:
            assert loss.item() == pytest.approx(float(rows[k]["loss"]), rel=1e-9)
        loss.backward()
        with torch.no_grad():
            theta -= 5.0 * theta.grad
            theta.grad = None
    assert first_bad is not None, "the replay never diverged"
    assert summary["epochs_run"] == first_bad - 1
