"""fitcli runs: a table of the run directories below some paths, from train and sweep alike."""

from __future__ import annotations

import csv
import io
import json
import math

from sweep_helpers import SEED, SMALL
from typer.testing import CliRunner

from fitcli.cli import app

runner = CliRunner()


def make_runs(tmp_path):
    res = runner.invoke(
        app, ["sweep", str(SEED), *SMALL, "optimizer.lr=0.01,1e6", "-o", str(tmp_path / "sweeps")]
    )
    assert res.exit_code == 1  # the second one diverges
    res = runner.invoke(
        app, ["train", str(SEED), *SMALL, "--out", str(tmp_path / "runs"), "--progress", "none"]
    )
    assert res.exit_code == 0, res.output
    (tmp_path / "runs" / "not-a-run").mkdir()
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "summary.json").write_text("{not json")
    (tmp_path / "empty").mkdir()


def test_table_lists_train_and_sweep_runs_and_says_what_it_skipped(tmp_path):
    make_runs(tmp_path)
    res = runner.invoke(
        app,
        ["runs", str(tmp_path / "runs"), str(tmp_path / "sweeps"), str(tmp_path / "empty"),
         str(tmp_path / "missing")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    for col in ("name", "status", "epochs", "final_loss", "params", "time_s", "path"):
        assert col in res.stdout
    assert res.stdout.count("seed-sine") >= 3
    assert "diverged" in res.stdout and "completed" in res.stdout
    assert "broken: unreadable summary.json" in res.stderr
    assert "empty: no run directories below it" in res.stderr
    assert "missing: no such file or directory" in res.stderr


def test_csv_sorted_by_final_loss(tmp_path):
    make_runs(tmp_path)
    res = runner.invoke(
        app, ["runs", str(tmp_path / "sweeps"), "--format", "csv", "--sort", "final_loss"]
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert list(rows[0])[:4] == ["name", "status", "epochs", "final_loss"]
    assert "theta0" in rows[0] and "time_s" in rows[0] and "path" in rows[0]
    losses = [float(r["final_loss"]) for r in rows]
    assert losses == sorted(losses) and len(rows) == 2


def test_json_filtered_by_status(tmp_path):
    make_runs(tmp_path)
    res = runner.invoke(
        app,
        ["runs", str(tmp_path / "runs"), str(tmp_path / "sweeps"), "--format", "json",
         "--status", "completed"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc) == 2 and {r["status"] for r in doc} == {"completed"}
    assert set(doc[0]) == {"name", "status", "epochs", "final_loss", "params", "time_s", "path"}


def test_unknown_sort_key_is_an_input_error(tmp_path):
    make_runs(tmp_path)
    res = runner.invoke(app, ["runs", str(tmp_path / "runs"), "--sort", "colour"])
    assert res.exit_code == 2
    assert "unknown column 'colour'" in res.stderr


def test_a_running_run_whose_process_is_gone_is_stale_and_only_this_host_is_checked(tmp_path):
    """summary.json says running until the run ends; its `process` record tells whether that
    is still true: a dead pid, or a live pid that started at another time (reused), is stale;
    this very process is running; another host cannot be checked: unknown."""
    import os
    import subprocess

    from fitcli import liveness

    res = runner.invoke(
        app, ["train", str(SEED), *SMALL, "--out", str(tmp_path / "runs"), "--progress", "none"]
    )
    assert res.exit_code == 0, res.output
    (run,) = (tmp_path / "runs").iterdir()
    done = json.loads((run / "summary.json").read_text())
    assert "process" not in done  # a finished run has no writer
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = liveness.identity()
    assert me["pid"] == os.getpid() and isinstance(me["started"], int)  # Linux: /proc
    cases = {
        "dead": ({**me, "pid": dead.pid}, "stale"),
        "reused": ({**me, "started": me["started"] - 1}, "stale"),
        "rebooted": ({**me, "boot_id": "not-this-boot"}, "stale"),
        "alive": (me, "running"),
        "elsewhere": ({**me, "pid": dead.pid, "host": me["host"] + "-other"}, "unknown"),
        "unrecorded": (None, "running"),
    }
    for name, (record, _) in cases.items():
        d = tmp_path / "listed" / name
        d.mkdir(parents=True)
        for f in ("config.yaml", "data.csv"):
            (d / f).write_bytes((run / f).read_bytes())
        summary = {**done, "status": "running", "exit_code": None}
        if record is not None:
            summary["process"] = record
        (d / "summary.json").write_text(json.dumps(summary))
    res = runner.invoke(app, ["runs", str(tmp_path / "listed"), "--format", "json"])
    assert res.exit_code == 0, res.output
    got = {row["path"].rsplit("/", 1)[-1]: row["status"] for row in json.loads(res.stdout)}
    assert got == {name: want for name, (_, want) in cases.items()}
    res = runner.invoke(app, ["runs", str(tmp_path / "listed"), "--status", "stale"])
    assert res.exit_code == 0 and res.stdout.count("stale") == 3, res.output


def test_a_grouped_run_is_listed_with_its_group_counts(tmp_path):
    # A grouped run of independent fits showed an empty params cell: its values are per group.
    rows = ["t,y,well"]
    for g, (a, b) in enumerate([(2.0, 0.5), (1.5, 0.9), (3.0, 0.3)]):
        rows += [f"{t!r},{a * math.exp(-b * t)!r},w{g}" for t in [0.0, 0.5, 1.0, 2.0, 3.0, 4.0]]
    rows += ["0.0,1.0,w3", "1.0,0.5,w3"]  # two points for two parameters: fails, too few
    (tmp_path / "w.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "g.yaml"
    cfg.write_text(
        "name: plate\ndata: {file: w.csv, columns: {x: t, y: y, group: well}}\n"
        "model: {expr: a*exp(-b*x), params: {a: {value: 1, per_group: true}, "
        "b: {value: 1, per_group: true}}}\noptimizer: {name: LM}\n"
    )
    run = tmp_path / "runs" / "plate"
    res = runner.invoke(app, ["train", str(cfg), "--run-dir", str(run), "--progress", "none"])
    assert res.exit_code == 1, res.output
    summary = json.loads((run / "summary.json").read_text())
    res = runner.invoke(app, ["runs", str(tmp_path / "runs")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("plate"))
    counts = (
        f"{summary['groups']} groups: {summary['groups_converged']} converged, "
        f"{summary['groups_failed']} failed"
    )
    assert counts == "4 groups: 3 converged, 1 failed" and counts in line
    # The machine-readable forms keep their columns: the counts are summary.json's.
    listed = json.loads(
        runner.invoke(app, ["runs", str(tmp_path / "runs"), "--format", "json"]).stdout
    )
    assert listed[0]["params"] == {}
