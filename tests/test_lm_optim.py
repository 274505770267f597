"""Levenberg-Marquardt as a fitcli optimizer: config checks, the stepper, runs through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import SMALL, only_run_dir
from scipy.optimize import curve_fit

from fitcli.cli import app
from fitcli.config import config_from_dict
from fitcli.errors import ConfigError
from fitcli.experiment import finish_stats
from fitcli.prepare import prepare
from fitcli.train import train

RNG = np.random.default_rng(3)
XS = np.linspace(0.0, 4.0, 60)
SIGMA = 0.04 + 0.02 * XS
YS = 2.5 * np.exp(-0.9 * XS) + 0.3 + RNG.normal(0, SIGMA)


def decay_np(x, a, k, c):
    return a * np.exp(-k * x) + c


def decay_config(tmp_path, **changes) -> dict:
    path = tmp_path / "decay.csv"
    path.write_text(
        "x,y,err\n"
        + "".join(
            f"{float(x)!r},{float(y)!r},{float(s)!r}\n"
            for x, y, s in zip(XS, YS, SIGMA, strict=True)
        )
    )
    cfg = {
        "name": "decay",
        "device": "cpu",
        "epochs": 200,
        "snapshots": 4,
        "data": {"file": str(path)},
        "model": {"expr": "a*exp(-k*x) + c", "params": {"a": 1.0, "k": 0.5, "c": 0.0}},
        "optimizer": {"name": "LevenbergMarquardt"},
    }
    for key, value in changes.items():
        node = cfg
        *head, last = key.split(".")
        for part in head:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg


def fit(raw: dict):
    cfg = config_from_dict(raw)
    prep = prepare(cfg)
    result = train(prep.model, prep.stepper, epochs=cfg.epochs, evaluate_loss=prep.evaluate_loss)
    return prep, result


# -- config ----------------------------------------------------------------------------------


def test_every_problem_with_an_lm_section_is_reported_at_once(tmp_path):
    raw = decay_config(
        tmp_path,
        loss="l1",
        batch_size=10,
        scheduler={"name": "StepLR", "step_size": 10},
        optimizer={"name": "LM", "lr": 0.1, "ftoll": 1e-8, "damping": 0},
    )
    with pytest.raises(ConfigError) as err:
        prepare(config_from_dict(raw))
    text = str(err.value)
    assert "optimizer.lr: LevenbergMarquardt takes no argument 'lr'" in text
    assert "needs no learning rate" in text
    assert (
        "optimizer.ftoll: LevenbergMarquardt takes no argument 'ftoll'; did you mean 'ftol'?"
        in (text)
    )
    assert "it takes: ftol, xtol, gtol, damping, chunk_size" in text
    assert "optimizer.damping: must be a finite number > 0 (got 0)" in text
    assert "loss: LevenbergMarquardt minimises the sum of squared residuals" in text
    assert "(got 'l1')" in text
    assert "batch_size: LevenbergMarquardt works on the full batch" in text
    assert "scheduler: LevenbergMarquardt has no learning rate" in text


@pytest.mark.parametrize("name", ["LevenbergMarquardt", "LM", "lm", "levenbergmarquardt"])
def test_names_are_case_insensitive(tmp_path, name):
    prep, result = fit(decay_config(tmp_path, optimizer={"name": name}))
    assert type(prep.stepper).__name__ == "LMStepper"
    assert result.status == "completed"


# -- the stepper -----------------------------------------------------------------------------


def test_matches_curve_fit_with_sigma_and_reports_the_mse_before_each_step(tmp_path):
    raw = decay_config(tmp_path, **{"data.columns": {"x": "x", "y": "y", "sigma": "err"}})
    cfg = config_from_dict(raw)
    prep = prepare(cfg)
    model, x = prep.model, prep.x
    w = torch.tensor(1 / SIGMA)
    losses = []
    for _ in range(3):
        with torch.no_grad():
            expected = float(((w * (model(x) - torch.tensor(YS))) ** 2).mean())
        losses.append((prep.stepper.step().item(), expected))
    for got, expected in losses:
        assert got == pytest.approx(expected, rel=1e-12)
    result = train(model, prep.stepper, epochs=cfg.epochs, evaluate_loss=prep.evaluate_loss)
    assert result.status == "completed" and result.reason.startswith("LevenbergMarquardt stopped")
    popt, pcov = curve_fit(
        decay_np, XS, YS, p0=[1, 0.5, 0], sigma=SIGMA, absolute_sigma=True, xtol=1e-15, ftol=1e-15
    )
    values = model.values()
    np.testing.assert_allclose([values[n] for n in "akc"], popt, rtol=1e-7)
    stats = finish_stats(prep, result)
    assert stats["uncertainty"]["status"] == "ok"
    np.testing.assert_allclose(
        [stats["stderr"][n] for n in "akc"], np.sqrt(np.diag(pcov)), rtol=1e-5
    )


def test_bounds_and_fixed_parameters(tmp_path):
    raw = decay_config(
        tmp_path,
        **{
            "model.params": {
                "a": {"value": 1.0, "min": 0.0, "max": 10.0},
                "k": {"value": 0.5, "min": 0.0},
                "c": {"value": 0.3, "vary": False},
            }
        },
    )
    prep, result = fit(raw)
    assert result.status == "completed"
    popt, pcov = curve_fit(
        lambda x, a, k: decay_np(x, a, k, 0.3), XS, YS, p0=[1, 0.5], xtol=1e-15, ftol=1e-15
    )
    values = prep.model.values()
    assert values["c"] == 0.3
    np.testing.assert_allclose([values["a"], values["k"]], popt, rtol=1e-7)
    stats = finish_stats(prep, result)
    # Error bars are taken in the parameters' own units: the bounds' transforms do not enter.
    np.testing.assert_allclose(
        [stats["stderr"]["a"], stats["stderr"]["k"]], np.sqrt(np.diag(pcov)), rtol=1e-5
    )
    assert stats["stderr"]["c"] is None


def test_float32_fits(tmp_path):
    prep, result = fit(decay_config(tmp_path, dtype="float32"))
    assert prep.model.raw.dtype == torch.float32
    popt, _ = curve_fit(decay_np, XS, YS, p0=[1, 0.5, 0])
    values = prep.model.values()
    np.testing.assert_allclose([values[n] for n in "akc"], popt, rtol=1e-3)


def test_state_dict_is_json_and_continues_identically(tmp_path):
    raw = decay_config(tmp_path)
    a, _ = fit({**raw, "epochs": 3})
    state = json.loads(json.dumps(a.stepper.state_dict(), allow_nan=False))
    b = prepare(config_from_dict(raw))
    with torch.no_grad():
        b.model.raw.copy_(a.model.raw)
    b.stepper.load_state_dict(state)
    for _ in range(30):
        la, lb = a.stepper.step().item(), b.stepper.step().item()
        assert la == lb
        assert torch.equal(a.model.raw, b.model.raw)
        if a.stepper.converged:
            break
    assert a.stepper.converged == b.stepper.converged


def test_parameters_set_from_outside_are_picked_up(tmp_path):
    prep = prepare(config_from_dict(decay_config(tmp_path)))
    prep.stepper.step()
    with torch.no_grad():
        prep.model.raw.copy_(torch.tensor([2.0, 1.0, 0.2], dtype=torch.float64))
    expected = prep.evaluate_loss()
    assert prep.stepper.step().item() == pytest.approx(expected, rel=1e-12)


# -- runs through the CLI --------------------------------------------------------------------


def lm_small(write_config, **extra):
    cfg = json.loads(json.dumps(SMALL))
    cfg.update(epochs=400, snapshots=4, optimizer={"name": "LM"}, **extra)
    return write_config(base=cfg)


def test_early_convergence_fills_the_remaining_snapshots(runner, write_config, tmp_path):
    result = runner.invoke(
        app, ["train", str(lm_small(write_config)), "--out", str(tmp_path), "--progress", "none"]
    )
    assert result.exit_code == 0, result.output
    run = only_run_dir(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    done = summary["epochs_run"]
    assert done < 20 and summary["converged"] is True
    assert summary["reason"].startswith("LevenbergMarquardt stopped after")
    assert summary["reason"].endswith("; converged: at the least-squares minimum")
    assert summary["stop_reason"]
    # 0 and the converged epoch, then the scheduled 200, 300, 400: snapshots + 1 of them.
    params = json.loads((run / "snapshots" / "params.json").read_text())
    epochs = [s["epoch"] for s in params["snapshots"]]
    assert epochs == [0, done, 200, 300, 400]
    assert len(list((run / "snapshots").glob("*.html"))) == 5
    page = (run / "snapshots" / "epoch-400.html").read_text()
    # The verdict says it converged, so the filled-in page says so, as the final fit.
    assert f"converged at epoch {done} (the final fit)" in page
    assert "epoch 400/" not in page
    final = params["snapshots"][1]
    assert all(s["params"] == final["params"] for s in params["snapshots"][2:])
    assert "±" in result.output and "stopped" in result.output


def test_json_has_error_bars_and_statistics(runner, write_config, tmp_path):
    result = runner.invoke(
        app,
        ["train", str(lm_small(write_config)), "--out", str(tmp_path), "--progress", "none"]
        + ["--json"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("stderr", "covariance", "correlation", "uncertainty", "rss", "r2"):
        assert key in summary
    for key in ("chi2_reduced", "aic", "bic", "n_points", "n_params", "optimum_loss", "gap"):
        assert key in summary
    assert summary["uncertainty"]["status"] == "ok"
    assert summary["gap"] == pytest.approx(0, abs=1e-9)
    assert set(summary["truth"]) == {"theta0", "theta1", "theta2"}


def test_a_non_finite_jacobian_at_the_start_fails_cleanly(runner, write_config, tmp_path):
    # sqrt(b) is 0 at b = 0 (a finite model) but its derivative is infinite.
    cfg = lm_small(
        write_config,
        model={"expr": "sqrt(b)*x + c", "params": {"b": 0.0, "c": 1.0}},
    )
    result = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path), "--progress", "none"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "non-finite residuals or Jacobian at start" in summary["reason"]
    assert summary["converged"] is False


def test_singular_model_runs_and_names_the_degenerate_parameters(runner, write_config, tmp_path):
    cfg = lm_small(write_config, model={"basis": ["x", "x", "sin(x)"]})
    result = runner.invoke(
        app, ["train", str(cfg), "--out", str(tmp_path), "--progress", "none", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["uncertainty"]["status"] == "singular"
    assert "theta0, theta1" in summary["uncertainty"]["reason"]
    assert summary["stderr"]["theta0"] is None and summary["stderr"]["theta2"] is not None
    assert math.isfinite(summary["final_loss"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path):
    cpu, _ = fit(decay_config(tmp_path))
    gpu, _ = fit(decay_config(tmp_path, device="cuda"))
    assert gpu.model.raw.is_cuda
    a, b = cpu.model.values(), gpu.model.values()
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=1e-9)
