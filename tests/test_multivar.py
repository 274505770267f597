"""Several independent variables: named columns in expressions, full synthetic grids, the
per-variable snapshot panels, and name errors; fits checked against scipy's curve_fit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import curve_fit

from fitcli.cli import app
from fitcli.expr import parse_expression
from fitcli.symdiff import compile_jacobian


def _train(runner, tmp_path: Path, text: str, name: str = "run"):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(text)
    run_dir = tmp_path / name
    result = runner.invoke(app, ["train", str(cfg), "--run-dir", str(run_dir), "--json"])
    return result, run_dir


def _nelson_like(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    # Nelson's model (NIST StRD): log(y) = b1 - b2*x1*exp(-b3*x2), on a 2-predictor design.
    rng = np.random.default_rng(3)
    x1 = np.repeat([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 48.0, 64.0], 6)
    x2 = np.tile([180.0, 225.0, 250.0, 275.0, 200.0, 240.0], 8)
    b = (2.59, 5.6e-9, -6.1e-2)
    y = b[0] - b[1] * x1 * np.exp(-b[2] * x2) + rng.normal(0, 0.05, x1.size)
    path = tmp_path / "nelson.csv"
    rows = "\n".join(
        f"{a!r},{c!r},{v!r}" for a, c, v in zip(x1.tolist(), x2.tolist(), y.tolist(), strict=True)
    )
    path.write_text("x1,x2,logy\n" + rows + "\n")
    return path, np.column_stack([x1, x2]), y


def _train_nelson(runner, tmp_path: Path, path: Path, start: dict, epochs: int = 200):
    # Nelson's model by LM on a CSV of x1, x2 and logy.
    params = ", ".join(f"{k}: {v!r}" for k, v in start.items())
    text = f"""
epochs: {epochs}
snapshots: 2
data:
  file: {path}
  columns: {{x: [x1, x2], y: logy}}
model:
  expr: "b1 - b2*x1*exp(-b3*x2)"
  params: {{{params}}}
optimizer: {{name: LM}}
"""
    return _train(runner, tmp_path, text)


def test_two_predictor_model_matches_curve_fit(runner, tmp_path):
    path, x, y = _nelson_like(tmp_path)
    result, run_dir = _train_nelson(runner, tmp_path, path, {"b1": 2.5, "b2": 5.0e-9, "b3": -0.06})
    assert result.exit_code == 0, result.output
    s = json.loads((run_dir / "summary.json").read_text())

    def f(xx, b1, b2, b3):
        return b1 - b2 * xx[:, 0] * np.exp(-b3 * xx[:, 1])

    popt, pcov = curve_fit(f, x, y, p0=(2.5, 5e-9, -0.06), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    got = np.array([s["params"][k] for k in ("b1", "b2", "b3")])
    np.testing.assert_allclose(got, popt, rtol=1e-6)
    err = np.array([s["stderr"][k] for k in ("b1", "b2", "b3")])
    np.testing.assert_allclose(err, np.sqrt(np.diag(pcov)), rtol=1e-5)
    assert s["variables"] == ["x1", "x2"]
    # data.csv: the variables' columns, then y; the snapshot CSV: the fit at the data points.
    assert (run_dir / "data.csv").read_text().splitlines()[0] == "x1,x2,y"
    fit_csv = sorted((run_dir / "snapshots").glob("epoch-*.csv"))[-1]
    lines = fit_csv.read_text().splitlines()
    assert lines[0].startswith("x1,x2,y_fit") and len(lines) == 1 + y.size
    last = np.array([float(v.split(",")[2]) for v in lines[1:]])
    np.testing.assert_allclose(last, f(x, *got), rtol=1e-9)


GAUSS2D = "A / (2*pi*sx*sy) * exp(-(u - cx)**2 / (2*sx**2) - (v - cy)**2 / (2*sy**2)) + c0"


def test_gaussian_2d_on_a_grid_matches_curve_fit_and_draws_a_heatmap(runner, tmp_path):
    result, run_dir = _train(
        runner,
        tmp_path,
        f"""
seed: 4
epochs: 100
snapshots: 2
data:
  target: "{
            GAUSS2D.replace("A", "30")
            .replace("sx", "1.2")
            .replace("sy", "0.8")
            .replace("cx", "0.3")
            .replace("cy", "-0.4")
            .replace("c0", "0.5")
        }"
  x: {{u: {{start: -3, stop: 3, num: 15}}, v: {{start: -3, stop: 3, num: 15}}}}
  noise: {{std: 0.05}}
model:
  expr: "{GAUSS2D}"
  params: {{A: 20, cx: 0, cy: 0, sx: 1, sy: 1, c0: 0}}
optimizer: {{name: LM}}
""",
    )
    assert result.exit_code == 0, result.output
    s = json.loads((run_dir / "summary.json").read_text())
    data = np.loadtxt(run_dir / "data.csv", delimiter=",", skiprows=1)
    assert data.shape == (225, 4)  # u, v, y, y_true
    # the full grid, the first variable varying slowest
    np.testing.assert_array_equal(data[:15, 0], -3.0)
    np.testing.assert_allclose(data[:15, 1], np.linspace(-3, 3, 15))

    def g(xx, A, cx, cy, sx, sy, c0):
        u, v = xx[:, 0], xx[:, 1]
        return (
            A
            / (2 * np.pi * sx * sy)
            * np.exp(-((u - cx) ** 2) / (2 * sx**2) - (v - cy) ** 2 / (2 * sy**2))
            + c0
        )

    names = ("A", "cx", "cy", "sx", "sy", "c0")
    popt, pcov = curve_fit(g, data[:, :2], data[:, 2], p0=(20, 0, 0, 1, 1, 0), xtol=1e-15)
    got = np.array([s["params"][k] for k in names])
    np.testing.assert_allclose(got, popt, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose([s["stderr"][k] for k in names], np.sqrt(np.diag(pcov)), rtol=1e-5)
    # The figure: per-variable panels (observed, fit, residual against u and against v) and a
    # heatmap of the fit on the grid; `fitcli plot` rebuilds the same page.
    from fitcli import plots
    from fitcli.rundir.reader import read_run

    run = read_run(run_dir)
    last = run.snapshots[-1]
    fig = plots.variables_figure(
        title="t", variables=run.variables, x=run.data["x"], y=run.data["y"], y_fit=last.y_fit
    )
    kinds = [t["type"] for t in fig["data"]]
    assert kinds.count("heatmap") == 1
    titles = {fig["layout"][k]["title"]["text"] for k in ("xaxis", "xaxis3")}
    assert titles == {"u", "v"}
    heat = next(t for t in fig["data"] if t["type"] == "heatmap")
    np.testing.assert_allclose(np.array(heat["z"]).T.ravel(), last.y_fit)
    page = (run_dir / "snapshots" / last.file).read_text()
    assert '"heatmap"' in page
    before = page
    assert runner.invoke(app, ["plot", str(run_dir)]).exit_code == 0
    assert (run_dir / "snapshots" / last.file).read_text() == before
    assert "Fit" in (run_dir / "report.html").read_text()


def test_three_variables_show_observed_against_fitted(runner, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (40, 3))
    y = 1 + 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2]
    path = tmp_path / "d.csv"
    path.write_text(
        "a,b,c,y\n"
        + "\n".join(
            ",".join(map(repr, [*r, v])) for r, v in zip(x.tolist(), y.tolist(), strict=True)
        )
    )
    result, run_dir = _train(
        runner,
        tmp_path,
        f"""
epochs: 20
snapshots: 1
data: {{file: {path}, columns: {{x: {{p: a, q: b, r: c}}}}}}
model: {{expr: "w0 + w1*p + w2*q + w3*r"}}
optimizer: {{name: LM}}
""",
    )
    assert result.exit_code == 0, result.output
    s = json.loads((run_dir / "summary.json").read_text())
    coef, *_ = np.linalg.lstsq(np.column_stack([np.ones(40), x]), y, rcond=None)
    np.testing.assert_allclose([s["params"][f"w{j}"] for j in range(4)], coef, atol=1e-9)
    page = next((run_dir / "snapshots").glob("*.html")).read_text()
    assert '"fitted"' in page and "heatmap" not in page


def test_several_variables_on_both_jacobian_paths_match_autograd():
    e = parse_expression(
        "b1 - b2*T*exp(-b3*P) + where(T > 0.5, sin(P*b1), 0)", variables=("T", "P")
    )
    assert e.params == ("b1", "b2", "b3")
    x = torch.rand(50, 2, dtype=torch.float64)
    theta = torch.tensor([0.7, 1.3, 0.4], dtype=torch.float64, requires_grad=True)
    y = e(x, dict(zip(e.params, theta, strict=True)))
    auto = torch.stack([torch.autograd.grad(y[i], theta, retain_graph=True)[0] for i in range(50)])
    yn, jac = compile_jacobian(e, e.params)(
        x.numpy(), dict(zip(e.params, [0.7, 1.3, 0.4], strict=True))
    )
    np.testing.assert_allclose(yn, y.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(jac, auto.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("columns", "params", "words"),
    [
        ("[sin, P]", "", "'sin' is a function"),
        ("[T, pi]", "", "'pi' is"),
        ("{T: 0, gaussian: 1}", "", "'gaussian' is a lineshape"),
        ("[T, P]", "params: {P: 1.0}", "'P' is also a parameter"),
        ("{1T: 0, P: 1}", "", "not a valid variable name"),
        ("{T: 0, T_: 1, _: 2}", "", "not a valid variable name"),
        ("[T, T]", "", "given twice"),
    ],
)
def test_bad_variable_names_exit_2_naming_data_columns_x(runner, tmp_path, columns, params, words):
    path = tmp_path / "d.csv"
    path.write_text("T,P,y\n1,2,3\n2,3,4\n3,4,5\n")
    result, run_dir = _train(
        runner,
        tmp_path,
        f"""
data: {{file: {path}, columns: {{x: {columns}, y: 2}}}}
model:
  expr: "a*T"
  {params}
""",
    )
    assert result.exit_code == 2, result.output
    assert "data.columns.x" in result.stderr and words in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert not run_dir.exists()


def test_x_in_an_expression_of_named_variables_is_an_error(runner, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("T,P,y\n1,2,3\n2,3,4\n3,4,5\n")
    result, _ = _train(
        runner, tmp_path, f"data: {{file: {path}, columns: {{x: [T, P]}}}}\nmodel: {{expr: a*x}}\n"
    )
    assert result.exit_code == 2
    assert "x is not a variable" in result.stderr and "T, P" in result.stderr


def test_the_gaussian2d_lineshape_fits_two_variables_as_lmfit_defines_it(runner, tmp_path):
    # lmfit's gaussian2d(x, y, amplitude, centerx, centery, sigmax, sigmay) over two variables
    from lmfit import lineshapes as ls

    result, run_dir = _train(
        runner,
        tmp_path,
        """
seed: 5
epochs: 100
snapshots: 1
data:
  target: "30/(2*pi*1.2*0.8)*exp(-(u - 0.3)**2/(2*1.2**2) - (v + 0.4)**2/(2*0.8**2)) + 0.5"
  x: {u: {start: -3, stop: 3, num: 15}, v: {start: -3, stop: 3, num: 15}}
  noise: {std: 0.05}
model:
  expr: "gaussian2d(u, v, A, cx, cy, sx, sy) + c0"
  params: {A: 20, cx: 0, cy: 0, sx: 1, sy: 1, c0: 0}
optimizer: {name: LM}
""",
    )
    assert result.exit_code == 0, result.output
    s = json.loads((run_dir / "summary.json").read_text())
    data = np.loadtxt(run_dir / "data.csv", delimiter=",", skiprows=1)

    def g(xx, A, cx, cy, sx, sy, c0):
        return ls.gaussian2d(xx[:, 0], xx[:, 1], A, cx, cy, sx, sy) + c0

    names = ("A", "cx", "cy", "sx", "sy", "c0")
    popt, pcov = curve_fit(g, data[:, :2], data[:, 2], p0=(20, 0, 0, 1, 1, 0), xtol=1e-15)
    np.testing.assert_allclose([s["params"][k] for k in names], popt, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose([s["stderr"][k] for k in names], np.sqrt(np.diag(pcov)), rtol=1e-5)


def test_overrides_reach_each_grid_variable_and_still_catch_typos(tmp_path):
    from fitcli.config import load_config

    shipped = Path(__file__).resolve().parent.parent / "configs" / "surface-2d.yaml"
    cfg = load_config(shipped, ["data.x.u.num=7", "data.x.v.stop=2.5"])
    assert cfg.data.x["u"].num == 7 and cfg.data.x["v"].stop == 2.5
    # A variable the config does not have is still an unknown key, with the names it has.
    with pytest.raises(Exception, match=r"unknown key 'data.x.w'.*did you mean|valid keys"):
        load_config(shipped, ["data.x.w.num=7"])


def _nelson() -> tuple[dict[str, list[float]], np.ndarray]:
    # NIST's Nelson.dat: b lines (start 1, start 2, certified value, certified stderr), then the
    # rows y x1 x2 after its "Data:   y  x1  x2" line.
    from nist_problems import _PARAM_LINE

    lines = (Path(__file__).parent / "data" / "nist" / "Nelson.dat").read_text().splitlines()
    params = [m.groups()[1:] for m in map(_PARAM_LINE.match, lines) if m]
    cols = ("start1", "start2", "certified", "stderr")
    spec = {c: [float(p[k]) for p in params] for k, c in enumerate(cols)}
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["Data:", "y"])
    return spec, np.array([[float(v) for v in line.split()] for line in lines[head + 1 :]])


@pytest.mark.parametrize("start", ["start1", "start2"])
def test_nist_nelson_reaches_the_certified_values_from_both_starts(runner, tmp_path, start):
    # NIST StRD's two-predictor problem: log(y) = b1 - b2*x1*exp(-b3*x2), 128 observations;
    # parameters and standard errors against NIST's certified values (LRE, as the NIST suite).
    from nist_problems import worst_lre

    spec, rows = _nelson()
    assert rows.shape == (128, 3)
    path = tmp_path / "nelson.csv"
    text = "\n".join(f"{x1!r},{x2!r},{math.log(y)!r}" for y, x1, x2 in rows.tolist())
    path.write_text("x1,x2,logy\n" + text + "\n")
    b = dict(zip(("b1", "b2", "b3"), spec[start], strict=True))
    result, run_dir = _train_nelson(runner, tmp_path, path, b, epochs=1000)
    assert result.exit_code == 0, result.output
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["converged"] is True
    assert worst_lre([s["params"][k] for k in b], spec["certified"]) >= 7
    assert worst_lre([s["stderr"][k] for k in b], spec["stderr"]) >= 6
    assert s["rss"] == pytest.approx(3.7976833176, rel=1e-9)


def test_the_shipped_nelson_data_are_nists_log_y():
    _, rows = _nelson()
    shipped = np.loadtxt(
        Path(__file__).parents[1] / "configs" / "data" / "nelson.csv", delimiter=",", skiprows=1
    )
    np.testing.assert_array_equal(shipped[:, :2], rows[:, 1:])
    np.testing.assert_allclose(shipped[:, 2], np.log(rows[:, 0]), rtol=1e-15)
