"""A grouped run's report as a user reads it: the summary (groups, shared values, the spread of
the per-group values, the failed groups and why), the small multiples on the config's axes
(titles and log axes from `report:`; several variables drawn as observed against the fit at
each point) and the histograms, each checked against groups.csv, summary.json and the model
evaluated by numpy."""

from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

import numpy as np
import yaml
from test_report_content import figure, values
from typer.testing import CliRunner

from fitcli.cli import app
from fitcli.plots import group_histograms

runner = CliRunner()
LEFT_OUT_NAMES = (" omitted (NaN)", " outside range")


def train(tmp_path: Path, cfg: dict, code: int = 0) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(path), "--run-dir", str(run), "--progress", "none"])
    assert result.exit_code == code, result.output
    return run


def rows_of(run: Path) -> list[dict]:
    with open(run / "groups.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def panels(traces: list[dict]) -> dict[str, tuple[dict, dict]]:
    """Each group's (markers, line) traces of the small multiples, by group label."""
    marks = {t["name"]: t for t in traces if t["mode"] == "markers" and "xaxis" in t}
    marks = {n: t for n, t in marks.items() if not n.endswith(LEFT_OUT_NAMES)}
    lines = {t["name"]: t for t in traces if t["mode"] == "lines"}
    out = {}
    for label, m in marks.items():
        line = [t for n, t in lines.items() if n.startswith(label + " ")]
        assert len(line) == 1
        out[label] = (m, line[0])
    return out


def axis_of(layout: dict, trace: dict, which: str) -> dict:
    ref = trace[f"{which}axis"]  # "x", "x2", ...
    return layout[f"{which}axis{ref[1:]}"]


def gauss2(u, v, a, xc, yc, s, b):
    return a * np.exp(-((u - xc) ** 2 + (v - yc) ** 2) / (2 * s**2)) + b


def test_two_variables_are_drawn_as_observed_against_the_fit_at_each_point(tmp_path):
    # The small multiples of a grouped run with two variables drew a line through the
    # variables' values as if they were one x; each panel now shows the observations against
    # the fit at the same points, with the diagonal where they agree.
    rng = np.random.default_rng(4)
    u, v = (w.ravel() for w in np.meshgrid(np.arange(8.0), np.arange(8.0), indexing="ij"))
    lines = ["u,v,z,g"]
    for g in range(4):
        truth = (50 + 10 * g, 3.5 + 0.2 * g, 3.5 - 0.1 * g, 1.5, 2.0)
        z = gauss2(u, v, *truth) + rng.normal(0, 1.0, u.size)
        lines += [
            f"{a!r},{b!r},{c!r},p{g}"
            for a, b, c in zip(*(w.tolist() for w in (u, v, z)), strict=True)
        ]
    (tmp_path / "px.csv").write_text("\n".join(lines) + "\n")
    params = dict(zip(["a", "xc", "yc", "s", "b"], [50.0, 3.5, 3.5, 1.5, 2.0], strict=True))
    run = train(
        tmp_path,
        {
            "name": "px",
            "data": {"file": "px.csv", "columns": {"x": ["u", "v"], "y": "z", "group": "g"}},
            "model": {
                "expr": "a*exp(-((u - xc)**2 + (v - yc)**2)/(2*s**2)) + b",
                "params": {k: {"value": x, "per_group": True} for k, x in params.items()},
            },
            "optimizer": {"name": "LevenbergMarquardt"},
        },
    )
    page = (run / "report.html").read_text(encoding="utf-8")
    traces, layout = figure(page, "fitcli-groups")
    drawn = panels(traces)
    rows = {r["group"]: r for r in rows_of(run)}
    assert set(drawn) == set(rows)
    table = np.array([ln.split(",")[:3] for ln in lines[1:]], dtype=float)
    labels = np.array([ln.split(",")[3] for ln in lines[1:]])
    for label, (marks, diagonal) in drawn.items():
        p = [float(rows[label][k]) for k in ("a", "xc", "yc", "s", "b")]
        mine = table[labels == label]
        np.testing.assert_allclose(
            values(marks["x"]), gauss2(mine[:, 0], mine[:, 1], *p), rtol=1e-9
        )
        np.testing.assert_array_equal(values(marks["y"]), mine[:, 2])
        both = np.concatenate([values(marks["x"]), mine[:, 2]])
        np.testing.assert_allclose(values(diagonal["x"]), [both.min(), both.max()])
        np.testing.assert_array_equal(values(diagonal["x"]), values(diagonal["y"]))
    titles = {axis_of(layout, m, "x").get("title", {}).get("text") for m, _ in drawn.values()}
    assert titles == {"fitted z"}  # one row of four panels: every one has its x title
    y_titles = [
        axis_of(layout, t, "y").get("title", {}).get("text")
        for t in traces
        if t["mode"] == "markers" and t["name"] in drawn
    ]
    assert y_titles == ["observed z", None, None, None]  # the first column's


def dose_response(x, bottom, top, ec50, slope):
    return bottom + (top - bottom) / (1 + (ec50 / x) ** slope)


def test_the_small_multiples_take_the_report_sections_titles_and_log_axes(tmp_path):
    # A plate of dose-response curves, doses spread over four decades: the panels drew them on
    # a linear axis (every curve a step at zero) without the config's axis titles.
    rng = np.random.default_rng(7)
    dose = np.geomspace(1e-3, 10, 10)
    lines = ["dose,resp,well"]
    for g in range(8):
        y = dose_response(dose, 2, 98, 0.05 * (g + 1), 1.1) + rng.normal(0, 1.5, dose.size)
        lines += [f"{d!r},{r!r},w{g}" for d, r in zip(dose.tolist(), y.tolist(), strict=True)]
    (tmp_path / "plate.csv").write_text("\n".join(lines) + "\n")
    start = {"bottom": 0.0, "top": 100.0, "ec50": 0.1, "slope": 1.0}
    run = train(
        tmp_path,
        {
            "name": "plate",
            "data": {"file": "plate.csv", "columns": {"x": "dose", "y": "resp", "group": "well"}},
            "model": {
                "expr": "bottom + (top - bottom)/(1 + (ec50/x)**slope)",
                "params": {k: {"value": v, "per_group": True} for k, v in start.items()},
            },
            "optimizer": {"name": "LevenbergMarquardt"},
            "report": {"x_label": "dose (uM)", "y_label": "response (%)", "log_x": True},
        },
    )
    page = (run / "report.html").read_text(encoding="utf-8")
    traces, layout = figure(page, "fitcli-groups")
    drawn = panels(traces)
    rows = {r["group"]: r for r in rows_of(run)}
    assert set(drawn) == set(rows)
    for label, (marks, line) in drawn.items():
        assert axis_of(layout, marks, "x")["type"] == "log"
        assert axis_of(layout, marks, "y").get("type") != "log"
        np.testing.assert_array_equal(values(marks["x"]), dose)
        gx = values(line["x"])
        # Evenly spaced in log x from the group's first dose to its last.
        np.testing.assert_allclose(gx, np.geomspace(dose[0], dose[-1], gx.size), rtol=1e-12)
        p = [float(rows[label][k]) for k in start]
        np.testing.assert_allclose(values(line["y"]), dose_response(gx, *p), rtol=1e-9)
    cols = 6  # panels per row
    order = [t["name"] for t in traces if t["mode"] == "markers" and t["name"] in drawn]
    for k, label in enumerate(order):
        marks = drawn[label][0]
        x_title = axis_of(layout, marks, "x").get("title", {}).get("text")
        y_title = axis_of(layout, marks, "y").get("title", {}).get("text")
        assert x_title == ("dose (uM)" if k + cols >= len(order) else None)
        assert y_title == ("response (%)" if k % cols == 0 else None)


WELLS_CFG = {
    "name": "wells",
    "epochs": 200,
    "data": {"file": "wells.csv", "columns": {"x": "t", "y": "y", "group": "well"}},
    "model": {"expr": "a*exp(-b*x) + c"},
    "optimizer": {"name": "LevenbergMarquardt"},
}


def write_wells(path: Path, counts: list[int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lines = ["t,y,well"]
    for g, n in enumerate(counts):
        a, b = rng.uniform(1, 3), rng.uniform(0.4, 1.2)
        for t in np.linspace(0, 5, n):
            y = a * np.exp(-b * t) + 0.2 + rng.normal(0, 0.02)
            lines.append(f"{float(t)!r},{float(y)!r},w{g}")
    path.write_text("\n".join(lines) + "\n")


def cells(page: str, table_class: str) -> list[list[str]]:
    """The text of each row's cells of the page's table of that class."""
    body = re.search(f'<table class="{table_class}">(.*?)</table>', page, re.S)
    assert body, f"no table {table_class}"
    return [
        [
            html.unescape(re.sub("<[^>]+>", "", c))
            for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r)
        ]
        for r in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    ]


def test_the_report_summarises_the_groups_and_names_the_failed_ones(tmp_path):
    write_wells(tmp_path / "wells.csv", [30, 30, 2, 30, 30])
    per = {k: {"value": v, "per_group": True} for k, v in {"a": 1, "b": 1, "c": 0.1}.items()}
    run = train(tmp_path, {**WELLS_CFG, "model": {**WELLS_CFG["model"], "params": per}}, code=1)
    page = (run / "report.html").read_text(encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text())
    table = dict(r for r in cells(page, "summary") if len(r) == 2)
    assert table["status"] == summary["status"] == "failed"
    assert table["groups"] == "5: 4 converged, 1 failed"
    assert table["stopped"] == summary["reason"]
    rows = rows_of(run)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["group"] for r in failed] == ["w2"]
    listed = cells(page, "failed-groups")[1:]
    assert listed == [["w2", failed[0]["reason"], "2", failed[0]["iterations"]]]
    # The spread of each per-group value over the groups that did not fail, from groups.csv.
    spread = {r[0]: r[1:] for r in cells(page, "per-group")[1:]}
    kept = [r for r in rows if r["status"] != "failed"]
    for name in "abc":
        v = np.array([float(r[name]) for r in kept])
        se = np.array([float(r[f"{name}_stderr"]) for r in kept])
        lo, mid, hi = np.percentile(v, [16, 50, 84])
        assert spread[name] == [
            f"{mid:.8g}",
            f"{lo:.4g} to {hi:.4g}",
            f"{np.median(se):.3g}",
            "4",
        ]
    assert "No shared parameters" in page


def test_a_global_fits_report_shows_the_shared_values_and_their_errors(tmp_path):
    write_wells(tmp_path / "wells.csv", [30, 30, 30, 30], seed=2)
    params = {"a": {"value": 1, "per_group": True}, "b": 0.8, "c": 0.1}
    run = train(tmp_path, {**WELLS_CFG, "model": {**WELLS_CFG["model"], "params": params}})
    page = (run / "report.html").read_text(encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text())
    shared = cells(page, "params")
    assert shared[0] == ["shared parameter", "value", "± stderr"]
    assert shared[1:] == [
        [n, f"{summary['params'][n]:.8g}", f"{summary['stderr'][n]:.3g}"] for n in ("b", "c")
    ]
    table = dict(r for r in cells(page, "summary") if len(r) == 2)
    assert table["groups"] == "4: 4 converged, 0 failed"
    assert 'id="failed"' not in page
    assert f"{summary['fit_s']:.3g} s" in table["fitting time"]


def test_a_parameter_spanning_decades_is_binned_by_its_log10():
    rng = np.random.default_rng(0)
    ec50 = 10 ** rng.uniform(-3, 0, 50)
    top = rng.uniform(90, 110, 50)
    rows = [
        {"status": "converged", "ec50": e, "top": t} for e, t in zip(ec50, top, strict=True)
    ] + [{"status": "failed", "ec50": 1e6, "top": 1e6}]
    fig = group_histograms(rows, ["ec50", "top"])
    first, second = fig["data"]
    np.testing.assert_allclose(values(first["x"]), np.log10(ec50))
    assert fig["layout"]["xaxis"]["title"]["text"] == "log10 ec50"
    np.testing.assert_array_equal(values(second["x"]), top)  # 90-110: binned as it is
    assert fig["layout"]["xaxis2"]["title"]["text"] == "top"


def test_rows_left_out_are_drawn_in_their_groups_panel_and_kept_in_left_out_csv(tmp_path):
    # A grouped run dropped the rows it left out from its plots and kept no left_out.csv; and
    # data.range lost the file's column names (the axes were titled x and y, not t and y).
    rng = np.random.default_rng(3)
    lines = ["t,y,well"]
    blank = {("w1", 5), ("w2", 11)}  # (group, row): an empty y cell
    for g in range(3):
        for i, t in enumerate(np.linspace(0, 5, 20).tolist()):
            y = 2 * np.exp(-0.7 * t) + 0.2 + rng.normal(0, 0.02)
            lines.append(f"{t!r},{'' if (f'w{g}', i) in blank else repr(float(y))},w{g}")
    (tmp_path / "wells.csv").write_text("\n".join(lines) + "\n")
    params = {"a": {"value": 1, "per_group": True}, "b": {"value": 1, "per_group": True}}
    cfg = {
        **WELLS_CFG,
        "data": {**WELLS_CFG["data"], "nan_policy": "omit", "range": {"x": [0, 4]}},
        "model": {"expr": "a*exp(-b*x) + 0.2", "params": params},
    }
    run = train(tmp_path, cfg)
    # What left_out.csv should hold, from the file itself: each row's x, y, reason and group.
    t, y, well = [], [], []
    for line in lines[1:]:
        a, b, c = line.split(",")
        t.append(float(a)), y.append(float(b) if b else np.nan), well.append(c)
    t, y, well = np.array(t), np.array(y), np.array(well)
    nan, outside = np.isnan(y), (t > 4) & ~np.isnan(y)
    with open(run / "left_out.csv", newline="") as fh:
        left = list(csv.DictReader(fh))
    assert list(left[0]) == ["x", "y", "reason", "group"]
    got = sorted((float(r["x"]), r["reason"], r["group"]) for r in left)
    want = sorted(
        [(v, "nan", w) for v, w in zip(t[nan], well[nan], strict=True)]
        + [(v, "range", w) for v, w in zip(t[outside], well[outside], strict=True)]
    )
    assert got == want
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rows"]["omitted_nan"] == 2 and summary["rows"]["outside_range"] == int(
        outside.sum()
    )
    page = (run / "report.html").read_text(encoding="utf-8")
    traces, layout = figure(page, "fitcli-groups")
    drawn = panels(traces)
    for label, (marks, _) in drawn.items():
        grey = [t for t in traces if t["name"] == f"{label} outside range"]
        assert len(grey) == 1 and grey[0]["xaxis"] == marks["xaxis"]
        sel = outside & (well == label)
        np.testing.assert_array_equal(values(grey[0]["x"]), t[sel])
        np.testing.assert_array_equal(values(grey[0]["y"]), y[sel])
        # The NaN rows have no y to draw: no hollow markers for them.
        assert not [t for t in traces if t["name"] == f"{label} omitted (NaN)"]
        assert axis_of(layout, marks, "x")["title"]["text"] == "t"  # the file's column name
    # `fitcli plot` draws the same page again from the run directory.
    before = page
    (run / "report.html").unlink()
    assert runner.invoke(app, ["plot", str(run)]).exit_code == 0
    assert (run / "report.html").read_text(encoding="utf-8") == before


def test_rows_left_out_of_several_files_are_labelled_by_their_file(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("plate_a", "plate_b"):
        rows = ["t,y"]
        for t in np.linspace(0, 6, 15).tolist():
            rows.append(f"{t!r},{float(2 * np.exp(-0.5 * t) + rng.normal(0, 0.02))!r}")
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
    params = {"a": {"value": 1, "per_group": True}, "b": {"value": 1, "per_group": True}}
    cfg = {
        **WELLS_CFG,
        "data": {
            "files": [str(tmp_path / "plate_a.csv"), str(tmp_path / "plate_b.csv")],
            "columns": {"x": "t", "y": "y"},
            "range": {"x": [0, 5]},
        },
        "model": {"expr": "a*exp(-b*x)", "params": params},
    }
    run = train(tmp_path, cfg)
    with open(run / "left_out.csv", newline="") as fh:
        left = list(csv.DictReader(fh))
    beyond = [t for t in np.linspace(0, 6, 15).tolist() if t > 5]
    assert sorted((r["group"], float(r["x"])) for r in left) == sorted(
        (g, t) for g in ("plate_a", "plate_b") for t in beyond
    )
    assert {r["reason"] for r in left} == {"range"}


def test_predict_and_ci_of_a_grouped_run_say_they_take_single_runs(tmp_path):
    # They said "comparisons and --format figures take single runs": not what was asked.
    write_wells(tmp_path / "wells.csv", [20, 20, 20])
    per = {k: {"value": v, "per_group": True} for k, v in {"a": 1, "b": 1, "c": 0.1}.items()}
    run = train(tmp_path, {**WELLS_CFG, "model": {**WELLS_CFG["model"], "params": per}})
    for args in (["predict", str(run), "--x", "0:1:3"], ["ci", str(run)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "a grouped run (3 groups); predict, ci" in result.output
        assert "groups.csv" in result.output and "Traceback" not in result.output
