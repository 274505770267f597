"""`fitcli predict`: a run's fitted model at new points, checked against the Python API's
predict on the same run directory and against numpy; its usage errors exit 2 with a message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, fitcli_process

import fitcli

DECAY = ROOT / "configs" / "data" / "decay.csv"
CONFIG = {
    "name": "decay",
    "device": "cpu",
    "epochs": 100,
    "snapshots": 2,
    "data": {"file": str(DECAY), "columns": {"x": "time_s", "y": "counts"}},
    "model": {"expr": "A*exp(-x/tau) + B", "params": {"A": 80, "tau": 5, "B": 5}},
    "optimizer": {"name": "LM"},
}
BANDS = ["conf_lower_95", "conf_upper_95", "pred_lower_95", "pred_upper_95"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("predict")
    cfg = base / "decay.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    proc = fitcli_process("train", str(cfg), "--run-dir", str(base / "run"), "--progress", "none")
    assert proc.returncode == 0, proc.stderr
    return base / "run"


def expected(run: Path, x: np.ndarray) -> np.ndarray:
    p = json.loads((run / "summary.json").read_text())["params"]
    return p["A"] * np.exp(-x / p["tau"]) + p["B"]


def test_json_is_the_fitted_curve_on_the_linspace_with_the_api_s_bands(run):
    proc = fitcli_process("predict", str(run), "--x", "0:10:11", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert list(doc) == ["x", "fit", *BANDS]
    x = np.linspace(0, 10, 11)
    assert doc["x"] == x.tolist()
    np.testing.assert_allclose(doc["fit"], expected(run, x), rtol=1e-14)
    api = fitcli.load(run).predict(x, band=0.95)
    for name in BANDS:
        assert doc[name] == api[name].tolist()
    assert all(
        lo < f < hi for lo, f, hi in zip(doc[BANDS[0]], doc["fit"], doc[BANDS[1]], strict=True)
    )


def test_out_writes_csv_and_never_replaces_a_file(run, tmp_path):
    out = tmp_path / "pred.csv"
    proc = fitcli_process("predict", str(run), "--x", "1:2:3", "--out", str(out), "--band", "0")
    assert proc.returncode == 0, proc.stderr
    table = np.loadtxt(out, delimiter=",", skiprows=1)
    assert out.read_text().splitlines()[0] == "x,fit"
    np.testing.assert_array_equal(table[:, 0], np.linspace(1, 2, 3))
    np.testing.assert_allclose(table[:, 1], expected(run, table[:, 0]), rtol=1e-14)
    before = out.read_bytes()
    again = fitcli_process("predict", str(run), "--x", "0:1:2", "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert out.read_bytes() == before


def test_x_file_reads_the_config_s_x_column_and_prints_a_table(run, tmp_path):
    new = tmp_path / "new.csv"
    new.write_text("counts,time_s\n0,2.5\n0,7.25\n")
    proc = fitcli_process("predict", str(run), "--x-file", str(new))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["x", "┃", "fit", *[c for b in BANDS for c in ("┃", b)]]
    fit = expected(run, np.array([2.5, 7.25]))
    for line, xv, fv in zip(lines[2:], (2.5, 7.25), fit, strict=True):
        cells = [c.strip() for c in line.split("│")]
        assert float(cells[0]) == xv and float(cells[1]) == pytest.approx(fv, rel=1e-9)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--x", "0:10"], "is not START:STOP:NUM"),
        (["--x", "a:1:3"], "START and STOP must be numbers"),
        (["--x", "0:1:2.5"], "NUM must be a whole number"),
        (["--x", "0:1:0"], "NUM must be 1 to"),
        ([], "give the new points as --x START:STOP:NUM or --x-file FILE"),
        (["--x-file", "missing.csv"], "--x-file: missing.csv does not exist"),
    ],
)
def test_bad_x_exits_2_with_a_message(run, args, message, tmp_path):
    proc = fitcli_process("predict", str(run), *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_a_missing_or_foreign_directory_exits_2(tmp_path):
    proc = fitcli_process("predict", str(tmp_path / "nope"), "--x", "0:1:3")
    assert proc.returncode == 2
    assert "does not exist; expected a fitcli run directory" in proc.stderr
    (tmp_path / "other").mkdir()
    proc = fitcli_process("predict", str(tmp_path / "other"), "--x", "0:1:3")
    assert proc.returncode == 2 and "is not a fitcli run directory" in proc.stderr
