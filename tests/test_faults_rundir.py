"""Fault suite: `--overwrite` and hostile run directories.

`--overwrite` acts on folders users own, and run directories get shared, so everything in one may
come from someone else. Replacing a folder is allowed only when fitcli's own summary marks it a run
directory and it holds nothing fitcli did not write; never the working folder or one above it.
Reading a run file accepts only a regular file inside the run directory, of bounded size: a FIFO
or /dev/zero fails at once with exit 2 naming the file, never hangs or fills memory. Processes that
could hang are run with a timeout, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import SMALL

from fitcli.cli import app
from fitcli.config import load_config
from fitcli.experiment import execute
from fitcli.prepare import prepare
from fitcli.rundir import files as store

DATA = {**SMALL["data"], "x": {"start": -10, "stop": 10, "num": 60}}
CONFIG = {**SMALL, "epochs": 12, "snapshots": 3, "data": DATA}
FITCLI = [sys.executable, "-m", "fitcli.cli"]
HANG = 60  # seconds: far more than any of these commands takes, far less than forever


def write_config(where: Path, **changes) -> Path:
    path = where / "c.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **changes}, sort_keys=False))
    return path


def train(runner, cfg: Path, *args: str):
    return runner.invoke(app, ["train", str(cfg), *map(str, args), "--progress", "none"])


def fitcli(*args, timeout: float = HANG, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FITCLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw
    )


def listing(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run stopped after 6 of 12 epochs (state saved at epoch 4): plottable and resumable."""
    where = tmp_path_factory.mktemp("stopped")
    run = where / "run"
    run.mkdir()
    prep = prepare(load_config(write_config(where)))
    summary = execute(prep, run, command=["test"], on_epoch=lambda epoch, loss: epoch >= 6)
    assert summary["status"] == "interrupted" and (run / "state.json").is_file()
    return run


@pytest.fixture()
def run(stopped: Path, tmp_path: Path) -> Path:
    """A private copy of the stopped run, free to damage."""
    dest = tmp_path / "run"
    shutil.copytree(stopped, dest)
    return dest


# -- --overwrite: data loss ----------------------------------------------------------------------


def test_overwrite_refuses_a_folder_with_a_config_yaml(runner, tmp_path):
    cfg = write_config(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    (results / "config.yaml").write_text("lr: 0.1\n")
    (results / "model.ckpt").write_text("w")
    before = listing(results)
    res = train(runner, cfg, "--run-dir", results, "--overwrite")
    assert res.exit_code == 2, res.output
    assert "not a fitcli run directory" in res.output and "model.ckpt" in res.output
    assert "config.yaml" in res.output  # what it would have deleted: everything in it
    assert listing(results) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_refuses_a_foreign_summary_json(runner, tmp_path):
    cfg = write_config(tmp_path)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "summary.json").write_text('{"status": "draft", "chapters": 5}\n')
    (thesis / "thesis.tex").write_text("precious")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "summary.json").write_text('{"status": "completed", "params": {}}\n')
    for folder in (thesis, alone):
        before = listing(folder)
        res = train(runner, cfg, "--run-dir", folder, "--overwrite")
        assert res.exit_code == 2, res.output
        assert "not a fitcli run directory" in res.output and "summary.json" in res.output
        assert listing(folder) == before


def test_overwrite_replaces_only_what_fitcli_wrote(runner, run, tmp_path):
    cfg = write_config(tmp_path, name="again")
    (run / "report.html").write_text("<p>a report fitcli plot wrote</p>")
    (run / "snapshots" / ".epoch-08.html.tmp-123-abcdef").write_text("a killed write")
    (run / "notes.txt").write_text("mine")
    (run / "snapshots" / "figure.png").write_bytes(b"\x89PNG")
    (run / "old").mkdir()
    before = listing(run)
    res = train(runner, cfg, "--run-dir", run, "--overwrite")
    assert res.exit_code == 2, res.output
    assert "notes.txt" in res.output and "snapshots/figure.png" in res.output
    assert "old/" in res.output
    assert "report.html" not in res.output and ".tmp-" not in res.output  # fitcli's own
    assert listing(run) == before
    # Without the user's files it is fitcli's run directory, and it is replaced.
    for extra in ("notes.txt", "snapshots/figure.png"):
        (run / extra).unlink()
    (run / "old").rmdir()
    res = train(runner, cfg, "--run-dir", run, "--overwrite")
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["name"] == "again" and summary["fitcli_run"] == store.RUN_SCHEMA
    assert not (run / "report.html").exists()


def test_run_directories_from_before_the_marker_are_still_recognised(runner, run, tmp_path):
    # Summaries written before `fitcli_run` existed carry fitcli's three version fields.
    cfg = write_config(tmp_path)
    path = run / "summary.json"
    doc = json.loads(path.read_text())
    del doc["fitcli_run"]
    path.write_text(json.dumps(doc))
    assert store.is_run_dir(run)
    res = runner.invoke(app, ["runs", str(run.parent), "--format", "json"])
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["path"] == str(run), res.output
    assert train(runner, cfg, "--run-dir", run, "--overwrite").exit_code == 0
    # Without them (and without the marker) it is someone else's summary.json.
    doc = json.loads(path.read_text())
    del doc["fitcli_run"], doc["fitcli_version"]
    path.write_text(json.dumps(doc))
    assert not store.is_run_dir(run)
    res = train(runner, cfg, "--run-dir", run, "--overwrite")
    assert res.exit_code == 2 and "not a fitcli run directory" in res.output, res.output
    assert json.loads(path.read_text()) == doc


def test_the_working_folder_and_its_ancestors_are_never_replaced(
    runner, run, tmp_path, monkeypatch
):
    cfg = write_config(tmp_path)
    before = listing(run)
    for cwd, target in (
        (run, run),  # --run-dir $PWD
        (run, Path(".")),
        (run / "snapshots", Path("..")),  # an ancestor of the working folder
    ):
        monkeypatch.chdir(cwd)
        res = train(runner, cfg, "--run-dir", target, "--overwrite")
        assert res.exit_code == 2, (target, res.output)
        assert "working folder" in res.output
        assert listing(run) == before
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(run))
    res = train(runner, cfg, "--run-dir", run, "--overwrite")
    assert res.exit_code == 2 and "home folder" in res.output, res.output
    assert listing(run) == before


def test_run_dir_pwd_in_a_real_process_keeps_the_folder(run, tmp_path):
    cfg = write_config(tmp_path)
    before = listing(run)
    inode = run.stat().st_ino
    res = fitcli("train", cfg, "--run-dir", run, "--overwrite", "--progress", "none", cwd=run)
    assert res.returncode == 2, res.stderr
    assert run.stat().st_ino == inode and listing(run) == before


def test_overwrite_through_a_symlink_replaces_what_it_points_to(runner, run, tmp_path):
    cfg = write_config(tmp_path, name="through-link")
    link = tmp_path / "latest"
    link.symlink_to(run)
    res = train(runner, cfg, "--run-dir", link, "--overwrite")
    assert res.exit_code == 0, res.output
    assert link.is_symlink() and os.readlink(link) == str(run)
    assert json.loads((run / "summary.json").read_text())["name"] == "through-link"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "latest", "run"]


def test_overwrite_through_a_symlink_to_a_user_folder_touches_nothing(runner, tmp_path):
    cfg = write_config(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("lr: 0.1\n")
    (mine / "model.ckpt").write_text("w")
    before = listing(mine)
    for link, to in ((tmp_path / "link", mine), (tmp_path / "dangling", tmp_path / "nowhere")):
        link.symlink_to(to)
        res = train(runner, cfg, "--run-dir", link, "--overwrite")
        assert res.exit_code == 2, res.output
        assert link.is_symlink() and os.readlink(link) == str(to)
    assert listing(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "dangling", "link", "mine"]


# -- hostile run-directory files -------------------------------------------------------------------


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("name", ["data.csv", "summary.json"])
def test_a_fifo_in_the_run_dir_fails_plot_and_resume_at_once(run, name):
    fifo(run / name)
    for args in (["plot", run], ["train", "--resume", run, "--progress", "none"]):
        t0 = time.perf_counter()
        res = fitcli(*args)  # blocked forever before (TimeoutExpired here)
        took = time.perf_counter() - t0
        assert res.returncode == 2, (args, res.stderr)
        assert f"{run / name}: not a regular file (a FIFO)" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        print(f"\n{args[0]} with a FIFO {name}: exit 2 in {took:.2f} s")


def limited_memory() -> None:
    # Before the fix /dev/zero was read until memory ran out: stop it at 2 GiB of address space.
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize("name", ["data.csv", "plotly.min.js"])
def test_a_link_to_dev_zero_is_refused(run, name):
    (run / name).unlink()
    (run / name).symlink_to("/dev/zero")
    res = fitcli("plot", run, preexec_fn=limited_memory)
    assert res.returncode == 2, res.stderr
    assert f"{run / name}: a link to /dev/zero, outside the run directory" in res.stderr
    assert "Traceback" not in res.stderr and not (run / "report.html").exists()


def test_a_device_or_oversized_file_is_refused_before_it_is_read(run, tmp_path):
    # A sparse file claims its size at no cost: past the bound for its kind, it is not read.
    with open(run / "metrics.csv", "r+b") as fh:
        fh.truncate(64 << 30)
    with pytest.raises(store.RunFileError, match=r"metrics\.csv: larger than the .* bytes"):
        store.read_run_file(run, "metrics.csv")
    res = fitcli("plot", run)
    assert res.returncode == 2 and "metrics.csv: larger than" in res.stderr, res.stderr
    with pytest.raises(store.RunFileError, match="not a regular file"):
        store.read_run_file(Path("/dev"), "null")
    (run / "config.yaml").unlink()
    (run / "config.yaml").symlink_to(run / "summary.json")  # a link inside the run: followed
    assert store.read_run_file(run, "config.yaml") == (run / "summary.json").read_bytes()


def test_a_hostile_snapshot_list_cannot_blow_up_the_report(run):
    # One fitted curve reused by thousands of snapshot entries (each epoch-N must be its own).
    path = run / "snapshots" / "params.json"
    doc = json.loads(path.read_text())
    last = doc["snapshots"][-1]
    doc["snapshots"] = [
        {**last, "epoch": k, "file": last["file"], "fit": last["fit"]} for k in range(2600)
    ]
    path.write_text(json.dumps(doc))
    assert path.stat().st_size > 400_000
    t0 = time.perf_counter()
    res = fitcli("plot", run)
    took = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr
    assert "snapshot #0" in res.stderr and "not the page of epoch 0" in res.stderr
    assert not (run / "report.html").exists()
    print(f"\nplot of a {path.stat().st_size} byte hostile params.json: exit 2 in {took:.2f} s")


def test_snapshot_epochs_and_curves_are_bounded(run):
    path = run / "snapshots" / "params.json"
    good = path.read_text()
    doc = json.loads(good)
    late = {"epoch": 13, "file": "epoch-13.html", "fit": "epoch-13.csv"}
    doc["snapshots"].append({**doc["snapshots"][-1], **late})
    path.write_text(json.dumps(doc))
    shutil.copy(run / "snapshots" / "epoch-04.csv", run / "snapshots" / "epoch-13.csv")
    res = fitcli("plot", run)
    assert res.returncode == 2 and "past the run's 12 epochs" in res.stderr, res.stderr
    path.write_text(good)
    curve = run / "snapshots" / "epoch-04.csv"
    rows = curve.read_text().splitlines()
    curve.write_text("\n".join([*rows, *rows[1:]]) + "\n")  # 2000 points: more than fitcli draws
    res = fitcli("plot", run)
    assert res.returncode == 2 and "2000 points, more than the 1000" in res.stderr, res.stderr


# -- a port that is not a Dask scheduler -----------------------------------------------------------


class FakeServer:
    """A plain TCP server: on each connection it sends `greeting` (or nothing) and keeps quiet."""

    def __init__(self, greeting: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.greeting, self.conns = greeting, []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.greeting:
                conn.sendall(self.greeting)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


GARBAGE = b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"\xff" * 64


@pytest.mark.parametrize("greeting", [GARBAGE, b""], ids=["garbage", "silent"])
def test_a_port_that_is_not_a_dask_scheduler_times_out_cleanly(greeting, monkeypatch):
    pytest.importorskip("dask.distributed")
    from fitcli import sweep as sw
    from fitcli.sweep import cluster as sweep_cluster

    monkeypatch.setattr(sweep_cluster, "CONNECT_TIMEOUT_S", 2.0, raising=False)
    server = FakeServer(greeting)
    outcome: list = []

    def connect() -> None:
        try:
            outcome.append(sw.connect(f"tcp://127.0.0.1:{server.port}"))
        except BaseException as exc:  # what the command line would report
            outcome.append(exc)

    t0 = time.perf_counter()
    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(HANG)  # it hung forever (silent) before the fix
    server.close()
    assert outcome, "sw.connect hung"
    took = time.perf_counter() - t0
    exc = outcome[0]
    assert isinstance(exc, sw.SweepError), repr(exc)
    assert exc.exit_code == 2 and "is not a Dask scheduler" in str(exc)
    assert took < 20
    print(f"\nnot a scheduler ({'garbage' if greeting else 'silent'}): exit 2 in {took:.2f} s")


def test_sweep_at_a_garbage_port_exits_2_and_makes_nothing(tmp_path):
    pytest.importorskip("dask.distributed")
    server = FakeServer(GARBAGE)
    try:
        cfg = write_config(tmp_path)
        out = tmp_path / "out"
        address = f"tcp://127.0.0.1:{server.port}"
        res = fitcli("sweep", cfg, "seed=0,1", "--out", out, "--scheduler", address)
    finally:
        server.close()
    assert res.returncode == 2, res.stderr
    assert f"tcp://127.0.0.1:{server.port} is not a Dask scheduler" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "EiB" not in res.stderr and not out.exists()
