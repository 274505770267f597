"""Bounds on what a command line or a data file can make fitcli do: the size of a sweep's grid,
binary data files, values beyond float32's range, and output paths that are folders."""

from __future__ import annotations

import time
import tracemalloc

import pytest
from conftest import CONFIGS, only_run_dir

from fitcli import sweep
from fitcli.cli import app
from fitcli.data import load_table
from fitcli.errors import DataError

SEED = CONFIGS / "seed.yaml"


def test_a_billion_run_range_is_refused_without_building_it(runner):
    tracemalloc.start()
    t0 = time.perf_counter()
    res = runner.invoke(app, ["sweep", str(SEED), "seed=range(0,1000000000)", "--dry-run"])
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.exit_code == 2, res.output
    assert "seed=range(0,1000000000)" in res.output
    assert f"{sweep.MAX_RUNS:,}" in res.output
    assert peak < 50 * 1024**2 and elapsed < 30  # nothing of the billion runs was built
    assert res.stdout == ""


def test_a_grid_whose_product_is_too_large_is_refused(runner):
    # Each axis alone is small; together 1000 * 1000 = 10^6 runs.
    res = runner.invoke(
        app, ["sweep", str(SEED), "seed=range(0,1000)", "epochs=range(1,1001)", "--dry-run"]
    )
    assert res.exit_code == 2, res.output
    assert "1,000,000 runs" in res.output
    assert "seed (1,000 values) x epochs (1,000 values)" in res.output


def test_a_grid_at_the_limit_is_accepted():
    fixed, axes = sweep.parse_assignments(
        ["seed=range(0,100)", f"epochs=range(1,{sweep.MAX_RUNS // 100 + 1})"]
    )
    runs = sweep.expand(axes)
    assert len(runs) == sweep.MAX_RUNS
    assert runs[-1].values == {"seed": "99", "epochs": str(sweep.MAX_RUNS // 100)}


def test_a_binary_data_file_is_refused_from_its_first_bytes(tmp_path):
    path = tmp_path / "data.csv"
    with open(path, "wb") as fh:
        fh.write(b"x,y\n1,2\n\x00\x01\x02binary")
        fh.truncate(256 * 1024**2)  # sparse: 256 MB of NULs after the head, read in no time
    tracemalloc.start()
    with pytest.raises(DataError) as err:
        load_table(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "binary" in str(err.value) and str(path) in str(err.value)
    assert "byte 8" in str(err.value)
    assert peak < 10 * 1024**2


def test_a_utf16_csv_is_named_as_such(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("x,y\n1,2\n3,4\n", encoding="utf-16")
    with pytest.raises(DataError, match="UTF-16"):
        load_table(path)


def test_float32_data_beyond_float32_is_a_data_error_naming_the_row(tmp_path, runner, write_config):
    data = tmp_path / "d.csv"
    data.write_text("x,y\n1,2\n2,3\n3,1e39\n4,5\n")
    cfg = write_config(
        {"dtype": "float32", "data": {"file": str(data)}, "model": {"basis": ["x", "1"]}}
    )
    res = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    assert "data row 3" in res.output and "float32" in res.output and "y" in res.output
    assert "diverged" not in res.output
    assert not (tmp_path / "runs").exists()
    # float64 takes the same data
    res = runner.invoke(app, ["train", str(cfg), "dtype=float64", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    only_run_dir(tmp_path / "r")


def test_float32_synthetic_target_beyond_float32_is_a_data_error(tmp_path, runner, write_config):
    cfg = write_config({"dtype": "float32", "data.target": "1e39*x"})
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "float32" in res.output and "data.target" in res.output


def test_sigma_whose_weight_overflows_float32_is_a_data_error(tmp_path, runner, write_config):
    data = tmp_path / "d.csv"
    data.write_text("x,y,s\n1,2,1\n2,3,1e-40\n3,1,1\n")
    cfg = write_config(
        {
            "dtype": "float32",
            "data": {"file": str(data), "columns": {"x": 0, "y": 1, "sigma": 2}},
            "model": {"basis": ["x", "1"]},
        }
    )
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "data row 2" in res.output and "sigma" in res.output


def test_graph_html_to_a_directory_is_exit_2(tmp_path, runner):
    res = runner.invoke(app, ["graph", str(SEED), "--html", str(tmp_path)])
    assert res.exit_code == 2, res.output
    assert "is a directory" in res.output
    res = runner.invoke(app, ["graph", str(SEED), "--html", str(tmp_path / "no" / "g.html")])
    assert res.exit_code == 2, res.output
    assert "does not exist" in res.output
    assert list(tmp_path.iterdir()) == []
