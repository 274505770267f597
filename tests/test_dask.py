"""fitcli sweep on a real Dask cluster: a `dask scheduler` and two `dask worker` processes on
127.0.0.1, started here and torn down after; the run directories must match a local sweep's."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import ROOT, SEED, SMALL, assert_same_sweep
from typer.testing import CliRunner

from fitcli.cli import app

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


def test_sweep_on_a_dask_cluster_matches_a_local_sweep(cluster, tmp_path):
    # SGD runs batch on the workers, LBFGS runs one by one; the client writes every directory.
    args = ["sweep", str(SEED), *SMALL, "optimizer.name=SGD,LBFGS", "seed=0,1,2"]
    remote = runner.invoke(
        app, [*args, "-o", str(tmp_path / "remote"), "--scheduler", cluster, "--progress", "none"]
    )
    assert remote.exit_code == 0, remote.output
    local = runner.invoke(app, [*args, "-o", str(tmp_path / "local"), "--progress", "none"])
    assert local.exit_code == 0, local.output
    assert_same_sweep(only_dir(tmp_path / "remote"), only_dir(tmp_path / "local"))


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
