"""Fault suite 3: SIGINT and SIGKILL at random moments of real `fitcli train` processes.

SIGINT: exit 130 every time, summary.json says interrupted, and `fitcli plot` reads the run
directory. SIGKILL: every file under its final name parses (writes are atomic), and
`fitcli train --resume` ends exactly where the same run uninterrupted ends. The moments are drawn
from a seeded generator, measured from the moment the run directory appears (plus a few during
start-up); the run writes a snapshot every 20 epochs, so many land while one is being written.
`benchmarks/faults.py` runs many more.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from fitcli.cli import app

# benchmarks/faults.py sets this above 1 for more random moments.
SCALE = int(os.environ.get("FITCLI_FAULTS_SCALE", "1"))

SIGNAL_CONFIG = {
    "name": "signals",
    "seed": 0,
    "device": "cpu",
    "epochs": 1000,
    "snapshots": 50,
    "batch_size": 16,
    "data": {
        "target": "1.5*sin(x) + 0.5*x",
        "x": {"start": -5, "stop": 5, "num": 64},
        "noise": {"std": 0.3},
    },
    "model": {"basis": ["x", "sin(x)", "cos(x)"]},
    "optimizer": {"name": "Adam", "lr": 0.01},
    "scheduler": {"name": "StepLR", "step_size": 300, "gamma": 0.5},
}


def write_config(tmp: Path, **changes) -> Path:
    path = tmp / "signals.yaml"
    path.write_text(yaml.safe_dump({**SIGNAL_CONFIG, **changes}, sort_keys=False))
    return path


def start(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "train", str(cfg), "--out", str(out)]
        + ["--progress", "none", "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def wait_for_run_dir(out: Path, proc: subprocess.Popen, timeout: float = 60) -> Path | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        dirs = [p for p in out.iterdir() if p.is_dir()] if out.is_dir() else []
        if dirs:
            return dirs[0]
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    raise AssertionError("no run directory appeared")


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def handle_endtag(self, tag: str) -> None:
        self.closed |= tag == "html"


def assert_files_parse(run: Path) -> int:
    """Every file under its final name parses; temporary files (".name.tmp-...") are ignored.
    Returns how many files were checked."""
    import plotly

    js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    checked = 0
    for path in sorted(run.rglob("*")):
        if path.is_dir() or (path.name.startswith(".") and ".tmp-" in path.name):
            continue
        text = path.read_bytes().decode("utf-8")
        if path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".csv":
            rows = list(csv.reader(text.splitlines()))
            assert len(rows) >= 2, path
            for row in rows[1:]:
                assert len(row) == len(rows[0]), path
                [float(cell) for cell in row]
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(text), dict), path
        elif path.suffix == ".html":
            page = _Page()
            page.feed(text)
            assert page.closed, f"{path} is cut short"
        elif path.name == "plotly.min.js":
            assert path.stat().st_size == js.stat().st_size, path
        else:
            raise AssertionError(f"unexpected file {path}")
        checked += 1
    return checked


def plot_reads(runner, run: Path) -> None:
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, (run, result.output)


def test_sigint_at_random_moments_exits_130_and_leaves_a_readable_run(runner, tmp_path):
    cfg = write_config(tmp_path, epochs=10**6, snapshots=1000)  # runs until interrupted
    rng = random.Random(3)
    # (seconds after the run directory appears, or None: during start-up; SIGINTs to send)
    moments = [(rng.uniform(0, 1.5), 1) for _ in range(6 * SCALE)]
    moments += [(rng.uniform(0, 1.0), 2) for _ in range(2 * SCALE)]
    moments += [(None, 1)] * (2 * SCALE)
    outcomes = []
    for k, (delay, count) in enumerate(moments):
        out = tmp_path / f"int{k}"
        proc = start(cfg, out)
        if delay is None:
            time.sleep(rng.uniform(0.05, 0.6))
        else:
            wait_for_run_dir(out, proc)
            time.sleep(delay)
        for _ in range(count):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.02)
        stdout, stderr = proc.communicate(timeout=120)
        runs = [p for p in out.iterdir()] if out.exists() else []
        if delay is None and not runs:
            # Before fitcli made a run directory. An interrupt during the interpreter's own
            # start-up kills Python by the signal, which the shell reports as 130 too.
            assert proc.returncode in (130, -signal.SIGINT), stderr
            outcomes.append("before the run")
            continue
        assert proc.returncode == 130, (k, delay, stderr)
        assert "Traceback" not in stderr, stderr
        (run,) = runs
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["exit_code"] == 130
        if count == 1:
            assert json.loads(stdout) == summary  # --json still prints it
        assert_files_parse(run)
        plot_reads(runner, run)
        outcomes.append(f"interrupted at epoch {summary['epochs_run']}")
    assert sum(o.startswith("interrupted") for o in outcomes) >= 8 * SCALE, outcomes
    print(f"\nSIGINT: {len(outcomes)} processes, all exit 130:", outcomes)


def test_sigkill_at_random_moments_leaves_parseable_files_and_resumes_exactly(runner, tmp_path):
    cfg = write_config(tmp_path)
    reference = tmp_path / "reference"
    result = runner.invoke(
        app, ["train", str(cfg), "--run-dir", str(reference), "--progress", "none"]
    )
    assert result.exit_code == 0, result.output
    want = json.loads((reference / "summary.json").read_text())
    want_rows = [r[:3] + r[4:] for r in csv.reader((reference / "metrics.csv").open())]
    rng = random.Random(9)
    resumed = 0
    for k in range(5 * SCALE):
        out = tmp_path / f"kill{k}"
        proc = start(cfg, out)
        run = wait_for_run_dir(out, proc)
        time.sleep(rng.uniform(0, 1.2))
        proc.kill()
        proc.communicate(timeout=60)
        if proc.returncode == 0:
            continue  # it finished first: nothing to test
        assert proc.returncode == -signal.SIGKILL
        assert_files_parse(run)
        summary = run / "summary.json"
        finished = summary.exists() and json.loads(summary.read_text())["status"] == "completed"
        result = runner.invoke(app, ["train", "--resume", str(run), "--progress", "none"])
        if not (run / "state.json").exists():
            assert result.exit_code == 2, result.output
            continue
        if finished:
            # Killed after its final summary was written, before the process exited: the run
            # is complete, and resuming it is refused.
            assert result.exit_code == 2 and "has already completed" in result.output
            continue
        assert result.exit_code == 0, result.output
        got = json.loads((run / "summary.json").read_text())
        assert got["params"] == want["params"] and got["final_loss"] == want["final_loss"]
        rows = [r[:3] + r[4:] for r in csv.reader((run / "metrics.csv").open())]
        assert rows == want_rows  # every epoch's loss, lr and parameters, elapsed time aside
        assert_files_parse(run)
        plot_reads(runner, run)
        resumed += 1
    assert resumed >= 3 * SCALE, resumed
    print(f"\nSIGKILL: {5 * SCALE} processes, {resumed} resumed to the exact result")


def test_sigint_right_after_the_run_directory_is_made_still_leaves_a_run(
    runner, tmp_path, monkeypatch
):
    """The narrowest window: Ctrl-C just after `mkdir`. The run stops after one epoch with a
    full, readable directory (it used to leave an empty one: the handler came after mkdir)."""
    import os

    from fitcli.rundir import files as store

    real = store.create_run_dir

    def mkdir_then_sigint(*args, **kwargs):
        path = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return path

    monkeypatch.setattr(store, "create_run_dir", mkdir_then_sigint)
    out = tmp_path / "runs"
    cfg = write_config(tmp_path)
    result = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--progress", "none"])
    assert result.exit_code == 130, result.output
    (run,) = out.iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert_files_parse(run)
    plot_reads(runner, run)


def test_second_sigint_while_the_run_directory_is_being_filled(runner, tmp_path, monkeypatch):
    """A second Ctrl-C raises at once, here while plotly.min.js is copied: the summary still
    says interrupted and the directory reads (the start of a run used to be outside the
    handler that marks it, leaving config.yaml and data.csv without a summary)."""
    from fitcli.rundir import files as store

    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "copy_plotly_js", interrupted)
    out = tmp_path / "runs"
    cfg = write_config(tmp_path)
    result = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--progress", "none"])
    assert result.exit_code == 130, result.output
    (run,) = out.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 130
    monkeypatch.undo()  # plot copies plotly.js too
    plot_reads(runner, run)


def test_second_sigint_while_the_summary_is_being_finished(runner, tmp_path, monkeypatch):
    """Found by the random SIGINT test: a second Ctrl-C during the final summary write left
    summary.json saying "running" (finishing was outside the handler that marks the run)."""
    from fitcli.rundir import files as store

    real = store.write_json

    def write(path, obj):
        if path.name == "summary.json" and obj.get("status") == "completed":
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(store, "write_json", write)
    out = tmp_path / "runs"
    result = runner.invoke(
        app, ["train", str(write_config(tmp_path, epochs=20)), "--out", str(out)]
    )
    assert result.exit_code == 130, result.output
    (run,) = out.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_run"] == 20


# -- SIGTERM and SIGHUP: what batch schedulers, `timeout` and a closed terminal send ------------


def wait_for_training(out: Path, proc: subprocess.Popen, timeout: float = 60) -> Path:
    """The run directory once training has begun (its first state.json is written)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        run = wait_for_run_dir(out, proc, timeout)
        assert run is not None, proc.communicate()[1]
        if (run / "state.json").exists():
            return run
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.01)
    raise AssertionError("training did not start")


STOPS = [(signal.SIGTERM, 143), (signal.SIGHUP, 129)]


@pytest.mark.parametrize(("sig", "code"), STOPS, ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_run_as_ctrl_c_does(runner, tmp_path, sig, code):
    """A scheduler's SIGTERM (a closed terminal's SIGHUP) ends the run after the current epoch
    with a final snapshot, its state and an `interrupted` summary naming the signal; exit
    128 + the signal's number (the run used to die with summary.json saying "running")."""
    out = tmp_path / "runs"
    proc = start(write_config(tmp_path, epochs=10**6, snapshots=1000), out)
    run = wait_for_training(out, proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    name = signal.Signals(sig).name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == code
    assert summary["signal"] == name
    assert summary["reason"] == f"interrupted by {name} after epoch {summary['epochs_run']}"
    assert summary["epochs_run"] > 0 and "process" not in summary
    assert json.loads(stdout) == summary
    snaps = json.loads((run / "snapshots" / "params.json").read_text())["snapshots"]
    assert snaps[-1]["epoch"] == summary["epochs_run"]  # the final snapshot
    assert json.loads((run / "state.json").read_text())["epoch"] == summary["epochs_run"]
    assert_files_parse(run)
    plot_reads(runner, run)


SECONDS = [(signal.SIGINT, 0.02), (signal.SIGTERM, 0.2), (signal.SIGHUP, 0.4)]


@pytest.mark.slow
@pytest.mark.parametrize(("second", "gap"), SECONDS, ids=lambda v: str(v))
def test_a_second_signal_exits_at_once_and_the_summary_is_not_left_running(tmp_path, second, gap):
    """SIGTERM, then another stop signal `gap` seconds later: while the run finishes, or while
    the process exits (where it once killed it by the signal, or printed a traceback)."""
    out = tmp_path / "runs"
    proc = start(write_config(tmp_path, epochs=10**6, snapshots=1000), out)
    run = wait_for_training(out, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap)  # both pending at once, Python would handle the lower-numbered first
    if proc.poll() is None:
        proc.send_signal(second)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr  # the signal that stopped the run decides
    assert "Traceback" not in stderr, stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 143
    assert summary["signal"] == "SIGTERM"


def test_a_second_signal_while_the_run_is_finishing_stops_it_there(runner, tmp_path, monkeypatch):
    """Deterministically: SIGTERM as the run starts, then SIGINT while the final statistics are
    computed: the run ends there, at once, exit 143, the summary interrupted by SIGTERM."""
    from fitcli import experiment
    from fitcli.rundir import files as store

    real_create, real_stats = store.create_run_dir, experiment.finish_stats
    calls = []

    def create_then_sigterm(*args, **kwargs):
        path = real_create(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return path

    def second_signal(*args, **kwargs):
        calls.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        return real_stats(*args, **kwargs)

    monkeypatch.setattr(store, "create_run_dir", create_then_sigterm)
    monkeypatch.setattr(experiment, "finish_stats", second_signal)
    out = tmp_path / "runs"
    result = runner.invoke(
        app, ["train", str(write_config(tmp_path)), "--out", str(out), "--progress", "none"]
    )
    assert result.exit_code == 143, result.output
    assert "interrupted by SIGTERM" in result.output
    (run,) = out.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert calls and "uncertainty" not in summary  # stopped in finish_stats, at once
    assert summary["status"] == "interrupted" and summary["exit_code"] == 143
    assert summary["signal"] == "SIGTERM" and summary["reason"] == "interrupted by SIGTERM at once"
    assert_files_parse(run)


def test_sigkill_leaves_a_stale_run_that_runs_and_plot_show_and_resume_finishes(runner, tmp_path):
    """A process gone without a word (SIGKILL, power loss) leaves summary.json saying running:
    `fitcli runs` and `fitcli plot` show it as stale, and --resume takes it over."""
    out = tmp_path / "runs"
    proc = start(write_config(tmp_path, epochs=3000), out)
    run = wait_for_training(out, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "running" and summary["process"]["pid"] == proc.pid
    listed = runner.invoke(app, ["runs", str(out), "--format", "json"])
    assert listed.exit_code == 0, listed.output
    assert [r["status"] for r in json.loads(listed.stdout)] == ["stale"]
    plot_reads(runner, run)
    assert 'class="status stale">stale<' in (run / "report.html").read_text()
    result = runner.invoke(app, ["train", "--resume", str(run), "--progress", "none"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_resume_of_a_run_whose_process_is_alive_is_refused(runner, tmp_path):
    out = tmp_path / "runs"
    proc = start(write_config(tmp_path, epochs=10**6, snapshots=1000), out)
    try:
        run = wait_for_training(out, proc)
        listed = runner.invoke(app, ["runs", str(out), "--format", "json"])
        assert [r["status"] for r in json.loads(listed.stdout)] == ["running"]
        result = runner.invoke(app, ["train", "--resume", str(run), "--progress", "none"])
        assert result.exit_code == 2, result.output
        assert f"process {proc.pid}" in result.stderr and "still running" in result.stderr
        assert "Traceback" not in result.output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


# -- sweeps stopped by SIGTERM ------------------------------------------------------------------


def start_sweep(out: Path, *extra: str, group: bool = False) -> subprocess.Popen:
    seed = ROOT / "configs" / "seed.yaml"
    return subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "sweep", str(seed), "snapshots=2",
         "epochs=40,1000000", "-o", str(out), "--progress", "none", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=group,
    )  # fmt: skip


def sweep_rows(out: Path) -> tuple[Path, list[dict]]:
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    with (d / "runs.csv").open() as f:
        return d, list(csv.DictReader(f))


def wait_for_first_run(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(out.glob("*/0*/summary.json")):
            return
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    raise AssertionError("the sweep's first run did not finish")


SWEEP_STOPS = [(0, signal.SIGTERM, 143), (2, signal.SIGTERM, 143), (2, signal.SIGINT, 130)]


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "sig", "code"), SWEEP_STOPS, ids=["here", "workers", "ctrl-c"])
def test_a_stop_signal_ends_a_sweep_keeps_finished_runs_marks_in_flight_interrupted(
    tmp_path, workers, sig, code
):
    """Run 0 (40 epochs) finishes, run 1 (a million) is in flight when SIGTERM comes: the sweep
    stops promptly, keeps run 0, writes run 1 as interrupted by SIGTERM and exits 143. With
    worker processes the signal goes to the whole process group, as systemd and SLURM send it
    and a terminal sends Ctrl-C (which used to wait for the runs in flight, then discard them)."""
    out = tmp_path / "sweeps"
    proc = start_sweep(out, "--workers", str(workers), group=workers > 0)
    try:
        wait_for_first_run(out, proc)
        time.sleep(0.5)
        sent = time.monotonic()
        if workers:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    d, rows = sweep_rows(out)
    assert [r["status"] for r in rows] == ["completed", "interrupted"]
    summary = json.loads((d / rows[1]["run_dir"] / "summary.json").read_text())
    assert summary["signal"] == signal.Signals(sig).name and summary["exit_code"] == code
    assert summary["epochs_run"] > 0
    assert took < 30, took
    name = signal.Signals(sig).name
    print(f"\n{name} to a sweep ({workers} workers): exit {code} after {took:.1f} s")


def spawned_workers(pid: int) -> list[int]:
    """The multiprocessing workers (spawned) among the children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_a_dead_worker_fails_its_runs_and_the_sweep_goes_on(tmp_path):
    """`--workers 2`, two million-epoch runs first: one worker is SIGKILLed, its run fails with
    the reason, a new worker computes the two short runs; SIGTERM then interrupts the other
    long run (a dead worker used to end the sweep with BrokenProcessPool, every run pending)."""
    seed = ROOT / "configs" / "seed.yaml"
    out = tmp_path / "sweeps"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "sweep", str(seed), "snapshots=2",
         "epochs=1000000,300", "seed=0,1", "-o", str(out), "--progress", "none",
         "--workers", "2", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 120
        while len(spawned_workers(proc.pid)) < 2 and time.monotonic() < end:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        victim = spawned_workers(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        while len(list(out.glob("*/*/summary.json"))) < 2 and time.monotonic() < end:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    _, rows = sweep_rows(out)
    statuses = [r["status"] for r in rows]
    assert sorted(statuses[:2]) == ["failed", "interrupted"] and statuses[2:] == ["completed"] * 2
    failed = [r for r in json.loads(stdout)["runs"] if r["status"] == "failed"]
    assert failed[0]["reason"] == "its worker process was killed by SIGKILL", failed
    assert "its worker process was killed by SIGKILL" in stderr


@pytest.mark.slow
def test_sigterm_to_the_process_group_while_forked_writers_write_a_batch(tmp_path):
    """systemd and SLURM signal every process of the job: the writers a batched sweep forks
    leave SIGTERM to the sweep and finish their runs (a writer used to die of it, its run never
    came back and the sweep waited for it forever). Every run of the batch completed is kept."""
    seed = ROOT / "configs" / "seed.yaml"
    out = tmp_path / "sweeps"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "sweep", str(seed), "snapshots=2", "epochs=50",
         "seed=range(0,24)", "-o", str(out), "--progress", "none"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, env={**os.environ, "FITCLI_SWEEP_WRITERS": "2"},
    )  # fmt: skip
    try:
        end = time.monotonic() + 120
        while len(list(out.glob("*/*/summary.json"))) < 3 and time.monotonic() < end:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, stderr
    _, rows = sweep_rows(out)
    assert [r["status"] for r in rows] == ["completed"] * 24


def test_a_stop_signal_while_a_sweep_is_planned_ends_it_at_once_writing_nothing(tmp_path):
    """Planning a large grid validates every run (seconds); nothing is written yet, so SIGTERM
    then ends the command at once with 143 (it used to die by the signal, -15)."""
    out = tmp_path / "sweeps"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitcli.cli", "sweep", str(ROOT / "configs" / "seed.yaml"),
         "seed=range(0,100000)", "--out", str(out), "--progress", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(2.5)  # past the imports, inside the plan's validation (tens of seconds)
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    assert took < 5, took
    assert not out.exists()
