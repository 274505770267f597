"""fitcli sweep: axes, batched runs bit-identical to single runs, run directories, failures,
interruption and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import ROOT, SEED, SMALL, assert_same_run
from typer.testing import CliRunner

from fitcli import sweep as sw
from fitcli.cli import app
from fitcli.sweep import replay

runner = CliRunner()


def sweep_dir_of(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def table(d: Path) -> list[dict]:
    with open(d / sw.RUNS_FILE, newline="") as fh:
        return list(csv.DictReader(fh))


# -- axes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("1,2,3", ["1", "2", "3"]),
        ("[x, sin(x)]", ["[x, sin(x)]"]),
        ("[x],[x, x**2]", ["[x]", "[x, x**2]"]),
        ('"atan2(a, b)",x', ['"atan2(a, b)"', "x"]),
        ("atan2(x, 1)", ["atan2(x, 1)"]),
        ("{name: SGD, lr: 0.1},{name: Adam}", ["{name: SGD, lr: 0.1}", "{name: Adam}"]),
        ("'a,b'", ["'a,b'"]),
    ],
)
def test_split_values_keeps_bracketed_and_quoted_commas(text, values):
    assert sw.split_values(text) == values


def test_parse_assignments_axes_ranges_and_fixed():
    fixed, axes = sw.parse_assignments(
        ["epochs=100", "optimizer.lr=0.1,0.01", "seed=range(0,7,3)", "model.basis=[x, sin(x)]"]
    )
    assert fixed == ["epochs=100", "model.basis=[x, sin(x)]"]
    assert axes == [sw.Axis("optimizer.lr", ("0.1", "0.01")), sw.Axis("seed", ("0", "3", "6"))]
    runs = sw.expand(axes)
    assert [r.values for r in runs[:2]] == [
        {"optimizer.lr": "0.1", "seed": "0"},
        {"optimizer.lr": "0.1", "seed": "3"},
    ]
    assert len(runs) == 6


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["seed=1,,2"], "empty value"),
        (["seed=range(3,3)"], "is empty"),
        (["seed=range(0,5,0)"], "step must not be 0"),
        (["seed=range(a,b)"], "range() takes integers"),
        (["seed=1,2", "seed=3"], "given twice"),
        (["nokey"], "is not key.path=value"),
    ],
)
def test_bad_axes_are_reported(items, message):
    with pytest.raises(sw.SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sw.parse_assignments(items)


def test_dry_run_prints_the_train_commands(tmp_path):
    res = runner.invoke(
        app,
        ["sweep", str(SEED), "optimizer.lr=0.1,0.01", "seed=0,1", "--dry-run", "-o", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == f"fitcli train {SEED} optimizer.lr=0.1 seed=0"
    assert len(lines) == 4
    assert not any(tmp_path.iterdir())


def test_invalid_run_config_is_reported_before_anything_runs(tmp_path):
    res = runner.invoke(app, ["sweep", str(SEED), "epochs=10,-1", "-o", str(tmp_path)])
    assert res.exit_code == 2
    assert "run 1 (epochs=-1): epochs: must be >= 1" in res.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


# -- batched runs equal single runs, bit for bit ---------------------------------------------------


def single_run(cfg):
    """What `fitcli train` computes: the real stepper and training loop."""
    from fitcli.prepare import prepare
    from fitcli.train import train

    prep = prepare(cfg)
    result = train(prep.model, prep.stepper, epochs=cfg.epochs, evaluate_loss=prep.evaluate_loss)
    return prep, result


@pytest.mark.parametrize(
    "axes",
    [
        ["optimizer.lr=0.001,0.01,0.05", "seed=0,1,2"],
        ["optimizer={name: Adam, lr: 0.05},{name: Adam, lr: 0.1, amsgrad: true}", "seed=3,4"],
        [
            "optimizer={name: SGD, lr: 0.01, momentum: 0.9, nesterov: true},"
            "{name: RMSprop, lr: 0.01}",
            "loss=l1,huber",
        ],
        ["data.noise.std=0.1,2.0", "model.init=[1, 2, 3],[0, 0, 0]", "loss=smooth_l1,mse"],
    ],
)
def test_batched_runs_are_bit_identical_to_single_runs(axes):
    import torch

    plan = sw.make_plan(SEED, ["epochs=60", *axes])
    cfgs = [plan.cfg(r) for r in plan.runs]
    from fitcli.prepare import prepare

    groups: dict = {}
    for i, c in enumerate(cfgs):
        groups.setdefault(sw.batch_key(c), []).append(i)
    assert None not in groups
    traces = {}
    for rows in groups.values():
        preps = [prepare(cfgs[i]) for i in rows]
        assert sw.batchable(preps)
        traces.update(zip(rows, sw.compute_batch(preps, rows), strict=True))
    for i, cfg in enumerate(cfgs):
        trace = traces[i]
        prep, result = single_run(cfg)
        n = result.epochs_run
        assert trace.losses[:n] == result.history.losses[:n]
        # parameters after every step, compared as raw bits
        want = torch.tensor(result.history.params[1:], dtype=torch.float64)
        got = trace.params[: len(want)]
        assert torch.equal(got.view(torch.int64), want.view(torch.int64))
        assert trace.params[-1].tolist() == prep.model.raw.tolist()


def test_batch_key_separates_what_cannot_share_a_program():
    plan = sw.make_plan(
        SEED,
        ["optimizer.name=SGD,LBFGS", "model.basis=[x, sin(x)],[x, cos(x)]", "epochs=5"],
    )
    keys = [sw.batch_key(plan.cfg(r)) for r in plan.runs]
    assert keys[2] is None and keys[3] is None  # LBFGS needs a closure: one by one
    assert keys[0] is not None and keys[1] is not None and keys[0] != keys[1]


def test_diverging_row_stops_alone_and_matches_its_single_run():
    plan = sw.make_plan(SEED, ["epochs=60", "optimizer.lr=0.01,1e6"])
    from fitcli.prepare import prepare

    preps = [prepare(plan.cfg(r)) for r in plan.runs]
    traces = sw.compute_batch(preps, [0, 1])
    _, good = single_run(plan.cfg(plan.runs[0]))
    _, bad = single_run(plan.cfg(plan.runs[1]))
    assert bad.status == "diverged" and good.status == "completed"
    assert len(traces[0].losses) == 60
    assert traces[1].losses[: bad.epochs_run] == bad.history.losses[: bad.epochs_run]
    assert len(traces[1].losses) < 60


# -- end to end: run directories, table, JSON ------------------------------------------------


def test_sweep_run_directories_match_fitcli_train(tmp_path):
    res = runner.invoke(
        app,
        [
            "sweep",
            str(SEED),
            *SMALL,
            "optimizer.lr=0.01,0.05",
            "seed=0,1",
            "-o",
            str(tmp_path / "s"),
        ],
    )
    assert res.exit_code == 0, res.output
    d = sweep_dir_of(tmp_path / "s")
    assert (d / sw.SWEEP_FILE).is_file()
    rows = table(d)
    assert [r["status"] for r in rows] == ["completed"] * 4
    assert [r["optimizer.lr"] for r in rows] == ["0.01", "0.01", "0.05", "0.05"]
    assert list(rows[0]) == [
        "index", "optimizer.lr", "seed", "status", "exit_code", "converged", "epochs", "final_loss",
        "theta0", "theta1", "theta2", "time_s", "run_dir",
    ]  # fmt: skip
    for row in rows[1::2]:
        target = tmp_path / f"train-{row['index']}"
        r = runner.invoke(
            app,
            [
                "train", str(SEED), *SMALL, f"optimizer.lr={row['optimizer.lr']}",
                f"seed={row['seed']}", "--run-dir", str(target), "--progress", "none",
            ],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        assert_same_run(target, d / row["run_dir"])
        summary = json.loads((d / row["run_dir"] / "summary.json").read_text())
        assert summary["command"][:3] == ["fitcli", "train", str(SEED)]
        assert float(row["theta1"]) == summary["params"]["theta1"]


@pytest.mark.slow
def test_json_output_and_mixed_executors(tmp_path):
    # LBFGS cannot batch: it runs on its own beside the SGD batch, and both are in the JSON.
    res = runner.invoke(
        app,
        [
            "sweep", str(SEED), *SMALL, "optimizer.name=SGD,LBFGS", "seed=0,1",
            "-o", str(tmp_path), "--json", "--progress", "none",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc) == {"sweep_dir", "runs", "completed", "failed"}
    assert doc["completed"] == 4 and doc["failed"] == 0
    assert [r["values"] for r in doc["runs"]][1] == {"optimizer.name": "SGD", "seed": 1}
    assert all(r["status"] == "completed" and "theta0" in r["params"] for r in doc["runs"])
    lbfgs = doc["runs"][2]
    target = tmp_path / "lbfgs"
    r = runner.invoke(
        app,
        ["train", str(SEED), *SMALL, "optimizer.name=LBFGS", "seed=0", "--run-dir", str(target)],
    )
    assert r.exit_code == 0, r.output
    assert_same_run(target, Path(lbfgs["run_dir"]))


def test_a_failing_run_does_not_stop_the_others(tmp_path):
    res = runner.invoke(
        app,
        ["sweep", str(SEED), *SMALL, "optimizer.lr=0.01,1e6,0.02", "-o", str(tmp_path)],
    )
    assert res.exit_code == 1
    rows = table(sweep_dir_of(tmp_path))
    assert [r["status"] for r in rows] == ["completed", "diverged", "completed"]
    assert rows[1]["exit_code"] == "3"


def test_fail_fast_stops_at_the_first_failure(tmp_path):
    # One by one (ExprModel runs do not batch), so the third never starts.
    res = runner.invoke(
        app,
        [
            "sweep", str(SEED), *SMALL, "optimizer.name=LBFGS", "optimizer.lr=1e9,0.5,0.5",
            "-o", str(tmp_path), "--fail-fast",
        ],
    )  # fmt: skip
    assert res.exit_code == 1
    rows = table(sweep_dir_of(tmp_path))
    assert rows[0]["status"] in ("diverged", "failed")
    assert rows[2]["status"] == "pending"


class FlagAfter:
    """A StopFlag stand-in that asks to stop after `n` questions (Ctrl-C mid-sweep)."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def requested(self) -> bool:
        self.n -= 1
        return self.n < 0


@pytest.mark.slow
def test_interrupt_marks_unfinished_runs_and_resume_finishes_them(tmp_path):
    plan = sw.make_plan(SEED, [*SMALL, "optimizer.name=SGD,LBFGS", "seed=0,1"])
    d = sw.create_sweep(plan, tmp_path, ["fitcli", "sweep"])
    rows = [sw.Row(r) for r in plan.runs]
    outcome = sw.run_sweep(plan, d, rows, sw.Options(), stop_flag=FlagAfter(20))
    assert outcome.interrupted and outcome.exit_code == 130
    statuses = [r["status"] for r in table(d)]
    assert "interrupted" in statuses and "completed" not in statuses[:1] + statuses[1:2]
    assert "pending" in statuses
    kept = {r["run_dir"]: (d / r["run_dir"] / "summary.json").stat().st_mtime_ns
            for r in table(d) if r["status"] == "completed"}  # fmt: skip
    res = runner.invoke(app, ["sweep", "--resume", str(d), "--progress", "none"])
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in table(d)] == ["completed"] * 4
    for rel, mtime in kept.items():
        assert (d / rel / "summary.json").stat().st_mtime_ns == mtime
    # a resumed run is the same run as an uninterrupted one
    fresh = runner.invoke(
        app,
        [
            "sweep",
            str(SEED),
            *SMALL,
            "optimizer.name=SGD,LBFGS",
            "seed=0,1",
            "-o",
            str(tmp_path / "f"),
        ],
    )
    assert fresh.exit_code == 0
    from sweep_helpers import assert_same_sweep

    assert_same_sweep(d, sweep_dir_of(tmp_path / "f"))


def test_resume_runs_only_what_is_missing(tmp_path):
    res = runner.invoke(app, ["sweep", str(SEED), *SMALL, "seed=0,1,2", "-o", str(tmp_path)])
    assert res.exit_code == 0
    d = sweep_dir_of(tmp_path)
    rows = table(d)
    import shutil

    shutil.rmtree(d / rows[1]["run_dir"])
    before = (d / rows[0]["run_dir"] / "summary.json").stat().st_mtime_ns
    res = runner.invoke(app, ["sweep", "--resume", str(d), "--json", "--progress", "none"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["completed"] == 3
    assert (d / rows[1]["run_dir"] / "summary.json").is_file()
    assert (d / rows[0]["run_dir"] / "summary.json").stat().st_mtime_ns == before


def test_resume_needs_a_sweep_directory(tmp_path):
    res = runner.invoke(app, ["sweep", "--resume", str(tmp_path)])
    assert res.exit_code == 2
    assert "is not a sweep directory" in res.stderr


def test_scheduler_without_dask_explains_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(sw, "dask_available", lambda: False)
    res = runner.invoke(app, ["sweep", str(SEED), "seed=0,1", "--scheduler", "local"])
    assert res.exit_code == 2
    assert "pip install 'fitcli[dask]'" in res.stderr


@pytest.mark.slow
def test_local_worker_processes_give_the_same_runs(tmp_path):
    args = ["sweep", str(SEED), *SMALL, "optimizer.name=SGD,LBFGS", "seed=0,1"]
    a = runner.invoke(app, [*args, "-o", str(tmp_path / "a"), "--workers", "2"])
    b = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    from sweep_helpers import assert_same_sweep

    assert_same_sweep(sweep_dir_of(tmp_path / "a"), sweep_dir_of(tmp_path / "b"))


@pytest.mark.slow
def test_ctrl_c_in_a_real_process_exits_130(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "sweep", str(SEED), "epochs=100000",
         "seed=0,1", "-o", str(tmp_path), "--progress", "none"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob("*/sweep.yaml")):
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    rows = table(sweep_dir_of(tmp_path))
    assert {r["status"] for r in rows} == {"interrupted"}
    assert all((sweep_dir_of(tmp_path) / r["run_dir"] / "summary.json").is_file() for r in rows)


# -- writing: deferred state, forked writers --------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        [*SMALL],
        [*SMALL, "optimizer.name=Adam", "optimizer.lr=0.1"],
        [*SMALL, "optimizer.lr=1e6"],  # diverges: the final snapshot steps back
        ["epochs=200", "snapshots=5", "optimizer={name: LM}"],  # converges early: filled snapshots
    ],
)
def test_deferred_state_writes_what_every_snapshot_would(tmp_path, overrides):
    from fitcli.config import load_config
    from fitcli.experiment import execute
    from fitcli.prepare import prepare

    for name, defer in (("each", False), ("once", True)):
        prep = prepare(load_config(SEED, overrides))
        (tmp_path / name).mkdir()
        execute(prep, tmp_path / name, command=["fitcli"], defer_state=defer)
    assert_same_run(tmp_path / "each", tmp_path / "once")


@pytest.mark.parametrize(
    "overrides",
    [[*SMALL], ["epochs=200", "snapshots=5", "optimizer={name: LM}"]],
)
def test_a_replayed_run_writes_each_file_once(tmp_path, monkeypatch, overrides):
    """A sweep's replay writes every file of its run directory once (summary.json twice: it
    marks the directory as a run from the start), the last snapshot page included, which
    `fitcli train` draws first without and then with the final fit's bands."""
    from fitcli.config import load_config
    from fitcli.experiment import execute
    from fitcli.prepare import prepare
    from fitcli.rundir import files

    written: list[str] = []
    real = files.atomic_write

    def recording(path, data):
        written.append(str(Path(path).relative_to(tmp_path)))
        real(path, data)

    monkeypatch.setattr(files, "atomic_write", recording)
    prep = prepare(load_config(SEED, overrides))
    execute(prep, tmp_path, command=["fitcli"], defer_state=True)
    repeated = sorted({p for p in written if written.count(p) > 1})
    assert repeated == ["summary.json"]
    assert written.count("summary.json") == 2
    pages = sorted(p.name for p in (tmp_path / "snapshots").glob("*.html"))
    assert pages == sorted({p.removeprefix("snapshots/") for p in written if p.endswith(".html")})


def test_forked_writers_write_what_one_writer_writes(tmp_path, monkeypatch):
    calls = []
    forked = sw._write_forked
    monkeypatch.setattr(
        sw, "_write_forked", lambda jobs, done: calls.append(len(jobs)) or forked(jobs, done)
    )
    args = [
        "sweep",
        str(SEED),
        *SMALL,
        "optimizer.lr=0.01,0.05,1e6",
        "seed=0,1",
        "--progress",
        "none",
    ]
    monkeypatch.setenv("FITCLI_SWEEP_WRITERS", "1")
    a = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert calls == []
    monkeypatch.setenv("FITCLI_SWEEP_WRITERS", "2")
    b = runner.invoke(app, [*args, "-o", str(tmp_path / "b")])
    assert calls == [5]  # the first run is written here, the other five by two processes
    assert a.exit_code == b.exit_code == 1, a.output + b.output  # two runs diverge
    from sweep_helpers import assert_same_sweep

    da, db = sweep_dir_of(tmp_path / "a"), sweep_dir_of(tmp_path / "b")
    assert_same_sweep(da, db)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in table(da)]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in table(db)]


def test_a_fault_in_a_forked_writer_stops_the_sweep_like_one_writer(tmp_path, monkeypatch):
    from fitcli.errors import RunDirError

    write = replay.write_run

    def faulty(plan, run, trace, run_dir, plotlyjs, prep=None):
        if run.index == 3:
            raise RunDirError(f"cannot write {run_dir}: No space left on device")
        return write(plan, run, trace, run_dir, plotlyjs, prep)

    monkeypatch.setattr(replay, "write_run", faulty)
    args = ["sweep", str(SEED), *SMALL, "seed=range(0,8)", "--progress", "none"]
    results = []
    for writers in ("1", "2"):
        monkeypatch.setenv("FITCLI_SWEEP_WRITERS", writers)
        res = runner.invoke(app, [*args, "-o", str(tmp_path / writers)])
        rows = table(sweep_dir_of(tmp_path / writers))
        results.append((res.exit_code, rows[3]["status"], "No space left" in res.stderr))
    assert results[0] == results[1] == (1, "pending", True)


# -- rendered runs: what Dask workers send back, and how the client puts it in place ----------


@pytest.mark.slow
def test_rendered_runs_installed_here_equal_a_local_sweep(tmp_path):
    # What Dask workers do (render_task, run_task + render_traces) and the client then
    # (install_rendered), in this process: the run directories must be a local sweep's, and
    # the worker's scratch folder must not show in any file.
    axes = [*SMALL, "optimizer.name=SGD,LBFGS", "optimizer.lr=0.01,1e6"]
    plan = sw.make_plan(SEED, axes)
    cfgs = {r.index: plan.cfg(r) for r in plan.runs}
    tasks = sw.make_tasks(plan, cfgs, list(cfgs), 1)
    assert any(t.batch for t in tasks) and any(not t.batch for t in tasks)
    d = sw.create_sweep(plan, tmp_path / "a", ["fitcli", "sweep"])
    rendered_runs = []
    for task in tasks:
        if task.batch:  # computed by one task, rendered by others (prepared again), run by run
            traces = sw.run_task(task)
            for i in task.indices:
                rendered_runs += sw.render_traces(task.plan, traces, [i], "directory")
        else:
            rendered_runs += sw.render_task(task, "directory")
    assert sorted(r.trace.index for r in rendered_runs) == list(range(len(plan.runs)))
    for rendered in rendered_runs:
        assert rendered.trace.params is None  # the tensors stay on the worker
        assert "plotly.min.js" not in rendered.files  # linked here instead
        scratch = str(Path(rendered.summary["run_dir"]).parent).encode()
        # summary.json names it (run_dir) and is rewritten by the client; nothing else may.
        assert [k for k, v in rendered.files.items() if v and scratch in v] == ["summary.json"]
        run = plan.runs[rendered.trace.index]
        target = d / sw.run_dir_name(plan, run)
        summary = sw.install_rendered(rendered, target, "directory")
        assert summary["run_dir"] == str(target)
        assert json.loads((target / "summary.json").read_text()) == summary
        js = (target / "plotly.min.js").stat()
        assert js.st_ino == (d / sw.SHARED_JS).stat().st_ino  # one copy per sweep
    local = sw.create_sweep(plan, tmp_path / "b", ["fitcli", "sweep"])
    sw.run_sweep(plan, local, [sw.Row(r) for r in plan.runs], sw.Options())
    from sweep_helpers import assert_same_sweep

    assert_same_sweep(d, local)
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == [sw.SHARED_JS]


def test_install_run_dir_is_all_or_nothing(tmp_path, monkeypatch):
    from fitcli.rundir import files as store

    files = {
        "config.yaml": b"a",
        "snapshots/": None,
        "snapshots/epoch-1.html": b"b",
        "summary.json": b'{"fitcli_run": 1}',
    }
    target = tmp_path / "run"
    store.install_run_dir(target, files)
    assert (target / "snapshots" / "epoch-1.html").read_bytes() == b"b"
    calls = []

    def interrupted_open(path, mode="r", *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second file is written
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(store, "open", interrupted_open, raising=False)
    with pytest.raises(KeyboardInterrupt):
        store.install_run_dir(target, {**files, "config.yaml": b"new"})
    # The run directory that was there is untouched, and nothing half-written is left.
    assert (target / "config.yaml").read_bytes() == b"a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        store.install_run_dir(tmp_path / "new", files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    store.install_run_dir(target, {**files, "config.yaml": b"new"})  # a run directory: replaced
    assert (target / "config.yaml").read_bytes() == b"new"
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(store.NotRunDirError, match="not a fitcli run directory"):
        store.install_run_dir(other, files)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]


def test_forked_writers_end_on_their_own_when_their_work_is_done(tmp_path, monkeypatch):
    # Pool.terminate signals the writers while it holds the lock they wait on: a writer the
    # signal reaches just before it waits never ends (a sweep hung so). Only faults use it.
    import multiprocessing.process

    terminated = []
    terminate = multiprocessing.process.BaseProcess.terminate
    monkeypatch.setattr(
        multiprocessing.process.BaseProcess,
        "terminate",
        lambda self: terminated.append(self.pid) or terminate(self),
    )
    monkeypatch.setenv("FITCLI_SWEEP_WRITERS", "2")
    res = runner.invoke(
        app,
        ["sweep", str(SEED), *SMALL, "seed=range(0,6)", "-o", str(tmp_path), "--progress", "none"],
    )
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in table(sweep_dir_of(tmp_path))] == ["completed"] * 6
    assert terminated == []
