"""`converged` in summary.json: one boolean that the reason, the error bars' status, the summary
table and the exit code of `--strict` agree on; a singular stopping point is left, not reported."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL, only_run_dir
from scipy.optimize import curve_fit, least_squares
from typer.testing import CliRunner

from fitcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "configs" / "seed.yaml"
MISRA = ROOT / "configs" / "nist-misra1a.yaml"
TWO_LOGS = ROOT / "tests" / "data" / "logsum" / "two-logs.yaml"
QUICK = ["epochs=50", "snapshots=2", "--progress", "none"]

runner = CliRunner()


def train(tmp_path: Path, config: Path, *args: str):
    out = tmp_path / "runs"
    result = runner.invoke(app, ["train", str(config), *args, "--out", str(out)])
    summary = json.loads((only_run_dir(out) / "summary.json").read_text())
    return result, summary


def stopped_line(output: str) -> str:
    (line,) = [ln for ln in output.splitlines() if ln.startswith("stopped")]
    return line


def test_an_unconverged_sgd_run_says_so_everywhere(tmp_path):
    result, summary = train(tmp_path, SEED, *QUICK)
    assert result.exit_code == 0, result.output
    assert summary["status"] == "completed"
    assert summary["uncertainty"]["status"] == "not_converged"
    assert summary["converged"] is False
    assert "converged" not in summary["reason"].lower()
    assert "did not converge" in summary["reason"]
    line = stopped_line(result.output)
    assert "did not converge" in line and "converged" not in line.lower()


def test_a_converged_lm_run_says_so_everywhere(tmp_path):
    result, summary = train(tmp_path, MISRA, "--progress", "none")
    assert result.exit_code == 0, result.output
    assert summary["uncertainty"]["status"] == "ok"
    assert summary["converged"] is True
    assert "converged" in summary["reason"] and "did not" not in summary["reason"]
    assert "converged" in stopped_line(result.output)


def test_a_singular_stop_is_not_a_converged_minimum(tmp_path, write_config):
    # theta0 and theta1 multiply the same column: no restart can tell them apart, so LM ends
    # at the least-squares optimum (numpy's lstsq) with a singular J^T J, and says so.
    cfg = json.loads(json.dumps(SMALL))
    cfg.update(
        epochs=200, snapshots=2, optimizer={"name": "LM"}, model={"basis": ["x", "x", "sin(x)"]}
    )
    result, summary = train(tmp_path, write_config(base=cfg), "--progress", "none")
    assert result.exit_code == 0, result.output
    assert summary["uncertainty"]["status"] == "singular"
    assert summary["converged"] is False
    reason = summary["reason"]
    assert "converged" not in reason.lower()
    assert "theta0, theta1" in reason and "cannot be told apart" in reason
    assert "likely a saddle, not a minimum" in reason and "try other starts" in reason
    data = np.loadtxt(only_run_dir(tmp_path / "runs") / "data.csv", delimiter=",", skiprows=1)
    x, y = data[:, 0], data[:, 1]
    design = np.stack([x, x, np.sin(x)], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss_opt = float(((y - design @ coef) ** 2).sum())
    assert summary["rss"] == pytest.approx(rss_opt, rel=1e-12)


def two_logs(x, a, b, c, d, e0):
    return a * np.log(x + 1 + b) + c * np.log(x + 1 + d) + e0


def test_two_terms_of_the_same_form_reach_minpacks_minimum(tmp_path):
    # From all ones LM meets the point where both terms coincide (a = c, b = d: J^T J singular)
    # and must leave it for the minimum that MINPACK's finite differences find from there.
    data = np.loadtxt(TWO_LOGS.parent / "two-logs.csv", delimiter=",", skiprows=1)
    x, y = data[:, 0], data[:, 1]
    with np.errstate(all="ignore"):
        p_ref, _ = curve_fit(two_logs, x, y, p0=np.ones(5), maxfev=100000)
    rss_ref = float(((y - two_logs(x, *p_ref)) ** 2).sum())
    result, summary = train(tmp_path, TWO_LOGS, "--progress", "none")
    assert result.exit_code == 0, result.output
    rss = summary["rss"]
    assert rss <= rss_ref * (1 + 1e-9)
    assert rss == pytest.approx(7.4332291, rel=1e-6)
    # A minimum: MINPACK started from fitcli's answer finds nothing lower.
    p = [summary["params"][k] for k in ("a", "b", "c", "d", "e0")]
    with np.errstate(all="ignore"):
        polish = least_squares(
            lambda t: two_logs(x, *t) - y, p, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )
    assert rss <= 2 * polish.cost * (1 + 1e-10)
    assert summary["converged"] is True and summary["uncertainty"]["status"] == "ok"


def test_strict_train_exits_4_when_the_run_did_not_converge(tmp_path):
    strict = runner.invoke(app, ["train", str(SEED), *QUICK, "--strict", "-o", str(tmp_path / "a")])
    assert strict.exit_code == 4, strict.output
    summary = json.loads((only_run_dir(tmp_path / "a") / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["converged"] is False
    plain = runner.invoke(app, ["train", str(SEED), *QUICK, "-o", str(tmp_path / "b")])
    assert plain.exit_code == 0, plain.output
    converged = runner.invoke(
        app, ["train", str(MISRA), "--strict", "--progress", "none", "-o", str(tmp_path / "c")]
    )
    assert converged.exit_code == 0, converged.output


def test_strict_sweep_exits_4_when_a_run_did_not_converge(tmp_path):
    args = ["sweep", str(SEED), "epochs=50", "snapshots=2", "seed=0,1", "--progress", "none"]
    strict = runner.invoke(app, [*args, "--strict", "-o", str(tmp_path / "a")])
    assert strict.exit_code == 4, strict.output
    (sweep_dir,) = (tmp_path / "a").iterdir()
    with open(sweep_dir / "runs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == ["completed", "completed"]
    assert [r["converged"] for r in rows] == ["false", "false"]
    plain = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert plain.exit_code == 0, plain.output
    lbfgs = [*args, "optimizer={name: LBFGS}"]
    converged = runner.invoke(app, [*lbfgs, "--strict", "-o", str(tmp_path / "c")])
    assert converged.exit_code == 0, converged.output


def test_strict_lm_sweep_of_converged_runs_exits_0(tmp_path):
    args = ["sweep", str(MISRA), "snapshots=2", "seed=0,1", "--progress", "none", "--strict"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    (sweep_dir,) = tmp_path.iterdir()
    with open(sweep_dir / "runs.csv", newline="") as fh:
        assert [r["converged"] for r in csv.DictReader(fh)] == ["true", "true"]
