"""data.nan_policy, data.range and data.absolute_sigma, checked against curve_fit on the rows
that should be fitted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit

from fitcli.cli import app

NAN_ROWS = (3, 11)  # 0-based data rows whose y is "nan"
EMPTY_ROWS = (7,)  # and whose x cell is empty


def _f(x, a, b):
    return a * np.exp(-b * x)


def _jac(x, a, b):
    return np.column_stack([np.exp(-b * x), -a * x * np.exp(-b * x)])


def _table(tmp_path: Path, sigma: bool = False) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = np.linspace(0, 10, 30)
    s = rng.uniform(0.05, 0.2, x.size)
    y = _f(x, 3.0, 0.4) + rng.normal(0, 1, x.size) * s
    lines = ["x,y,s" if sigma else "x,y"]
    for k, (xv, yv, sv) in enumerate(zip(x.tolist(), y.tolist(), s.tolist(), strict=True)):
        xs, ys = repr(xv), repr(yv)
        if k in NAN_ROWS:
            ys = "nan"
        if k in EMPTY_ROWS:
            xs = ""
        lines.append(",".join([xs, ys, repr(sv)] if sigma else [xs, ys]))
    path = tmp_path / "d.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, x, y, s


def _train(runner, tmp_path: Path, data: str, name: str = "run"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        f"epochs: 50\nsnapshots: 2\ndata: {data}\nmodel: {{expr: a*exp(-b*x), "
        "params: {a: 2, b: 0.3}}\noptimizer: {name: LM}\n"
    )
    run_dir = tmp_path / name
    result = runner.invoke(app, ["train", str(cfg), "--run-dir", str(run_dir), "--json"])
    summary = None
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    return result, run_dir, summary


def test_omit_drops_and_records_the_nan_and_empty_rows(runner, tmp_path):
    path, x, y, _ = _table(tmp_path)
    result, run_dir, s = _train(runner, tmp_path, f"{{file: {path}, nan_policy: omit}}")
    assert result.exit_code == 0, result.output
    bad = sorted(NAN_ROWS + EMPTY_ROWS)
    assert s["rows"] == {"read": 30, "used": 27, "omitted_nan": 3, "outside_range": 0}
    assert s["omitted_lines"] == [k + 2 for k in bad]  # the header is line 1
    keep = np.setdiff1d(np.arange(30), bad)
    popt, _ = curve_fit(_f, x[keep], y[keep], p0=(2, 0.3), xtol=1e-15, ftol=1e-15)
    np.testing.assert_allclose([s["params"]["a"], s["params"]["b"]], popt, rtol=1e-7)
    # The omitted rows whose x and y are known are drawn hollow; the others cannot be drawn.
    left = (run_dir / "left_out.csv").read_text().splitlines()
    assert left[0] == "x,y,reason" and len(left) == 1 + len(bad)
    page = sorted((run_dir / "snapshots").glob("*.html"))[-1].read_text()
    assert "omitted (NaN)" not in page  # every omitted row here lacks x or y
    assert runner.invoke(app, ["plot", str(run_dir)]).exit_code == 0


def test_omit_draws_hollow_markers_where_only_sigma_is_missing(runner, tmp_path):
    path = tmp_path / "d.csv"
    x = np.linspace(0, 5, 12)
    y = _f(x, 2.0, 0.5)
    rows = [
        f"{a!r},{b!r},{'' if k == 4 else '0.1'}"
        for k, (a, b) in enumerate(zip(x.tolist(), y.tolist(), strict=True))
    ]
    path.write_text("x,y,s\n" + "\n".join(rows) + "\n")
    result, run_dir, s = _train(
        runner, tmp_path, f"{{file: {path}, columns: {{sigma: s}}, nan_policy: omit}}"
    )
    assert result.exit_code == 0, result.output
    assert s["omitted_lines"] == [6]
    page = sorted((run_dir / "snapshots").glob("*.html"))[-1].read_text()
    assert "omitted (NaN)" in page and "circle-open" in page
    before = page
    assert runner.invoke(app, ["plot", str(run_dir)]).exit_code == 0
    assert sorted((run_dir / "snapshots").glob("*.html"))[-1].read_text() == before


def test_raise_is_the_default_and_names_the_file_and_line(runner, tmp_path):
    path, *_ = _table(tmp_path)
    result, run_dir, _ = _train(runner, tmp_path, f"{{file: {path}}}")
    assert result.exit_code == 2
    assert str(path) in result.stderr and f"line {NAN_ROWS[0] + 2}" in result.stderr
    assert not run_dir.exists()
    result, _, _ = _train(runner, tmp_path, f"{{file: {path}, nan_policy: raise}}", "r2")
    assert result.exit_code == 2 and f"line {NAN_ROWS[0] + 2}" in result.stderr


def test_range_keeps_the_rows_inside_and_greys_out_the_rest(runner, tmp_path):
    path, x, y, _ = _table(tmp_path)
    clean = tmp_path / "clean.csv"
    clean.write_text(
        "x,y\n"
        + "\n".join(f"{a!r},{b!r}" for a, b in zip(x.tolist(), y.tolist(), strict=True))
        + "\n"
    )
    result, run_dir, s = _train(runner, tmp_path, f"{{file: {clean}, range: {{x: [2, 8]}}}}")
    assert result.exit_code == 0, result.output
    inside = (x >= 2) & (x <= 8)
    n_in = int(inside.sum())
    assert s["rows"] == {"read": 30, "used": n_in, "omitted_nan": 0, "outside_range": 30 - n_in}
    assert s["n_points"] == n_in and s["omitted_lines"] == []
    popt, _ = curve_fit(_f, x[inside], y[inside], p0=(2, 0.3), xtol=1e-15, ftol=1e-15)
    np.testing.assert_allclose([s["params"]["a"], s["params"]["b"]], popt, rtol=1e-7)
    data = np.loadtxt(run_dir / "data.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(data[:, 0], x[inside])
    page = sorted((run_dir / "snapshots").glob("*.html"))[-1].read_text()
    assert "outside range" in page
    # with omit as well: both counts
    result, _, s = _train(
        runner, tmp_path, f"{{file: {path}, nan_policy: omit, range: {{x: [2, 8]}}}}", "both"
    )
    assert result.exit_code == 0, result.output
    known = np.ones(30, dtype=bool)
    known[list(NAN_ROWS + EMPTY_ROWS)] = False
    used = int((inside & known).sum())
    assert s["rows"] == {
        "read": 30,
        "used": used,
        "omitted_nan": 3,
        "outside_range": int((~inside & known).sum()),
    }


def test_range_with_no_row_inside_is_a_data_error(runner, tmp_path):
    path, x, y, _ = _table(tmp_path)
    clean = tmp_path / "clean.csv"
    clean.write_text(
        "x,y\n"
        + "\n".join(f"{a!r},{b!r}" for a, b in zip(x.tolist(), y.tolist(), strict=True))
        + "\n"
    )
    result, run_dir, _ = _train(runner, tmp_path, f"{{file: {clean}, range: {{x: [20, 30]}}}}")
    assert result.exit_code == 2 and "data.range" in result.stderr
    result, _, _ = _train(runner, tmp_path, f"{{file: {clean}, range: {{T: [2, 3]}}}}", "b")
    assert result.exit_code == 2 and "data.range.T" in result.stderr


def test_relative_sigma_scales_the_covariance_as_curve_fit(runner, tmp_path):
    path, x, y, sig = _table(tmp_path, sigma=True)
    clean = tmp_path / "clean.csv"
    rows = zip(x.tolist(), y.tolist(), sig.tolist(), strict=True)
    clean.write_text("x,y,s\n" + "\n".join(f"{a!r},{b!r},{c!r}" for a, b, c in rows) + "\n")
    covs = {}
    for absolute in (False, True):
        data = f"{{file: {clean}, columns: {{sigma: s}}, absolute_sigma: {str(absolute).lower()}}}"
        result, _, s = _train(runner, tmp_path, data, f"abs-{absolute}")
        assert result.exit_code == 0, result.output
        popt, _ = curve_fit(
            _f, x, y, p0=(2, 0.3), sigma=sig, absolute_sigma=absolute, xtol=1e-15, ftol=1e-15
        )
        got = [s["params"]["a"], s["params"]["b"]]
        np.testing.assert_allclose(got, popt, rtol=1e-7)
        # curve_fit's covariance at the same optimum (started there, it stays there)
        # (with the exact Jacobian: a finite-difference one is good to about 1e-8 only)
        _, pcov = curve_fit(
            _f, x, y, p0=got, sigma=sig, absolute_sigma=absolute, jac=_jac, xtol=1e-15
        )
        np.testing.assert_allclose(np.array(s["covariance"]), pcov, rtol=1e-8)
        covs[absolute] = np.array(s["covariance"])
        chi2 = s["chi2_reduced"]
    np.testing.assert_allclose(covs[False], covs[True] * chi2, rtol=1e-9)


def test_range_keeps_the_files_column_names_for_the_axes(runner, tmp_path):
    # data.range rebuilt the data set without the file's header names: the run's axes were
    # titled x and y instead of the columns' names.
    rng = np.random.default_rng(1)
    t = np.linspace(0, 10, 30)
    rows = ["time_s,counts"] + [
        f"{a!r},{b!r}"
        for a, b in zip(
            t.tolist(), (_f(t, 3.0, 0.4) + rng.normal(0, 0.05, t.size)).tolist(), strict=True
        )
    ]
    path = tmp_path / "named.csv"
    path.write_text("\n".join(rows) + "\n")
    data = f"{{file: {path}, columns: {{x: time_s, y: counts}}, range: {{x: [1, 8]}}}}"
    result, run_dir, s = _train(runner, tmp_path, data)
    assert result.exit_code == 0, result.output
    assert s["columns"] == {"x": "time_s", "y": "counts"}
    assert s["rows"]["outside_range"] == int(((t < 1) | (t > 8)).sum())
