"""The observations a run directory holds: data.csv up to `files.DATA_CSV_MAX_ROWS` rows; above,
data.npz, or for a data file a reference to it (path, size, digest) unless --copy-data. Every
reader (`fitcli plot`, --resume, `rundir.reader.read_data`) reads every form. The threshold is
lowered to 30 rows here so that the runs stay tiny."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SMALL
from typer.testing import CliRunner

from fitcli.cli import app
from fitcli.config import load_config
from fitcli.experiment import execute
from fitcli.prepare import prepare
from fitcli.rundir import files, reader

N = 60  # rows: above the lowered threshold
runner = CliRunner()


@pytest.fixture
def threshold(monkeypatch):
    monkeypatch.setattr(files, "DATA_CSV_MAX_ROWS", 30)


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def write_cfg(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(SMALL))
    cfg.update(epochs=10, snapshots=2, **changes)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def data_file(tmp_path: Path, sigma: bool = True) -> Path:
    """A data file of N rows with a sigma column, as a user writes it."""
    path = tmp_path / "points.csv"
    rows = "".join(
        f"{i * 0.25},{1.5 * np.sin(i * 0.25) + 0.01 * (i % 7)},{1 + i % 3}\n" for i in range(N)
    )
    path.write_text("x,y,s\n" + rows)
    return path


def file_cfg(tmp_path: Path) -> Path:
    return write_cfg(tmp_path, data={"file": str(data_file(tmp_path)), "columns": {"sigma": "s"}})


def stored(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("data"))


def pages(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "snapshots").glob("*.html"))}


def test_small_runs_keep_data_csv(tmp_path):
    run = tmp_path / "run"
    result = cli("train", file_cfg(tmp_path), "--run-dir", run, "--progress", "none")
    assert result.exit_code == 0, result.output
    assert stored(run) == ["data.csv"]
    assert "data_file" not in json.loads((run / "summary.json").read_text())
    got = np.loadtxt(run / "data.csv", delimiter=",", skiprows=1)
    assert np.array_equal(got, np.loadtxt(tmp_path / "points.csv", delimiter=",", skiprows=1))


def test_large_synthetic_data_are_stored_as_npz(tmp_path, threshold):
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path, data={**SMALL["data"], "x": {"start": -10, "stop": 10, "num": N}})
    result = cli("train", cfg, "--run-dir", run, "--progress", "none")
    assert result.exit_code == 0, result.output
    assert stored(run) == ["data.npz"]
    x = np.linspace(-10, 10, N)
    with np.load(run / "data.npz", allow_pickle=False) as z:
        assert z.files == ["x", "y", "y_true"]
        assert np.array_equal(z["x"], x)
        # the target evaluated by numpy: equal to rounding (torch evaluated it)
        assert np.allclose(z["y_true"], 1.5 * np.sin(x) + 1.2 * np.cos(x / 4), rtol=0, atol=1e-14)
        assert np.std(z["y"] - z["y_true"]) == pytest.approx(0.5, rel=0.3)  # the noise
        saved = {k: z[k] for k in z.files}
    summary = json.loads((run / "summary.json").read_text())
    data = reader.read_data(run, summary)
    assert list(data) == ["x", "y", "y_true"]
    assert all(np.array_equal(data[k], saved[k]) for k in saved)
    before = pages(run)
    result = cli("plot", run)
    assert result.exit_code == 0, result.output
    assert pages(run) == before  # rebuilt from data.npz, byte for byte


def test_large_data_file_is_recorded_not_copied(tmp_path, threshold):
    run = tmp_path / "run"
    result = cli("train", file_cfg(tmp_path), "--run-dir", run, "--progress", "none")
    assert result.exit_code == 0, result.output
    assert stored(run) == []
    src = tmp_path / "points.csv"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_file"] == {"path": str(src), "size": src.stat().st_size}
    assert summary["data_digest"].startswith("sha256:")
    ref = np.loadtxt(src, delimiter=",", skiprows=1)
    data = reader.read_data(run, summary)
    assert list(data) == ["x", "y", "sigma"]
    assert np.array_equal(np.column_stack(list(data.values())), ref)
    before = pages(run)
    result = cli("plot", run)
    assert result.exit_code == 0, result.output
    assert pages(run) == before


def test_copy_data_copies_a_large_data_file(tmp_path, threshold):
    run = tmp_path / "run"
    cfg = file_cfg(tmp_path)
    result = cli("train", cfg, "--run-dir", run, "--progress", "none", "--copy-data")
    assert result.exit_code == 0, result.output
    assert stored(run) == ["data.npz"]
    assert "data_file" not in json.loads((run / "summary.json").read_text())
    ref = np.loadtxt(tmp_path / "points.csv", delimiter=",", skiprows=1)
    with np.load(run / "data.npz", allow_pickle=False) as z:
        assert z.files == ["x", "y", "sigma"]
        assert np.array_equal(np.column_stack([z["x"], z["y"], z["sigma"]]), ref)
    # the copy is the run's data: plot needs no data file any more
    (tmp_path / "points.csv").unlink()
    assert cli("plot", run).exit_code == 0
    # --overwrite replaces a run directory holding data.npz (it is fitcli's)
    data_file(tmp_path)
    result = cli("train", cfg, "--run-dir", run, "--overwrite", "--progress", "none")
    assert result.exit_code == 0, result.output
    assert stored(run) == []


def test_plot_refuses_a_referenced_data_file_changed_or_missing(tmp_path, threshold):
    run = tmp_path / "run"
    assert cli("train", file_cfg(tmp_path), "--run-dir", run, "--progress", "none").exit_code == 0
    src = tmp_path / "points.csv"
    text = src.read_text()
    src.write_text(text.replace("\n1.0,", "\n1.5,", 1))  # same size, other content
    assert src.stat().st_size == len(text)
    result = cli("plot", run)
    assert result.exit_code == 2, result.output
    assert "changed since the run read it" in result.output and "digest" in result.output
    src.write_text(text + "9,9,1\n")
    result = cli("plot", run)
    assert result.exit_code == 2 and "changed since the run read it" in result.output
    src.unlink()
    result = cli("plot", run)
    assert result.exit_code == 2 and "missing; put it back" in result.output
    src.write_text(text)
    assert cli("plot", run).exit_code == 0


def test_garbled_data_npz_is_refused_by_name(tmp_path, threshold):
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path, data={**SMALL["data"], "x": {"start": -10, "stop": 10, "num": N}})
    assert cli("train", cfg, "--run-dir", run, "--progress", "none").exit_code == 0
    good = (run / "data.npz").read_bytes()
    (run / "data.npz").write_bytes(good[: len(good) // 2])
    result = cli("plot", run)
    assert result.exit_code == 2 and "data.npz: garbled or truncated" in result.output
    with zipfile.ZipFile(run / "data.npz", "w") as z:  # a pickled object array
        buf = __import__("io").BytesIO()
        np.save(buf, np.array([{"a": 1}] * N, dtype=object), allow_pickle=True)
        z.writestr("x.npy", buf.getvalue())
    result = cli("plot", run)
    assert result.exit_code == 2 and "data.npz: garbled" in result.output, result.output


@pytest.mark.parametrize("form", ["csv", "npz", "file", "copied"])
def test_resume_reads_every_form(tmp_path, monkeypatch, form):
    if form != "csv":
        monkeypatch.setattr(files, "DATA_CSV_MAX_ROWS", 30)
    cfg = write_cfg(tmp_path, data={**SMALL["data"], "x": {"start": -10, "stop": 10, "num": N}})
    if form in ("file", "copied"):
        cfg = file_cfg(tmp_path)
    whole = tmp_path / "whole"
    whole.mkdir()
    full = execute(prepare(load_config(cfg)), whole, command=["t"], copy_data=form == "copied")
    run = tmp_path / "run"
    run.mkdir()
    execute(
        prepare(load_config(cfg)),
        run,
        command=["t"],
        on_epoch=lambda e, loss: e >= 5,
        copy_data=form == "copied",
    )
    want = {"csv": ["data.csv"], "npz": ["data.npz"], "file": [], "copied": ["data.npz"]}[form]
    assert stored(run) == want
    result = cli("train", "--resume", run, "--progress", "none")
    assert result.exit_code == 0, result.output
    assert stored(run) == want  # a resumed run keeps its form
    summary = json.loads((run / "summary.json").read_text())
    assert summary["params"] == full["params"]  # resumed exactly where it stopped


@pytest.mark.parametrize("form", ["file", "copied"])
def test_resume_refuses_a_changed_or_missing_large_data_file(tmp_path, threshold, form):
    cfg = file_cfg(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    execute(
        prepare(load_config(cfg)),
        run,
        command=["t"],
        on_epoch=lambda e, loss: e >= 5,
        copy_data=form == "copied",
    )
    src = tmp_path / "points.csv"
    text = src.read_text()
    src.write_text(text.replace("\n1.0,", "\n1.5,", 1))
    result = cli("train", "--resume", run, "--progress", "none")
    assert result.exit_code == 2, result.output
    assert f"{src} changed since the run started" in result.output
    src.unlink()
    result = cli("train", "--resume", run, "--progress", "none")
    assert result.exit_code == 2 and f"{src} does not exist" in result.output, result.output
    src.write_text(text)
    result = cli("train", "--resume", run, "--progress", "none")
    assert result.exit_code == 0, result.output


def test_resume_compares_data_npz_column_by_column(tmp_path, threshold):
    """An older run without a digest: the copy in data.npz is what the file is compared with."""
    cfg = file_cfg(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    execute(
        prepare(load_config(cfg)),
        run,
        command=["t"],
        on_epoch=lambda e, loss: e >= 5,
        copy_data=True,
    )
    doc = json.loads((run / "summary.json").read_text())
    del doc["data_digest"]
    (run / "summary.json").write_text(json.dumps(doc))
    src = tmp_path / "points.csv"
    saved = src.read_text()
    src.write_text(saved.replace("\n1.0,", "\n1.5,", 1))
    result = cli("train", "--resume", run, "--progress", "none")
    assert result.exit_code == 2 and "the data differ" in result.output, result.output
    assert "data.npz" in result.output
    src.write_text(saved)
    result = cli("train", "--resume", run, "--progress", "none")
    assert result.exit_code == 0, result.output


def test_api_arrays_above_the_threshold_stay_data_csv(tmp_path, threshold):
    """A saved API fit of arrays keeps data.csv: its config.yaml reads them from there."""
    import fitcli

    x = np.linspace(0, 5, N)
    y = 3.0 * np.exp(-x / 2.0) + 0.5 + 0.01 * np.sin(7 * x)
    run = tmp_path / "run"
    fitcli.fit(x=x, y=y, expr="A*exp(-x/tau) + B", params={"A": 2, "tau": 1, "B": 0}, run_dir=run)
    assert stored(run) == ["data.csv"]
    got = np.loadtxt(run / "data.csv", delimiter=",", skiprows=1)
    assert np.array_equal(got[:, 0], x) and np.array_equal(got[:, 1], y)
    again = fitcli.load(run)
    assert again.params == pytest.approx(json.loads((run / "summary.json").read_text())["params"])
