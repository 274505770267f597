"""Shared by the sweep, runs and Dask tests: compare run directories the way a user would."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "configs" / "seed.yaml"
# Quick variants of the seed config for tests.
SMALL = ["epochs=40", "snapshots=2", "data.x.num=100"]
VOLATILE = ("run_dir", "elapsed_s", "started_at", "finished_at", "command")


def files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def normalised(d: Path, rel: str) -> bytes | object:
    """A file's content without what legitimately differs between two runs: timings, paths and
    the command line."""
    data = (d / rel).read_bytes()
    if rel == "summary.json":
        doc = json.loads(data)
        for k in VOLATILE:
            doc.pop(k, None)
        return doc
    if rel == "config.yaml":
        return b"\n".join(ln for ln in data.split(b"\n") if not ln.startswith(b"# command:"))
    if rel == "metrics.csv":
        return b"\n".join(
            b",".join(c for i, c in enumerate(ln.split(b",")) if i != 3) for ln in data.split(b"\n")
        )
    if rel == "state.json":
        doc = json.loads(data)
        doc["history"].pop("elapsed")
        return doc
    return data


def assert_same_run(a: Path, b: Path) -> None:
    assert files(a) == files(b)
    for rel in files(a):
        assert normalised(a, rel) == normalised(b, rel), f"{rel} differs: {a} vs {b}"


def assert_same_sweep(a: Path, b: Path) -> None:
    """Two sweep directories hold the same runs with the same contents."""
    runs_a = sorted(p.name for p in a.iterdir() if p.is_dir())
    runs_b = sorted(p.name for p in b.iterdir() if p.is_dir())
    assert runs_a == runs_b and runs_a
    for name in runs_a:
        assert_same_run(a / name, b / name)
