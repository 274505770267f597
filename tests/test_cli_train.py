"""fitcli train / check / schema through CliRunner and real subprocesses."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import typer
import yaml
from conftest import CONFIGS, fitcli_process, only_run_dir

from fitcli.cli import app


def run_train(runner, cfg, tmp_path, *args):
    out = tmp_path / "runs"
    result = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--progress", "none", *args])
    return result, out


def test_train_writes_a_complete_run_directory(runner, write_config, tmp_path):
    result, out = run_train(runner, write_config(), tmp_path)
    assert result.exit_code == 0, result.output
    run = only_run_dir(out)
    assert re.fullmatch(r"small-\d{8}-\d{6}-[0-9a-f]{4}", run.name)
    snaps = sorted(p.name for p in (run / "snapshots").glob("*.html"))
    assert snaps == [
        "epoch-00.html",
        "epoch-10.html",
        "epoch-20.html",
        "epoch-30.html",
        "epoch-40.html",
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["exit_code"] == 0
    assert summary["epochs_run"] == 40 and summary["seed"] == 0
    assert summary["device"] == "cpu" and summary["dtype"] == "float64"
    assert set(summary["params"]) == {"theta0", "theta1", "theta2"}
    for key in ("fitcli_version", "run_dir", "name", "final_loss", "elapsed_s"):
        assert key in summary
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(41))
    assert float(rows[-1]["loss"]) == pytest.approx(summary["final_loss"], rel=0, abs=0)
    assert float(rows[-1]["theta1"]) == summary["params"]["theta1"]
    data = list(csv.reader((run / "data.csv").open()))
    assert data[0] == ["x", "y", "y_true"] and len(data) == 201
    params = json.loads((run / "snapshots" / "params.json").read_text())
    assert [s["epoch"] for s in params["snapshots"]] == [0, 10, 20, 30, 40]
    # Snapshots load the run directory's single copy of plotly.js.
    page = (run / "snapshots" / "epoch-40.html").read_text()
    assert 'src="../plotly.min.js"' in page and (run / "plotly.min.js").stat().st_size > 1e6
    assert "small: epoch 40" in page
    # The resolved config reruns as is.
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["device"] == "cpu" and resolved["optimizer"] == {"name": "SGD", "lr": 0.01}
    assert "# command: fitcli" in (run / "config.yaml").read_text()
    # The summary table names the run directory.
    assert str(run) in result.stdout


def test_metrics_rows_are_the_state_after_k_epochs(runner, write_config, tmp_path):
    """Row k's loss is the loss at row k's parameters, recomputed independently."""
    import numpy as np

    result, out = run_train(runner, write_config({"epochs": 5, "snapshots": 5}), tmp_path)
    assert result.exit_code == 0
    run = only_run_dir(out)
    data = np.loadtxt(run / "data.csv", delimiter=",", skiprows=1)
    x, y = data[:, 0], data[:, 1]
    for row in csv.DictReader((run / "metrics.csv").open()):
        t = [float(row[f"theta{k}"]) for k in range(3)]
        yhat = t[0] * x + t[1] * np.sin(x) + t[2] * np.cos(x / 4)
        assert float(row["loss"]) == pytest.approx(np.mean((yhat - y) ** 2), rel=1e-12)


def test_overrides_and_same_seed_same_numbers(runner, write_config, tmp_path):
    cfg = write_config()
    r1, out1 = run_train(runner, cfg, tmp_path / "a", "optimizer.lr=2e-2", "epochs=30")
    r2, out2 = run_train(runner, cfg, tmp_path / "b", "optimizer.lr=2e-2", "epochs=30")
    assert r1.exit_code == r2.exit_code == 0
    s1 = json.loads((only_run_dir(out1) / "summary.json").read_text())
    s2 = json.loads((only_run_dir(out2) / "summary.json").read_text())
    assert s1["params"] == s2["params"] and s1["epochs_run"] == 30
    r3, out3 = run_train(runner, cfg, tmp_path / "c", "seed=1", "epochs=30")
    s3 = json.loads((only_run_dir(out3) / "summary.json").read_text())
    assert s3["params"] != s1["params"]


def test_seed_fits_the_noisy_observations(runner, tmp_path):
    result, out = run_train(runner, CONFIGS / "seed.yaml", tmp_path, "epochs=3000")
    assert result.exit_code == 0
    import numpy as np

    run = only_run_dir(out)
    data = np.loadtxt(run / "data.csv", delimiter=",", skiprows=1)
    x, y = data[:, 0], data[:, 1]
    design = np.column_stack([x, np.sin(x), np.cos(x / 4)])
    best, *_ = np.linalg.lstsq(design, y, rcond=None)
    params = json.loads((run / "summary.json").read_text())["params"]
    fitted = np.array([params["theta0"], params["theta1"], params["theta2"]])
    # SGD converges to the least-squares fit of the noisy data, not the noiseless target.
    assert np.allclose(fitted, best, atol=2e-3)
    assert not np.allclose(best, [0, 1.5, 1.2], atol=1e-3)


def test_json_is_the_only_stdout(write_config, tmp_path):
    proc = fitcli_process("train", str(write_config()), "--out", str(tmp_path / "r"), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "completed"
    assert summary["run_dir"] == str(only_run_dir(tmp_path / "r"))
    # Not a terminal: plain progress lines go to stderr.
    assert "small: training 40 epochs" in proc.stderr


def test_bad_config_exit_2_and_nothing_written(runner, write_config, tmp_path):
    cfg = write_config({"epochz": 3, "optimizer": {"name": "Adamm", "lr": 0.1}})
    result, out = run_train(runner, cfg, tmp_path)
    assert result.exit_code == 2
    assert "unknown key 'epochz'; did you mean 'epochs'?" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("changes", "overrides", "message"),
    [
        (
            {"optimizer": {"name": "Adamm", "lr": 0.1}},
            [],
            "unknown optimizer 'Adamm'; did you mean 'Adam'?",
        ),
        (
            {"optimizer": {"name": "SGD", "lrr": 0.1}},
            [],
            "SGD takes no argument 'lrr'; did you mean 'lr'?",
        ),
        ({"scheduler": {"name": "StepLR"}}, [], "StepLR needs 'step_size'"),
        ({"scheduler": {"name": "StepLRR", "step_size": 3}}, [], "unknown scheduler 'StepLRR'"),
        ({}, ["device=cuda:0"], None),
        (
            {"data": {"target": "log(x)", "x": {"start": -1, "stop": 1, "num": 11}}},
            [],
            "data.target: 'log(x)' is not finite at x = -1",
        ),
        (
            {"model": {"expr": "a*log(x - b)", "params": {"b": 5}}},
            [],
            "model.expr: the model is not finite at x = -10",
        ),
        ({}, ["epochz=3"], "unknown key 'epochz'; did you mean 'epochs'?"),
        ({}, ["loss=mae"], "loss"),
    ],
)
def test_invalid_input_exit_2(runner, write_config, tmp_path, changes, overrides, message):
    import torch

    if overrides == ["device=cuda:0"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result, out = run_train(runner, write_config(changes), tmp_path, *overrides)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    if message:
        assert message in result.output
    if overrides == ["device=cuda:0"]:
        assert "CUDA is not available" in result.output
    assert not out.exists()


def test_unknown_optimizer_lists_valid_names(runner, write_config, tmp_path):
    result, _ = run_train(runner, write_config({"optimizer": {"name": "Nope"}}), tmp_path)
    assert result.exit_code == 2
    for name in ("Adam", "SGD", "LBFGS", "RMSprop"):
        assert name in result.output


def test_divergence_exit_3_keeps_last_finite_params(runner, write_config, tmp_path):
    result, out = run_train(
        runner, write_config({"optimizer": {"name": "SGD", "lr": 50.0}, "epochs": 400}), tmp_path
    )
    assert result.exit_code == 3, result.output
    run = only_run_dir(out)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["exit_code"] == 3
    import math

    assert all(math.isfinite(v) for v in summary["params"].values())
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert math.isfinite(float(rows[-1]["loss"]))
    assert float(rows[-1]["theta0"]) == summary["params"]["theta0"]
    assert summary["epochs_run"] == int(rows[-1]["epoch"]) < 400
    # A last snapshot of the last finite state exists.
    last = f"epoch-{summary['epochs_run']:03d}.html"
    assert (run / "snapshots" / last).exists()


def test_run_dir_exact_refuses_existing(runner, write_config, tmp_path):
    cfg = write_config()
    target = tmp_path / "exact"
    args = ["train", str(cfg), "--run-dir", str(target), "--progress", "none"]
    assert runner.invoke(app, args).exit_code == 0
    first = (target / "summary.json").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    assert (target / "summary.json").read_text() == first
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    # --overwrite never deletes a folder that is not a fitcli run directory.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    result = runner.invoke(
        app, ["train", str(cfg), "--run-dir", str(mine), "--overwrite", "--progress", "none"]
    )
    assert result.exit_code == 2 and "not a fitcli run directory" in result.output
    assert (mine / "thesis.tex").read_text() == "precious"


def test_out_is_a_file_exit_1(runner, write_config, tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    result = runner.invoke(
        app, ["train", str(write_config()), "--out", str(blocker), "--progress", "none"]
    )
    assert result.exit_code == 1
    assert str(blocker) in result.output and "Traceback" not in result.output


def test_plotlyjs_embed_and_cdn(runner, write_config, tmp_path):
    for mode, needle in (("embed", "Plotly"), ("cdn", "cdn.plot.ly")):
        out = tmp_path / mode
        result = runner.invoke(
            app,
            [
                "train",
                str(write_config({"epochs": 2, "snapshots": 1})),
                "--out",
                str(out),
                "--progress",
                "none",
                "--plotlyjs",
                mode,
            ],
        )
        assert result.exit_code == 0
        run = only_run_dir(out)
        assert not (run / "plotly.min.js").exists()
        assert needle in (run / "snapshots" / "epoch-2.html").read_text()


def test_check_prints_resolved_config_and_runs_nothing(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["check", str(CONFIGS / "seed.yaml"), "optimizer.lr=1e-3"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["optimizer"]["lr"] == 0.001 and resolved["device"] in ("cpu", "cuda")
    assert list(tmp_path.iterdir()) == []


def test_schema_is_json_schema(runner):
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert {"data", "model", "optimizer", "epochs"} <= set(schema["properties"])


@pytest.mark.parametrize("command", ["train", "check", "schema"])
def test_every_command_has_help(runner, command):
    result = runner.invoke(app, [command, "--help"])
    first = typer.main.get_command(app).commands[command].help.splitlines()[0]
    assert result.exit_code == 0 and " ".join(first.split()) in " ".join(result.output.split())


def test_version(runner):
    from fitcli import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"fitcli {__version__}"


def test_help_does_not_import_torch():
    code = (
        "import sys; from fitcli.cli import app; "
        "from typer.testing import CliRunner; CliRunner().invoke(app, ['--help']); "
        "print('torch' in sys.modules, 'plotly.io' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "False"]


def _wait_for_metrics(run_root, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(run_root.glob("*/snapshots/epoch-*.html"))
        if found:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.05)
    raise AssertionError("run never started")


@pytest.mark.slow
def test_sigint_writes_summary_and_exits_130(write_config, tmp_path):
    cfg = write_config({"epochs": 10**7, "snapshots": 10})
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fitcli.cli",
            "train",
            str(cfg),
            "--out",
            str(out),
            "--progress",
            "plain",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_metrics(out, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    summary = json.loads(stdout)
    run = only_run_dir(out)
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 130
    assert 0 < summary["epochs_run"] < 10**7
    epochs = summary["epochs_run"]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert int(rows[-1]["epoch"]) == epochs
    assert (run / "snapshots" / f"epoch-{epochs:08d}.html").exists()


def test_shipped_configs_run_briefly(runner, tmp_path):
    for cfg in sorted(CONFIGS.glob("*.yaml")):
        result = runner.invoke(
            app,
            ["train", str(cfg), "epochs=3", "--out", str(tmp_path), "--progress", "none", "--json"],
        )
        assert result.exit_code == 0, (cfg, result.output)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "needle"), [("rich", "40/40"), ("plain", "epoch 40/40")])
def test_progress_modes_write_to_stderr_only(write_config, tmp_path, mode, needle):
    proc = fitcli_process(
        "train", str(write_config()), "--out", str(tmp_path / "r"), "--progress", mode, "--json"
    )
    assert proc.returncode == 0, proc.stderr
    assert needle in proc.stderr
    assert json.loads(proc.stdout)["status"] == "completed"  # stdout holds the JSON alone
