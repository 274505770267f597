"""fitcli train --resume of grouped runs: a run stopped as Ctrl-C stops it, or killed at any file
write, resumes to what the same run uninterrupted writes (groups.csv, summary.json's counts and
shared parameters, snapshot pages), for independent LM fits, a global LM fit and a gradient
optimizer; and what resuming refuses (a completed run, changed data, a live writer)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from test_groups import ALL_PER_GROUP, config, read_groups, write_wells
from typer.testing import CliRunner

from fitcli.cli import app
from fitcli.config import load_config
from fitcli.experiment import execute
from fitcli.prepare import prepare
from fitcli.rundir import files as store

runner = CliRunner()

GLOBAL = {"a": {"value": 2, "per_group": True}, "b": 0.8, "c": 0.2}
# Each kind of grouped fit: its params and top-level config. The LM fits take 6 to 27
# iterations, so the checkpoints at 10, 20 and 30 fall inside them.
KINDS = {
    "independent": (ALL_PER_GROUP, {"epochs": 40, "snapshots": 4}),
    "global": (GLOBAL, {"epochs": 40, "snapshots": 4}),
    "adam": (GLOBAL, {"epochs": 300, "snapshots": 3, "optimizer": {"name": "Adam", "lr": 0.05}}),
    # Independent fits by the compiled kernel (fitcli.lm_jit), forced on for these few groups.
    "compiled": (ALL_PER_GROUP, {"epochs": 40, "snapshots": 4}),
}


@pytest.fixture(autouse=True)
def _compiled_kind(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("kind") == "compiled":
        monkeypatch.setenv("FITCLI_JIT", "1")


# The summary fields that say what a run found (not when or how long it ran).
RESULT_FIELDS = (
    "status", "exit_code", "epochs_run", "groups", "groups_converged", "groups_failed",
    "groups_completed", "params", "stderr", "n_params", "converged", "reason", "rss",
    "final_loss", "per_group_params", "groups_file",
)  # fmt: skip


def make_config(tmp_path: Path, kind: str) -> Path:
    write_wells(tmp_path / "wells.csv", groups=12, n=20)
    params, top = KINDS[kind]
    return config(tmp_path, params, **top)


def cli(*args: str):
    return runner.invoke(app, [*args, "--progress", "none"])


def reference_run(cfg: Path, tmp_path: Path) -> Path:
    run = tmp_path / "reference"
    result = cli("train", str(cfg), "--run-dir", str(run))
    assert result.exit_code == 0, result.output
    return run


def stopped_at(cfg: Path, run: Path, k: int) -> dict:
    """The run stopped after `k` iterations (epochs) the way Ctrl-C stops it."""
    prep = prepare(load_config(cfg))
    run.mkdir()
    return execute(prep, run, command=["test"], on_epoch=lambda epoch, loss: epoch >= k)


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_same_result(run: Path, reference: Path, *, exact: bool, stops: tuple = ()) -> None:
    """groups.csv and summary.json's results as the uninterrupted run's: exactly, or (a resumed
    LM restarts its step scaling where the signal stopped it) to 1e-7 relative. The snapshot
    pages are the uninterrupted run's, and (as for a single run) the fit where it stopped."""
    got, want = summary(run), summary(reference)
    rows, ref_rows = read_groups(run), read_groups(reference)
    assert [r["group"] for r in rows] == [r["group"] for r in ref_rows]
    assert [r["status"] for r in rows] == [r["status"] for r in ref_rows]
    assert [r["n_points"] for r in rows] == [r["n_points"] for r in ref_rows]
    if exact:
        assert rows == ref_rows
        assert {k: got.get(k) for k in RESULT_FIELDS} == {k: want.get(k) for k in RESULT_FIELDS}
    else:
        numbers = [k for k in rows[0] if k not in ("group", "status", "reason", "iterations")]
        for r, ref in zip(rows, ref_rows, strict=True):
            np.testing.assert_allclose(
                [float(r[k]) for k in numbers], [float(ref[k]) for k in numbers], rtol=1e-7
            )
        for k in ("status", "groups", "groups_converged", "groups_failed", "groups_completed"):
            assert got[k] == want[k], k
        for name, value in want["params"].items():
            assert got["params"][name] == pytest.approx(value, rel=1e-7)
    pages = {p.name for p in (run / "snapshots").iterdir()}
    width = len(str(want["epochs"]))
    stopped = {f"epoch-{e:0{width}d}.html" for e in stops}
    assert pages == {p.name for p in (reference / "snapshots").iterdir()} | stopped
    assert (run / "report.html").is_file()
    assert not list(run.rglob(".*.tmp-*"))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_stopped_grouped_run_resumes_to_the_uninterrupted_result(tmp_path, kind):
    cfg = make_config(tmp_path, kind)
    reference = reference_run(cfg, tmp_path)
    # Stopped between checkpoints, then stopped again after resuming, then resumed to the end.
    first, second = (4, 14) if kind != "adam" else (40, 170)
    run = tmp_path / "run"
    stopped = stopped_at(cfg, run, first)
    assert stopped["status"] == "interrupted" and stopped["exit_code"] == 130
    assert stopped["epochs_run"] == first
    assert summary(run)["status"] == "interrupted"
    assert all(r["reason"] for r in read_groups(run))
    from fitcli.resume import prepare_resume

    prep, point = prepare_resume(run, [])
    again = execute(prep, run, command=["test"], on_epoch=lambda e, loss: e >= second, resume=point)
    assert again["status"] == "interrupted" and again["epochs_run"] == second
    result = cli("train", "--resume", str(run), "--json")
    assert result.exit_code == 0, result.output
    # Exact but for the global fit, whose LM restarts its step scaling where it resumes.
    assert_same_result(run, reference, exact=kind != "global", stops=(first, second))
    assert [r["from_epoch"] for r in summary(run)["resumes"]] == [first, second]


class Killed(BaseException):
    """Stands in for SIGKILL: once raised, nothing more reaches the disk."""


def gone_process() -> dict:
    """The `process` record of a process that has ended, for runs killed in this one."""
    from fitcli import liveness

    proc = subprocess.Popen(["true"])
    proc.wait()
    return {**liveness.identity(), "pid": proc.pid}


@pytest.mark.parametrize("kind", ["independent", "global", "compiled"])
def test_a_grouped_run_killed_at_any_write_resumes_exactly(tmp_path, monkeypatch, kind):
    """Killed before each file write in turn: resumed from its last saved state, the run
    writes exactly what the uninterrupted run wrote (the state is saved at the checkpoints
    the uninterrupted run passes too)."""
    from fitcli import liveness

    cfg = make_config(tmp_path, kind)
    reference = reference_run(cfg, tmp_path)
    writer = gone_process()
    resumed, n = 0, 0
    while True:
        n += 1
        run = tmp_path / f"kill{n}"
        calls = {"n": 0}
        real = store.atomic_write

        def counted(*args, calls=calls, n=n, real=real):
            calls["n"] += 1
            if calls["n"] >= n:
                raise Killed
            return real(*args)

        with monkeypatch.context() as m:
            m.setattr(store, "atomic_write", counted)
            m.setattr(liveness, "identity", lambda: writer)
            prep = prepare(load_config(cfg))
            run.mkdir()
            try:
                execute(prep, run, command=["test"])
            except Killed:
                pass
            else:
                break  # n is past the last write
        result = cli("train", "--resume", str(run))
        if not (run / "state.json").exists():
            assert result.exit_code == 2 and "resume" in result.output, result.output
            continue
        assert result.exit_code == 0, (n, result.output)
        assert_same_result(run, reference, exact=True)
        resumed += 1
    assert resumed >= 5, resumed


def test_a_completed_grouped_run_refuses_to_resume_and_changes_nothing(tmp_path):
    cfg = make_config(tmp_path, "independent")
    run = reference_run(cfg, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = cli("train", "--resume", str(run))
    assert result.exit_code == 2
    assert "has already completed" in result.output and "nothing to resume" in result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def write_files(folder: Path, names: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(3)
    for name in names:
        t = np.linspace(0, 5, 20)
        y = rng.uniform(1, 3) * np.exp(-0.7 * t) + 0.2 + rng.normal(0, 0.01, t.size)
        body = "".join(f"{float(u)!r},{float(v)!r}\n" for u, v in zip(t, y, strict=True))
        (folder / f"{name}.csv").write_text("t,y\n" + body)


@pytest.mark.parametrize("form", ["list", "glob"])
def test_resume_refuses_a_changed_group_file_naming_it(tmp_path, form):
    write_files(tmp_path / "wells", ["alpha", "beta", "gamma"])
    names = ["wells/alpha.csv", "wells/beta.csv", "wells/gamma.csv"]
    files = "wells/*.csv" if form == "glob" else names
    data = {"files": files, "columns": {"x": "t", "y": "y"}}
    cfg = config(tmp_path, ALL_PER_GROUP, data, epochs=40, snapshots=4)
    run = tmp_path / "run"
    assert stopped_at(cfg, run, 3)["status"] == "interrupted"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    beta = tmp_path / "wells" / "beta.csv"
    good = beta.read_text()
    beta.write_text(good.replace("\n0.0,", "\n0.0,9", 1))
    result = cli("train", "--resume", str(run))
    assert result.exit_code == 2, result.output
    assert "beta.csv" in result.output and "changed since the run started" in result.output
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    beta.write_text(good)
    if form == "glob":  # a file more now matches the glob
        write_files(tmp_path / "wells", ["delta"])
        result = cli("train", "--resume", str(run))
        assert result.exit_code == 2, result.output
        assert "delta.csv" in result.output
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
        (tmp_path / "wells" / "delta.csv").unlink()
    result = cli("train", "--resume", str(run))
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_sigterm_stops_a_grouped_run_which_resumes_once_its_process_is_gone(tmp_path):
    """A real `fitcli train` process: resuming it while it runs is refused; SIGTERM stops it
    after the current epoch (exit 143, summary interrupted by SIGTERM); resumed, it ends with
    exactly the uninterrupted run's groups.csv (a gradient optimizer's state is saved whole)."""
    write_wells(tmp_path / "wells.csv", groups=12, n=20)
    top = {"epochs": 600, "snapshots": 3, "optimizer": {"name": "Adam", "lr": 0.05}}
    cfg = config(tmp_path, GLOBAL, **top)
    reference = reference_run(cfg, tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "train", str(cfg), "--run-dir", str(run)]
        + ["--progress", "none", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        end = time.monotonic() + 120
        while not (run / "state.json").exists():
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()
            time.sleep(0.01)
        alive = cli("train", "--resume", str(run))
        assert alive.exit_code == 2, alive.output
        assert f"process {proc.pid}" in alive.output and "still running" in alive.output
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    stopped = summary(run)
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGTERM"
    assert stopped["reason"].startswith("interrupted by SIGTERM after epoch")
    assert json.loads(stdout)["status"] == "interrupted"
    with open(run / "groups.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 12
    result = cli("train", "--resume", str(run))
    assert result.exit_code == 0, result.output
    assert_same_result(run, reference, exact=True, stops=(stopped["epochs_run"],))


def test_a_state_without_the_lm_carry_resumes_and_a_bad_one_is_named(tmp_path):
    # state.json from before the LM's carried state (no nu, scale2, polish) still resumes, from
    # the start's scaling; a carried state of the wrong shape is refused naming the field.
    from fitcli.errors import ResumeError
    from fitcli.rundir.group_state import load_group_state

    cfg = make_config(tmp_path, "independent")
    run = tmp_path / "run"
    stopped_at(cfg, run, 4)
    doc = json.loads((run / "state.json").read_text())
    assert {"nu", "scale2", "polish"} <= set(doc)
    old = {k: v for k, v in doc.items() if k not in ("nu", "scale2", "polish")}
    (run / "state.json").write_text(json.dumps(old))
    assert load_group_state(run).nu is None
    result = cli("train", "--resume", str(run), "--json")
    assert result.exit_code == 0, result.output
    assert summary(run)["groups_converged"] == 12
    bad = dict(doc, scale2=doc["nu"])
    (run / "state.json").write_text(json.dumps(bad))
    with pytest.raises(ResumeError, match="scale2"):
        load_group_state(run)
