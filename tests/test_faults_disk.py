"""Fault suite 5: the output path is a file or not writable, and the disk fills up.

Every file of a run goes through `store.atomic_write`, which opens a temporary file with `open`.
The disk is "filled" at one write site at a time by making that one `open` return a file whose
write fails with ENOSPC after part of the data (tests run as root, so permissions are simulated
the same way, with EACCES). Each time: exit 1, a message naming the file, no traceback, no
temporary file left, the run marked failed when its summary can still be written, and a run that
had saved its state resumes to exactly the uninterrupted result.
"""

from __future__ import annotations

import builtins
import csv
import errno
import json
import os
import pathlib
from pathlib import Path

import pytest
import yaml
from conftest import SMALL

from fitcli.cli import app
from fitcli.rundir import files as store

CONFIG = {**SMALL, "epochs": 12, "snapshots": 3, "batch_size": 64}


def write_config(tmp: Path) -> Path:
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def train(runner, cfg: Path, *args: str):
    return runner.invoke(app, ["train", str(cfg), *args, "--progress", "none"])


class FullDisk:
    """`open` for store: the `fail_at`-th file opened for writing fills the disk midway."""

    def __init__(self, fail_at: int, code: int = errno.ENOSPC) -> None:
        self.fail_at, self.code, self.calls, self.failed = fail_at, code, 0, None

    def __call__(self, path, mode="r", *args, **kwargs):
        fh = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (returned open)
        if "w" not in mode:
            return fh
        self.calls += 1
        if self.calls != self.fail_at:
            return fh
        self.failed = Path(path)
        code = self.code

        class Filling:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                fh.close()

            def write(self, data):
                fh.write(data[: len(data) // 2])  # part of it lands, then the disk is full
                raise OSError(code, os.strerror(code))

        return Filling()


def final_name(tmp_name: str) -> str:
    # ".summary.json.tmp-123-abcdef" -> "summary.json"
    return tmp_name[1:].rsplit(".tmp-", 1)[0]


def metrics_rows(run: Path) -> list[list[str]]:
    return [r[:3] + r[4:] for r in csv.reader((run / "metrics.csv").open())]


def test_disk_full_at_every_write_site(runner, tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    reference = tmp_path / "reference"
    counter = FullDisk(fail_at=0)
    with monkeypatch.context() as m:
        m.setattr(store, "open", counter, raising=False)
        assert train(runner, cfg, "--run-dir", str(reference)).exit_code == 0
    sites = counter.calls
    assert sites >= 20  # config, data, plotly.js, summary x2, 4 snapshots x 4 files, metrics
    want = json.loads((reference / "summary.json").read_text())
    seen, resumed = set(), 0
    for k in range(1, sites + 1):
        run = tmp_path / f"full{k}"
        disk = FullDisk(fail_at=k)
        with monkeypatch.context() as m:
            m.setattr(store, "open", disk, raising=False)
            result = train(runner, cfg, "--run-dir", str(run))
        name = final_name(disk.failed.name)
        target = disk.failed.with_name(name)
        seen.add(name.split("-")[0] if name.startswith("epoch-") else name)
        assert result.exit_code == 1, (k, name, result.output)
        assert f"cannot write {target}: No space left on device" in result.output, result.output
        assert "Traceback" not in result.output
        assert not [p for p in run.rglob("*") if ".tmp-" in p.name], k  # cleaned up
        summary = json.loads((run / "summary.json").read_text())  # the retry got through
        assert summary["status"] == "failed", (k, name)
        assert summary["exit_code"] == 1 and str(target) in summary["reason"]
        if (run / "state.json").exists():  # nothing is lost: resume finishes the run exactly
            again = runner.invoke(app, ["train", "--resume", str(run), "--progress", "none"])
            assert again.exit_code == 0, again.output
            got = json.loads((run / "summary.json").read_text())
            assert got["params"] == want["params"]
            assert metrics_rows(run) == metrics_rows(reference)
            resumed += 1
    assert seen >= {"config.yaml", "data.csv", "plotly.min.js", "summary.json", "epoch"}
    assert seen >= {"params.json", "state.json", "metrics.csv"}
    assert resumed >= sites - 8
    print(f"\ndisk full at {sites} write sites, {resumed} resumed exactly")


def test_output_folder_is_a_file(runner, tmp_path):
    cfg = write_config(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    for args, named in (
        (["--out", str(blocker)], blocker),
        (["--out", str(blocker / "sub")], blocker / "sub"),
        (["--run-dir", str(blocker / "run")], blocker / "run"),
    ):
        result = train(runner, cfg, *args)
        assert result.exit_code == 1, result.output
        assert str(named) in result.output and "Traceback" not in result.output
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("where", ["out", "run-dir"])
def test_output_folder_not_writable(runner, tmp_path, monkeypatch, where):
    cfg = write_config(tmp_path)
    out = tmp_path / "readonly"
    real_mkdir = pathlib.Path.mkdir

    def denied(self, *args, **kwargs):
        if str(self).startswith(str(out)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", denied)
    args = ["--out", str(out)] if where == "out" else ["--run-dir", str(out / "run")]
    result = train(runner, cfg, *args)
    assert result.exit_code == 1, result.output
    assert "Permission denied" in result.output and str(out) in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_files_not_writable(runner, tmp_path, monkeypatch):
    """The directory can be made but nothing written in it (a read-only mount after mkdir)."""
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    monkeypatch.setattr(store, "open", FullDisk(fail_at=1, code=errno.EACCES), raising=False)
    result = train(runner, cfg, "--run-dir", str(run))
    assert result.exit_code == 1, result.output
    assert f"cannot write {run / 'config.yaml'}: Permission denied" in result.output
    assert "Traceback" not in result.output
    summary = json.loads((run / "summary.json").read_text())  # the next write was allowed
    assert summary["status"] == "failed"
