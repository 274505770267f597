"""fitcli sweep on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on
127.0.0.1, started here and torn down after; the run directories must match a local sweep's."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import ROOT, SEED, SMALL, assert_same_sweep
from typer.testing import CliRunner

from fitcli import sweep as sw
from fitcli.cli import app
from fitcli.sweep import cluster as sweep_cluster

pytest.importorskip("distributed")
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """tcp address of a scheduler with two single-threaded workers (separate processes)."""
    dask = shutil.which("dask", path=os.path.dirname(sys.executable)) or shutil.which("dask")
    if dask is None:
        pytest.skip("the dask command is not installed")
    port, dash = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    logs = tmp_path_factory.mktemp("dask")
    procs = []

    def start(args: list[str], name: str) -> None:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(
            (subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=logs), log)
        )

    try:
        start(
            [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--dashboard-address", f"127.0.0.1:{dash}"],
            "scheduler",
        )  # fmt: skip
        wait_for(port)
        for k in range(2):
            start(
                [dask, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                 "--no-dashboard", "--name", f"w{k}"],
                f"worker{k}",
            )  # fmt: skip
        from distributed import Client

        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
        yield address
    finally:
        for proc, log in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def only_dir(out: Path) -> Path:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    return d


def table(d: Path) -> list[dict]:
    with open(d / sw.RUNS_FILE, newline="") as fh:
        return list(csv.DictReader(fh))


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def test_sweep_on_a_dask_cluster_matches_a_local_sweep(cluster, tmp_path, monkeypatch):
    # SGD runs batch on the workers (two batches of 3, each rendered in parts of 2 by tasks of
    # their own), LBFGS runs one by one; the workers write each run directory and send it back,
    # the client puts it in place.
    monkeypatch.setattr(sweep_cluster, "DASK_RENDER_RUNS", 2)
    args = ["sweep", str(SEED), *SMALL, "optimizer.name=SGD,LBFGS", "seed=range(0,6)"]
    remote = runner.invoke(
        app, [*args, "-o", str(tmp_path / "remote"), "--scheduler", cluster, "--progress", "none"]
    )
    assert remote.exit_code == 0, remote.output
    local = runner.invoke(app, [*args, "-o", str(tmp_path / "local"), "--progress", "none"])
    assert local.exit_code == 0, local.output
    d = only_dir(tmp_path / "remote")
    assert_same_sweep(d, only_dir(tmp_path / "local"))
    assert untimed(table(d)) == untimed(table(only_dir(tmp_path / "local")))
    # Nothing left over from putting runs in place; one plotly.js, linked into every run.
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == [sw.SHARED_JS]
    shared = (d / sw.SHARED_JS).stat().st_ino
    for row in table(d):
        run_dir = d / row["run_dir"]
        assert (run_dir / "plotly.min.js").stat().st_ino == shared
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["run_dir"] == str(run_dir)  # not the worker's scratch folder


def test_failed_runs_on_a_dask_cluster_stay_in_their_rows(cluster, tmp_path):
    args = ["sweep", str(SEED), *SMALL, "optimizer.lr=0.01,1e6,0.02", "--progress", "none"]
    remote = runner.invoke(
        app, [*args, "-o", str(tmp_path / "remote"), "--scheduler", cluster, "--json"]
    )
    assert remote.exit_code == 1, remote.output
    doc = json.loads(remote.stdout)
    assert (doc["completed"], doc["failed"]) == (2, 1)
    assert [r["status"] for r in doc["runs"]] == ["completed", "diverged", "completed"]
    assert all(Path(r["run_dir"]).is_dir() for r in doc["runs"])
    local = runner.invoke(app, [*args, "-o", str(tmp_path / "local")])
    assert local.exit_code == 1
    assert_same_sweep(only_dir(tmp_path / "remote"), only_dir(tmp_path / "local"))


def test_fail_fast_on_a_dask_cluster_cancels_what_did_not_run(cluster, tmp_path):
    # A scheduler makes every run a task of its own: the first diverges at once, the others
    # take seconds, and are cancelled (still pending) instead of run.
    res = runner.invoke(
        app,
        ["sweep", str(SEED), "epochs=4000", "snapshots=2",
         "scheduler={name: StepLR, step_size: 1000}", "optimizer.lr=1e6,0.01,0.02,0.03",
         "-o", str(tmp_path), "--scheduler", cluster, "--fail-fast", "--progress", "none"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    rows = table(only_dir(tmp_path))
    assert rows[0]["status"] == "diverged"
    assert [r["status"] for r in rows[2:]] == ["pending", "pending"]


class StopAfterFirstRun:
    """A StopFlag stand-in: Ctrl-C as soon as one run directory is in place."""

    def __init__(self, sweep_dir: Path) -> None:
        self.sweep_dir = sweep_dir

    @property
    def requested(self) -> bool:
        return any(self.sweep_dir.glob("*/summary.json"))


def test_interrupted_dask_sweep_marks_what_did_not_come_back_and_resumes(cluster, tmp_path):
    plan = sw.make_plan(SEED, [*SMALL, "seed=range(0,12)"])
    d = sw.create_sweep(plan, tmp_path / "remote", ["fitcli", "sweep"])
    rows = [sw.Row(r) for r in plan.runs]
    options = sw.Options(scheduler=cluster, client=sw.connect(cluster))
    outcome = sw.run_sweep(plan, d, rows, options, stop_flag=StopAfterFirstRun(d))
    assert outcome.interrupted and outcome.exit_code == 130
    got = table(d)
    done = [r for r in got if r["status"] == "completed"]
    assert done and len(done) < len(got)
    assert {r["status"] for r in got} == {"completed", "interrupted"}
    assert all(r["run_dir"] == "" for r in got if r["status"] == "interrupted")
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == sorted(r["run_dir"] for r in done)
    kept = {r["run_dir"]: (d / r["run_dir"] / "summary.json").stat().st_mtime_ns for r in done}
    res = runner.invoke(
        app, ["sweep", "--resume", str(d), "--scheduler", cluster, "--progress", "none"]
    )
    assert res.exit_code == 0, res.output
    assert {r["status"] for r in table(d)} == {"completed"}
    for rel, mtime in kept.items():
        assert (d / rel / "summary.json").stat().st_mtime_ns == mtime
    fresh = runner.invoke(
        app, ["sweep", str(SEED), *SMALL, "seed=range(0,12)", "-o", str(tmp_path / "local")]
    )
    assert fresh.exit_code == 0, fresh.output
    assert_same_sweep(d, only_dir(tmp_path / "local"))


def test_scheduler_from_the_environment(cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("FITCLI_DASK_SCHEDULER", cluster)
    res = runner.invoke(
        app, ["sweep", str(SEED), *SMALL, "seed=0,1", "-o", str(tmp_path), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert '"completed": 2' in res.stdout


def test_unreachable_scheduler_is_a_clean_error(tmp_path):
    res = runner.invoke(
        app,
        ["sweep", str(SEED), *SMALL, "seed=0,1", "-o", str(tmp_path),
         "--scheduler", f"tcp://127.0.0.1:{free_port()}"],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "cannot reach the Dask scheduler" in res.stderr
    assert list(tmp_path.iterdir()) == []  # connected before the sweep directory is made


@pytest.mark.slow
def test_ctrl_c_at_the_terminal_stops_a_local_cluster_sweep(tmp_path):
    # SIGINT to the whole process group, as a terminal sends it: the local cluster's workers
    # ignore it (this process decides), the sweep marks its runs and exits 130.
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "sweep", str(SEED), "epochs=100000",
         "seed=0,1", "-o", str(tmp_path), "--progress", "none", "--scheduler", "local"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(tmp_path.glob("*/sweep.yaml")):
            time.sleep(0.2)
        time.sleep(3.0)  # the workers are computing
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert b"KeyboardInterrupt" not in err
    rows = table(only_dir(tmp_path))
    assert {r["status"] for r in rows} == {"interrupted"}


@pytest.mark.slow
def test_sigterm_stops_the_client_of_a_dask_sweep_exit_143(cluster, tmp_path):
    """SIGTERM to the sweep's process (`timeout`, a scheduler): run 0 (40 epochs) is kept, run 1
    (20,000, on a worker) is cancelled and marked interrupted, exit 143 (it used to die by the
    signal with runs.csv all pending). Run 1 stays short: a Dask worker finishes a cancelled
    task, and the tests after this one share the cluster."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "sweep", str(SEED), "snapshots=2",
         "epochs=40,20000", "-o", str(tmp_path), "--progress", "none", "--scheduler", cluster],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not any(tmp_path.glob("*/0*/summary.json")):
            assert proc.poll() is None, proc.communicate()[1].decode()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err.decode()
    assert b"Traceback" not in err
    rows = table(only_dir(tmp_path))
    assert [r["status"] for r in rows] == ["completed", "interrupted"]
    assert rows[1]["exit_code"] == "143" and rows[1]["run_dir"] == ""


@pytest.mark.slow
def test_local_cluster_workers_leave_ctrl_c_to_the_sweep():
    # A terminal's Ctrl-C reaches the workers too; without the preload they die of it
    # (KeyboardInterrupt) while the sweep may still be fetching their results.
    client = sw.connect("local")
    try:
        pids = client.run(os.getpid)
        for pid in pids.values():
            os.kill(pid, signal.SIGINT)
        time.sleep(1.0)
        assert client.run(os.getpid) == pids
    finally:
        sw.disconnect(client)


def test_torch_checks_run_on_the_cluster_exit_2_and_write_nothing(cluster, tmp_path):
    # The client of a Dask sweep leaves the checks against torch to a worker: a typo in an
    # optimizer argument is still exit 2, named per run, before anything is written.
    out = tmp_path / "sweeps"
    result = runner.invoke(
        app,
        ["sweep", str(SEED), *SMALL, "optimizer.lrr=0.01,0.1", "--out", str(out),
         "--scheduler", cluster],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "optimizer.lrr=0.01): optimizer.lrr: SGD takes no argument 'lrr'" in result.output
    assert "run 1 (" in result.output
    assert "did you mean 'lr'?" in result.output
    assert not out.exists()


def test_the_client_of_a_dask_sweep_never_imports_torch(cluster, tmp_path):
    # A second of a core at start-up, which the workers importing torch need; and nothing a
    # worker sends back (summary.json's torch_version was a TorchVersion) may unpickle as torch.
    code = (
        "import sys\n"
        "from fitcli.cli import app\n"
        "try:\n"
        f"    app(['sweep', {str(SEED)!r}, *{SMALL!r}, 'optimizer.name=SGD,LBFGS', 'seed=0,1',\n"
        f"         '--out', {str(tmp_path / 'out')!r}, '--scheduler', {cluster!r},\n"
        "         '--progress', 'none'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules, file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "exit 0 False" in res.stderr, res.stderr[-3000:]
    assert len(table(only_dir(tmp_path / "out"))) == 4
