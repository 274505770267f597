"""The sweep's plan (fitcli.sweep.plan): a sweep with a bad optimizer or scheduler argument is
rejected before anything runs."""

from __future__ import annotations

from conftest import CONFIGS
from typer.testing import CliRunner

from fitcli.cli import app


def test_unknown_optimizer_argument_is_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "sweeps"
    result = CliRunner().invoke(
        app, ["sweep", str(CONFIGS / "seed.yaml"), "optimizer.lrr=0.01,0.1", "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "run 0 (optimizer.lrr=0.01): optimizer.lrr: SGD takes no argument 'lrr'" in result.output
    assert "did you mean 'lr'?" in result.output
    assert not out.exists()


def test_unknown_scheduler_is_exit_2(tmp_path):
    out = tmp_path / "sweeps"
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            str(CONFIGS / "seed.yaml"),
            "scheduler.name=StepLR,StepLRR",
            "scheduler.step_size=10",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "unknown scheduler 'StepLRR'" in result.output
    assert not out.exists()
