"""fitcli sweep end to end, through the command line, for every optimizer family and feature a
sweep claims, on every executor: each run directory must be the one `fitcli train` writes with
the same overrides, file for file (apart from what records time and the command line)."""

from __future__ import annotations

import csv
import itertools
import shutil
from pathlib import Path

import pytest
import yaml
from sweep_helpers import assert_same_run, files
from typer.testing import CliRunner

from fitcli import sweep as sw
from fitcli.cli import app

runner = CliRunner()

# Tiny runs: 60 points, 20 epochs, 2 snapshots.
BASIS = {
    "name": "basis",
    "seed": 0,
    "device": "cpu",
    "epochs": 20,
    "snapshots": 2,
    "data": {
        "target": "1.5*sin(x) + 0.5*x",
        "x": {"start": -5, "stop": 5, "num": 60},
        "noise": {"std": 0.3},
    },
    "model": {"basis": ["x", "sin(x)"]},
    "optimizer": {"name": "SGD", "lr": 0.01},
}
# Bounds on a and b, c fixed.
BOUNDED = '{expr: "a*exp(-b*x) + c", params: {a: {value: 1, min: 0, max: 10}, b: {value: 0.5, min: 0}, c: {value: 0.3, vary: false}}}'  # noqa: E501
# LM cannot start here (sqrt's derivative is infinite at b = 0): the run fails, Adam diverges.
SINGULAR = '{expr: "sqrt(b)*x + c", params: {b: 0.0, c: 1.0}}'
EXPR = {
    **BASIS,
    "name": "expr",
    "data": {
        "target": "2*exp(-0.7*x) + 0.3",
        "x": {"start": 0, "stop": 5, "num": 60},
        "noise": {"std": 0.02},
    },
    "model": yaml.safe_load(BOUNDED),
}

# name: (base config, sweep axes). One sweep per case and executor.
CASES = {
    # SGD and Adam train as one batch (one optimizer each), LBFGS and LM one by one; LM
    # converges early and fills the snapshots it did not reach.
    "families": (
        BASIS,
        [
            "optimizer={name: SGD, lr: 0.01},{name: Adam, lr: 0.05},{name: LBFGS},{name: LM}",
            "seed=0,1",
        ],
    ),
    # A scheduler, mini-batches, both, neither.
    "features": (
        BASIS,
        [
            "scheduler=null,{name: StepLR, step_size: 5, gamma: 0.5}",
            "batch_size=null,16",
            "optimizer.name=Adam",
            "optimizer.lr=0.05",
        ],
    ),
    # An expression model with bounds and a fixed parameter; LM failing and Adam diverging.
    "expression": (
        EXPR,
        [f"model={BOUNDED},{SINGULAR}", "optimizer={name: Adam, lr: 0.05},{name: LM}"],
    ),
}
EXPRESSION_STATUSES = ["completed", "completed", "diverged", "failed"]


def grid(axes: list[str]) -> list[list[str]]:
    """Each run's overrides, in the sweep's order (the last axis fastest)."""
    split = [(k, sw.split_values(v)) for k, _, v in (a.partition("=") for a in axes)]
    return [
        [f"{k}={v}" for (k, _), v in zip(split, combo, strict=True)]
        for combo in itertools.product(*(vals for _, vals in split))
    ]


def table(d: Path) -> list[dict]:
    with open(d / sw.RUNS_FILE, newline="") as fh:
        return list(csv.DictReader(fh))


def only_dir(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    out = {}
    for name, (base, _) in CASES.items():
        out[name] = root / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(base, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def trained(configs, tmp_path_factory) -> dict[str, list[Path]]:
    """What `fitcli train` writes for each run of each case."""
    root = tmp_path_factory.mktemp("train")
    out: dict[str, list[Path]] = {}
    for name, (_, axes) in CASES.items():
        out[name] = []
        for k, overrides in enumerate(grid(axes)):
            target = root / name / str(k)
            res = runner.invoke(
                app,
                ["train", str(configs[name]), *overrides, "--run-dir", str(target),
                 "--progress", "none"],
            )  # fmt: skip
            assert (target / "summary.json").is_file(), res.output
            out[name].append(target)
    return out


@pytest.fixture(scope="module")
def cluster():
    """One local Dask cluster for the module: two single-threaded worker processes."""
    pytest.importorskip("distributed")
    from dask.distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, preload=["fitcli.sweep"]
    ) as c:
        yield c.scheduler_address


def sweep(config: Path, axes: list[str], out: Path, *options: str):
    return runner.invoke(
        app, ["sweep", str(config), *axes, "-o", str(out), "--progress", "none", *options]
    )


def assert_sweep_is_train(d: Path, axes: list[str], refs: list[Path]) -> None:
    rows = table(d)
    keys = [k for k, _, v in (a.partition("=") for a in axes) if len(sw.split_values(v)) > 1]
    assert [[f"{k}={r[k]}" for k in keys] for r in rows] == [
        [o for o in run if o.partition("=")[0] in keys] for run in grid(axes)
    ]
    for row, ref in zip(rows, refs, strict=True):
        assert row["run_dir"], row
        run_dir = d / row["run_dir"]
        assert_same_run(ref, run_dir)
        assert files(run_dir)  # not two empty folders
        summary = yaml.safe_load((ref / "summary.json").read_text())
        assert row["status"] == summary["status"]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("executor", ["here", "workers", "dask"])
def test_sweep_run_directories_are_what_train_writes(
    executor, case, configs, trained, tmp_path, request
):
    options = {"here": [], "workers": ["--workers", "2"]}.get(executor)
    if executor == "dask":
        options = ["--scheduler", request.getfixturevalue("cluster")]
    _, axes = CASES[case]
    res = sweep(configs[case], axes, tmp_path, *options)
    statuses = {yaml.safe_load((r / "summary.json").read_text())["status"] for r in trained[case]}
    assert res.exit_code == (0 if statuses == {"completed"} else 1), res.output
    assert_sweep_is_train(only_dir(tmp_path), axes, trained[case])


def test_the_cases_cover_what_they_claim(configs, trained):
    # The matrix above proves equality; this says the runs compared are the ones claimed.
    plan = sw.make_plan(configs["families"], CASES["families"][1])
    cfgs = {r.index: plan.cfg(r) for r in plan.runs}
    tasks = [(t.batch, t.indices) for t in sw.make_tasks(plan, cfgs, list(cfgs), 1)]
    assert tasks == [(True, [0, 1, 2, 3]), (False, [4]), (False, [5]), (False, [6]), (False, [7])]

    def summary(k: int) -> dict:
        return yaml.safe_load((trained["expression"][k] / "summary.json").read_text())

    assert [summary(k)["status"] for k in range(4)] == EXPRESSION_STATUSES
    assert "lm_iterations" in summary(1) and summary(1)["converged"] is True
    assert summary(1)["params"]["c"] == 0.3  # fixed
    assert summary(3)["converged"] is False
    families = [yaml.safe_load((r / "summary.json").read_text()) for r in trained["families"]]
    lm = [s for s in families if "lm_iterations" in s]
    assert lm and all(s["epochs_run"] < s["epochs"] for s in lm)  # converged early: filled


def test_resume_of_an_lm_sweep_finishes_what_is_missing(configs, trained, tmp_path):
    axes = CASES["expression"][1]
    res = sweep(configs["expression"], axes, tmp_path)
    assert res.exit_code == 1, res.output  # the failing and the diverging run
    d = only_dir(tmp_path)
    rows = table(d)
    assert [r["status"] for r in rows] == EXPRESSION_STATUSES
    kept = {r["run_dir"]: (d / r["run_dir"] / "summary.json").stat().st_mtime_ns for r in rows}
    gone = d / rows[1]["run_dir"]  # the LM run on the bounded model
    shutil.rmtree(gone)
    res = runner.invoke(app, ["sweep", "--resume", str(d), "--progress", "none"])
    # The diverged run is finished and kept; the failed one runs (and fails) again.
    assert res.exit_code == 1, res.output
    assert [r["status"] for r in table(d)] == EXPRESSION_STATUSES
    assert_same_run(trained["expression"][1], gone)
    mtimes = {rel: (d / rel / "summary.json").stat().st_mtime_ns for rel in kept}
    assert [mtimes[r["run_dir"]] == kept[r["run_dir"]] for r in rows] == [True, False, True, False]
    assert_sweep_is_train(d, axes, trained["expression"])
