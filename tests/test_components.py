"""Components: each top-level additive term of model.expr (each basis function times its
coefficient) is stored beside the fit in snapshots/epoch-N.csv, listed in summary.json and drawn
on the snapshot pages and the report; and a sweep of a tied, composed model is what train
writes."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from sweep_helpers import assert_same_run

from fitcli.cli import app
from fitcli.composition import additive_terms, basis_components, expression_components

PEAKS = "a1*exp(-((x-c1)/s1)**2) + a2*exp(-((x-c2)/s2)**2) - b*x + 0.5"
RAW = {
    "name": "components",
    "seed": 0,
    "device": "cpu",
    "epochs": 20,
    "snapshots": 2,
    "data": {
        "target": "2*exp(-((x-1)/0.5)**2) + 1.5*exp(-((x-3)/0.5)**2) - 0.1*x + 0.5",
        "x": {"start": -2, "stop": 6, "num": 80},
        "noise": {"std": 0.05},
    },
    "model": {
        "expr": PEAKS,
        "params": {
            "a1": 1.5,
            "c1": 0.8,
            "s1": 0.6,
            "a2": 1.0,
            "s2": {"expr": "s1"},
            "c2": {"expr": "c1 + d"},
            "d": {"value": 1.5, "min": 0},
            "b": 0.0,
        },
    },
    "optimizer": {"name": "Adam", "lr": 0.02},
}
TEXTS = ["a1*exp(-((x-c1)/s1)**2)", "a2*exp(-((x-c2)/s2)**2)", "-b*x", "0.5"]


@pytest.mark.parametrize(
    "source, terms",
    [
        ("a*x + b - (c + d)", ["a*x", "b", "-(c + d)"]),
        ("-a*x - sin(x) + b/x - x**2", ["-a*x", "-sin(x)", "b/x", "-x**2"]),
        ("(a + b)*x", ["(a + b)*x"]),
        # Brackets on the left of a sum do not change how it is evaluated: a + b + c.
        ("(a + b) + c", ["a", "b", "c"]),
        ("a + (b + c)", ["a", "(b + c)"]),
        ("  (a*x\n  +   b*(x\n - 1)) ", ["a*x", "b*(x - 1)"]),
        ("a - -b", ["a", "-(-b)"]),
    ],
)
def test_additive_terms(source, terms):
    assert additive_terms(source) == terms


def test_a_single_term_has_no_components():
    assert expression_components("a*exp(-b*x)") == []
    assert expression_components("(a*x + b)*c") == []
    assert basis_components(["x"]) == []
    assert basis_components(["1", "x", "x**2", "x + 1", "-x"]) == [
        "theta0*1",
        "theta1*x",
        "theta2*x**2",
        "theta3*(x + 1)",
        "theta4*(-x)",
    ]


def read_fit(path: Path) -> dict[str, np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return {h: np.array([float(r[k]) for r in rows[1:]]) for k, h in enumerate(rows[0])}


def figure_traces(page: str) -> list[dict]:
    """The traces of the first plotly figure on a page (what Plotly.newPlot draws)."""
    start = page.index("Plotly.newPlot(")
    data = page[page.index("[", start) :]
    traces, _ = json.JSONDecoder().raw_decode(data)
    return traces


def train(runner, raw: dict, tmp_path: Path, name: str = "run"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = tmp_path / name
    result = runner.invoke(app, ["train", str(path), "--run-dir", str(run), "--progress", "none"])
    assert result.exit_code == 0, result.output
    return path, run


def test_expression_components_are_stored_listed_and_drawn(runner, tmp_path):
    _, run = train(runner, RAW, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["components"] == TEXTS
    snaps = json.loads((run / "snapshots" / "params.json").read_text())["snapshots"]
    assert len(snaps) == 3
    for snap in snaps:
        fit = read_fit(run / "snapshots" / snap["fit"])
        assert list(fit) == ["x", "y_fit", "component_1", "component_2", "component_3",
                             "component_4"]  # fmt: skip
        parts = np.stack([fit[f"component_{k}"] for k in range(1, 5)])
        np.testing.assert_allclose(parts.sum(0), fit["y_fit"], rtol=1e-13, atol=1e-13)
        # Each column is its term at the snapshot's parameters, evaluated here in numpy.
        p, x = snap["params"], fit["x"]
        want = [
            p["a1"] * np.exp(-(((x - p["c1"]) / p["s1"]) ** 2)),
            p["a2"] * np.exp(-(((x - p["c2"]) / p["s2"]) ** 2)),
            -p["b"] * x,
            np.full_like(x, 0.5),
        ]
        np.testing.assert_allclose(parts, want, rtol=1e-12, atol=1e-14)
        page = (run / "snapshots" / snap["file"]).read_text()
        names = [t["name"] for t in figure_traces(page)]
        assert names[-4:] == [f"component_{k + 1}: {t}" for k, t in enumerate(TEXTS)]
        assert "fit" in names
    before = {p.name: p.read_bytes() for p in (run / "snapshots").glob("*.html")}
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    # The rebuilt pages (from the stored columns) are the ones training wrote.
    assert {p.name: p.read_bytes() for p in (run / "snapshots").glob("*.html")} == before
    report = (run / "report.html").read_text()
    fit_figure = report[report.index('id="fit"') :]
    names = [t["name"] for t in figure_traces(fit_figure)]
    assert [n for n in names if n.startswith("component_")] == [
        f"component_{k + 1}: {t}" for k, t in enumerate(TEXTS)
    ]
    # The animation's frames move the fit and every component.
    frames = re.findall(r'"traces":\[([0-9,]+)\]', fit_figure)
    assert frames and all(len(f.split(",")) == 5 for f in frames)


def test_basis_components_are_coefficient_times_function(runner, tmp_path):
    raw = {
        **RAW,
        "data": {**RAW["data"], "target": "1 + 0.5*x - 0.2*x**2"},
        "model": {"basis": ["1", "x", "x**2"], "init": [0.0, 0.0, 0.0]},
        "optimizer": {"name": "SGD", "lr": 0.001},
    }
    _, run = train(runner, raw, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["components"] == ["theta0*1", "theta1*x", "theta2*x**2"]
    snap = json.loads((run / "snapshots" / "params.json").read_text())["snapshots"][-1]
    fit = read_fit(run / "snapshots" / snap["fit"])
    t = snap["params"]
    x = fit["x"]
    want = [t["theta0"] * np.ones_like(x), t["theta1"] * x, t["theta2"] * x**2]
    got = [fit[f"component_{k}"] for k in (1, 2, 3)]
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(np.sum(got, axis=0), fit["y_fit"], rtol=1e-12, atol=1e-13)


def test_a_model_of_one_term_has_no_component_columns(runner, tmp_path):
    raw = {**RAW, "model": {"expr": "a*exp(-((x-c)/s)**2)", "params": {"c": 1.0}}}
    _, run = train(runner, raw, tmp_path)
    assert "components" not in json.loads((run / "summary.json").read_text())
    header = (run / "snapshots" / "epoch-00.csv").read_text().splitlines()[0]
    assert header == "x,y_fit"


def test_a_sweep_of_a_tied_composed_model_is_what_train_writes(runner, tmp_path):
    path, _ = train(runner, RAW, tmp_path, "base")
    axes = ["optimizer={name: Adam, lr: 0.02},{name: LM}"]
    out = tmp_path / "sweep"
    result = runner.invoke(app, ["sweep", str(path), *axes, "-o", str(out), "--progress", "none"])
    assert result.exit_code == 0, result.output
    (sweep_dir,) = [p for p in out.iterdir() if p.is_dir()]
    with (sweep_dir / "runs.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for k, (row, optimizer) in enumerate(
        zip(rows, ["{name: Adam, lr: 0.02}", "{name: LM}"], strict=True)
    ):
        ref = tmp_path / f"ref{k}"
        res = runner.invoke(
            app,
            ["train", str(path), f"optimizer={optimizer}", "--run-dir", str(ref),
             "--progress", "none"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        assert_same_run(ref, sweep_dir / row["run_dir"])
        summary = json.loads((ref / "summary.json").read_text())
        assert summary["tied"] == {"s2": "s1", "c2": "c1 + d"}
        assert summary["components"] == TEXTS


def test_a_model_of_the_most_terms_is_stored_and_rebuilt(runner, tmp_path):
    # 250 terms is what MAX_NODES allows: its fitted curves pass the snapshots' usual 4 MiB.
    terms = 250
    raw = {
        **RAW,
        "epochs": 2,
        "snapshots": 1,
        "model": {
            "expr": " + ".join(f"p{k}" for k in range(terms)),
            "params": {f"p{k}": 0.1234567890123 + k / 7 for k in range(terms)},
        },
        "optimizer": {"name": "Adam", "lr": 0.001},
    }
    _, run = train(runner, raw, tmp_path)
    fit = run / "snapshots" / "epoch-2.csv"
    assert fit.stat().st_size > 4 * 2**20
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    assert len(read_fit(fit)) == 2 + terms
