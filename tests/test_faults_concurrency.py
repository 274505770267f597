"""Fault suite 4: `fitcli train` processes started at once into the same --out.

Run directories are claimed with `os.mkdir` (which either creates or fails), so no two runs can
share one even when they start in the same second with the same name: N distinct, complete
run directories, each its own run's. CI starts 16 processes (each imports torch, which is most
of the time taken) and makes names collide on purpose in 64 threads; benchmarks/faults.py starts
64 processes, each with its own copy of plotly.js (CI takes it from the CDN, sparing copies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import yaml
from conftest import ROOT
from test_faults_signals import assert_files_parse

from fitcli.rundir import files as store

# benchmarks/faults.py sets this above 1: 64 processes, plotly.min.js copied into each directory.
SCALE = int(os.environ.get("FITCLI_FAULTS_SCALE", "1"))
RUNS = 16 if SCALE == 1 else 64
JS = ["--plotlyjs", "cdn"] if SCALE == 1 else []

TINY = {
    "name": "crowd",
    "seed": 0,
    "device": "cpu",
    "epochs": 5,
    "snapshots": 1,
    "data": {"target": "2*x + 1", "x": {"start": 0, "stop": 1, "num": 20}, "noise": {"std": 0.1}},
    "model": {"basis": ["1", "x"]},
    "optimizer": {"name": "SGD", "lr": 0.1},
}


def test_same_name_same_second_claims_never_share_a_directory(tmp_path, monkeypatch):
    """64 threads claim `crowd-<same second>-<4 hex>` at once, the hex drawn from only 80 values:
    names collide again and again, and every claim still ends in its own new directory."""
    import random

    draws = random.Random(0)
    monkeypatch.setattr(store.secrets, "token_hex", lambda n: f"{draws.randrange(80):04x}")
    out, got, ready = tmp_path / "runs", [], threading.Barrier(64)

    def claim() -> None:
        ready.wait()
        got.append(store.create_run_dir(out, "crowd", now=0.0))

    threads = [threading.Thread(target=claim) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(set(got)) == 64
    assert sorted(got) == sorted(out.iterdir())
    assert len({p.name.rsplit("-", 1)[0] for p in got}) == 1  # the same name and second


def test_runs_at_once_into_one_out_make_as_many_complete_run_directories(tmp_path):
    start = time.perf_counter()
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "runs"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fitcli.cli", "train", str(cfg), f"seed={k}"]
            + ["--out", str(out), "--progress", "none", "--json", *JS],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for k in range(RUNS)
    ]
    summaries = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        summaries.append(json.loads(stdout))
    dirs = sorted(p for p in out.iterdir())
    assert len(dirs) == RUNS and all(p.is_dir() for p in dirs)
    assert len({s["run_dir"] for s in summaries}) == RUNS
    # Each directory is complete and holds exactly its own run (seed k went to one place).
    seeds = set()
    for run in dirs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["epochs_run"] == 5
        assert summary["run_dir"] == str(run)
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == summary["seed"]
        assert {p.name for p in run.iterdir()} >= {
            "summary.json", "config.yaml", "data.csv", "metrics.csv",
            "snapshots", "state.json",
        }  # fmt: skip
        assert assert_files_parse(run) >= 10
        seeds.add(summary["seed"])
    assert seeds == set(range(RUNS))
    took = time.perf_counter() - start
    print(f"\n{RUNS} runs at once: {len(dirs)} distinct complete run directories in {took:.0f} s")
