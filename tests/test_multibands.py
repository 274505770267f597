"""Bands, predict and intervals of a model of several independent variables, at the data points:
checked against a numpy delta method (finite-difference Jacobian, scipy's t and normal
quantiles, a scipy least-squares refit), the model evaluated by numpy, and lmfit's
`conf_interval` on the same stacked problem."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats
from scipy.optimize import least_squares
from typer.testing import CliRunner

import fitcli
from fitcli import bands
from fitcli.cli import app

runner = CliRunner()

EXPR = "a*exp(-b*u) + c*v"
START = {"a": 1.0, "b": 0.5, "c": 0.0}
SURFACE = {
    "name": "surface",
    "seed": 4,
    "device": "cpu",
    "epochs": 50,
    "snapshots": 2,
    "data": {
        "target": "2*exp(-0.7*u) + 0.5*v",
        "x": {"u": {"start": 0, "stop": 3, "num": 8}, "v": {"start": -1, "stop": 1, "num": 6}},
        "noise": {"std": 0.05},
    },
    "model": {"expr": EXPR, "params": START},
    "optimizer": {"name": "LM"},
}
HEADER = ["u", "v", "fit", *bands.column_names([0.68, 0.95])]


def model_np(p: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    a, b, c = p
    return a * np.exp(-b * u) + c * v


def train(tmp_path: Path, cfg: dict, name: str = "run") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = tmp_path / name
    res = runner.invoke(app, ["train", str(path), "--run-dir", str(run), "--progress", "none"])
    assert res.exit_code == 0, res.output
    return run


def read_csv(path: Path) -> dict[str, np.ndarray]:
    head, *rows = path.read_text().splitlines()
    table = np.array([[float(v) for v in row.split(",")] for row in rows])
    return {c: table[:, k] for k, c in enumerate(head.split(","))}


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def surface(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("surface"), SURFACE)


def numpy_bands(u, v, y, sigma=None, at=None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The fit by scipy's least squares and its delta-method bands at `at` (default: the data
    points), with a central-difference Jacobian: what bands.csv should hold, computed apart."""
    w = np.ones_like(y) if sigma is None else 1.0 / sigma
    fit = least_squares(
        lambda p: (model_np(p, u, v) - y) * w, list(START.values()), xtol=1e-15, ftol=1e-15
    )
    p = fit.x
    au, av = (u, v) if at is None else at

    def jac(uu, vv):
        cols = []
        for k in range(3):
            h = 1e-6 * max(1.0, abs(p[k]))
            step = np.zeros(3)
            step[k] = h
            cols.append((model_np(p + step, uu, vv) - model_np(p - step, uu, vv)) / (2 * h))
        return np.column_stack(cols)

    j = jac(u, v) * w[:, None]
    dof = y.size - 3
    rss = float(np.sum(((model_np(p, u, v) - y) * w) ** 2))
    s2 = rss / dof
    cov = np.linalg.inv(j.T @ j) * (1.0 if sigma is not None else s2)
    g = jac(au, av)
    var = np.einsum("ij,jk,ik->i", g, cov, g)
    noise = s2 if sigma is None else sigma**2
    f = model_np(p, au, av)
    out = {"fit": f}
    for kind, total in (("conf", var), ("pred", var + noise)):
        for level in (0.68, 0.95):
            tail = 0.5 + level / 2
            q = stats.t.ppf(tail, dof) if sigma is None else stats.norm.ppf(tail)
            tag = bands.level_tag(level)
            out[f"{kind}_lower_{tag}"] = f - q * np.sqrt(total)
            out[f"{kind}_upper_{tag}"] = f + q * np.sqrt(total)
    return p, out


# -- bands.csv at the data points ---------------------------------------------------------------


def test_bands_of_two_variables_are_the_numpy_delta_method_at_the_data_points(surface):
    got = read_csv(surface / "bands.csv")
    assert list(got) == HEADER  # the variables in the config's order, then fit and the bands
    data = read_csv(surface / "data.csv")
    np.testing.assert_array_equal(got["u"], data["u"])  # data.csv's rows, in its order
    np.testing.assert_array_equal(got["v"], data["v"])
    p, want = numpy_bands(data["u"], data["v"], data["y"])
    summary = summary_of(surface)
    np.testing.assert_allclose([summary["params"][k] for k in START], p, rtol=1e-7)
    for column, values in want.items():
        np.testing.assert_allclose(got[column], values, rtol=1e-6, err_msg=column)
    assert summary["bands"] == {
        "levels": [0.68, 0.95],
        "quantile": "student_t",
        "dof": 48 - 3,
        "file": "bands.csv",
        "prediction": "bands.csv",
        "snapshot": 50,
    }
    assert not (surface / "bands_data.csv").exists()


def test_with_sigma_the_prediction_band_of_several_variables_is_in_bands_csv(tmp_path):
    rng = np.random.default_rng(8)
    u, v = np.meshgrid(np.linspace(0, 3, 7), np.linspace(-1, 1, 5), indexing="ij")
    u, v = u.ravel(), v.ravel()
    sigma = np.linspace(0.02, 0.1, u.size)
    y = model_np(np.array([2.0, 0.7, 0.5]), u, v) + rng.normal(0, sigma)
    rows = zip(v.tolist(), y.tolist(), u.tolist(), sigma.tolist(), strict=True)
    (tmp_path / "d.csv").write_text(
        "pres,obs,temp,err\n" + "".join(",".join(map(repr, r)) + "\n" for r in rows)
    )
    cfg = {
        **SURFACE,
        "data": {
            "file": str(tmp_path / "d.csv"),
            "columns": {"x": {"u": "temp", "v": "pres"}, "y": "obs", "sigma": "err"},
        },
    }
    run = train(tmp_path, cfg)
    got = read_csv(run / "bands.csv")
    assert list(got) == HEADER
    _, want = numpy_bands(u, v, y, sigma)
    for column, values in want.items():
        np.testing.assert_allclose(got[column], values, rtol=1e-6, err_msg=column)
    record = summary_of(run)["bands"]
    assert record["quantile"] == "normal" and record["prediction"] == "bands.csv"
    assert not (run / "bands_data.csv").exists()


def _digests(run: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run / "snapshots").glob("*.html"))
    }


def test_the_final_snapshot_and_report_draw_the_bands_and_plot_rebuilds_them(surface, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(surface, run)
    final = run / "snapshots" / f"epoch-{summary_of(run)['bands']['snapshot']:02d}.html"
    for page in sorted((run / "snapshots").glob("*.html")):
        assert ("95% confidence band" in page.read_text()) == (page == final), page.name
    before = _digests(run)
    assert runner.invoke(app, ["plot", str(run)]).exit_code == 0
    assert _digests(run) == before  # rebuilt from bands.csv, byte for byte
    report = (run / "report.html").read_text()
    assert 'id="fitcli-bands"' in report and "95% prediction band" in report
    assert "Student&#x27;s t quantile with 45 degrees of freedom" in report


def test_bands_csv_of_other_points_is_named_by_fitcli_plot(surface, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(surface, run)
    head, first, *rest = (run / "bands.csv").read_text().splitlines()
    cells = first.split(",")
    cells[0] = "7"  # u of the first point is 0
    (run / "bands.csv").write_text("\n".join([head, ",".join(cells), *rest]) + "\n")
    res = runner.invoke(app, ["plot", str(run)])
    assert res.exit_code == 2
    assert "bands.csv: its points are not those of data.csv" in res.output


def test_a_singular_fit_of_several_variables_has_no_bands_and_says_why(tmp_path):
    cfg = {**SURFACE, "model": {"expr": "a*u + b*u + c*v", "params": START}}
    run = train(tmp_path, cfg)
    assert summary_of(run)["uncertainty"]["status"] == "singular"
    assert not (run / "bands.csv").exists()
    assert summary_of(run)["bands"]["skipped"].startswith("the error bars are singular (")
    assert runner.invoke(app, ["plot", str(run)]).exit_code == 0
    assert "No bands: the error bars are singular" in (run / "report.html").read_text()


# -- predict --------------------------------------------------------------------------------


def test_predict_of_several_variables_cli_and_api_agree_with_numpy(surface, tmp_path):
    new_u = np.array([0.25, 1.5, 2.75, 4.0])
    new_v = np.array([-0.5, 0.0, 0.9, 2.0])
    points = tmp_path / "new.csv"
    points.write_text(
        "v,u\n"
        + "".join(f"{b!r},{a!r}\n" for a, b in zip(new_u.tolist(), new_v.tolist(), strict=True))
    )
    res = runner.invoke(app, ["predict", str(surface), "--x-file", str(points), "--json"])
    assert res.exit_code == 0, res.output
    cli = {k: np.array(v) for k, v in json.loads(res.stdout).items()}
    assert list(cli) == ["u", "v", "fit", *bands.column_names([0.95])]
    np.testing.assert_array_equal(cli["u"], new_u)
    np.testing.assert_array_equal(cli["v"], new_v)
    result = fitcli.load(surface)
    p = np.array([result.params[k] for k in START])
    np.testing.assert_allclose(cli["fit"], model_np(p, new_u, new_v), rtol=1e-13)
    api = result.predict({"u": new_u, "v": new_v}, band=0.95)
    assert isinstance(api, dict) and list(api) == list(cli)[2:]
    for k, values in api.items():
        np.testing.assert_allclose(cli[k], values, rtol=1e-14, err_msg=k)
    frame = result.predict(pd.DataFrame({"v": new_v, "u": new_u, "other": 0.0}))
    np.testing.assert_array_equal(frame, api["fit"])
    np.testing.assert_array_equal(result.predict(np.column_stack([new_u, new_v])), api["fit"])
    data = read_csv(surface / "data.csv")
    _, want = numpy_bands(data["u"], data["v"], data["y"], at=(new_u, new_v))
    for k in api:
        np.testing.assert_allclose(api[k], want[k], rtol=1e-6, err_msg=k)
    # at the data points, predict gives bands.csv's rows
    stored = read_csv(surface / "bands.csv")
    at_data = result.predict({"u": stored["u"], "v": stored["v"]}, band=0.68)
    for k, values in at_data.items():
        np.testing.assert_allclose(values, stored[k], rtol=1e-12, err_msg=k)


def test_predict_x_file_of_several_variables_reads_the_config_columns(tmp_path):
    rng = np.random.default_rng(2)
    u, v = rng.uniform(0, 3, 30), rng.uniform(-1, 1, 30)
    y = model_np(np.array([2.0, 0.7, 0.5]), u, v) + rng.normal(0, 0.05, 30)
    rows = zip(u.tolist(), v.tolist(), y.tolist(), strict=True)
    (tmp_path / "d.csv").write_text(
        "temp,pres,obs\n" + "".join(",".join(map(repr, r)) + "\n" for r in rows)
    )
    cfg = {
        **SURFACE,
        "data": {"file": str(tmp_path / "d.csv"), "columns": {"x": ["temp", "pres"], "y": "obs"}},
        "model": {"expr": "a*exp(-b*temp) + c*pres", "params": START},
    }
    run = train(tmp_path, cfg)
    assert list(read_csv(run / "bands.csv"))[:3] == ["temp", "pres", "fit"]
    (tmp_path / "new.csv").write_text("pres,temp\n0.5,1.0\n")
    out = tmp_path / "pred.csv"
    res = runner.invoke(
        app, ["predict", str(run), "--x-file", str(tmp_path / "new.csv"), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    pred = read_csv(out)
    assert list(pred) == ["temp", "pres", "fit", *bands.column_names([0.95])]
    p = np.array([summary_of(run)["params"][k] for k in START])
    np.testing.assert_allclose(pred["fit"], model_np(p, np.array([1.0]), np.array([0.5])))
    # predict's own output reads back as new points
    again = runner.invoke(app, ["predict", str(run), "--x-file", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["fit"] == pred["fit"].tolist()
    (tmp_path / "bad.csv").write_text("temp,p\n1,2\n")
    bad = runner.invoke(app, ["predict", str(run), "--x-file", str(tmp_path / "bad.csv")])
    assert bad.exit_code == 2
    assert "no column 'pres' for the variable pres" in bad.output


def test_predict_linspace_of_several_variables_exits_2_pointing_at_x_file(surface):
    res = runner.invoke(app, ["predict", str(surface), "--x", "0:1:5"])
    assert res.exit_code == 2
    assert "this run's model has 2 (u, v)" in res.output
    assert "--x-file FILE with the columns u, v" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize(
    ("x", "message"),
    [
        ({"u": [1.0]}, "x: missing v; the model's variables are u, v"),
        ({"u": [1.0], "v": [1.0], "w": [1.0]}, "x: unknown w"),
        ({"u": [1.0, 2.0], "v": [1.0]}, "different numbers of values (u: 2, v: 1)"),
        ([1.0, 2.0], "give x as a mapping of each name to its values"),
        ({"u": [1.0], "v": [float("nan")]}, "x['v'][0] is nan"),
    ],
)
def test_predict_of_several_variables_names_what_is_wrong_with_x(surface, x, message):
    with pytest.raises(fitcli.DataError) as info:
        fitcli.load(surface).predict(x)
    assert message in str(info.value)


# -- intervals ------------------------------------------------------------------------------


def test_profile_ci_of_several_variables_matches_lmfit_conf_interval(surface, tmp_path):
    import lmfit

    run = tmp_path / "copy"
    shutil.copytree(surface, run)  # fitcli ci writes into the run directory
    res = runner.invoke(app, ["ci", str(run), "--method", "profile", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    data = read_csv(surface / "data.csv")

    def residual(params):
        return data["y"] - model_np(
            np.array([params[k].value for k in START]), data["u"], data["v"]
        )

    params = lmfit.Parameters()
    for k, entry in doc["params"].items():
        params.add(k, value=entry["estimate"])
    mini = lmfit.Minimizer(residual, params)
    best = mini.minimize(method="leastsq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ci = lmfit.conf_interval(mini, best, sigmas=[0.95])
    for k, entry in doc["params"].items():
        (iv,) = entry["intervals"]
        (_, lo), (_, est), (_, hi) = ci[k]
        assert entry["estimate"] - iv["lower"] == pytest.approx(est - lo, rel=1e-3), k
        assert iv["upper"] - entry["estimate"] == pytest.approx(hi - est, rel=1e-3), k
    boot = runner.invoke(app, ["ci", str(run), "--method", "bootstrap", "--samples", "50"])
    assert boot.exit_code == 0, boot.output


# -- relative sigma -------------------------------------------------------------------------


def test_bands_with_relative_sigma_use_t_and_the_scaled_noise_as_curve_fit(tmp_path):
    """`data.absolute_sigma: false`: sigma are relative weights, the covariance is curve_fit's
    pcov (scaled by the reduced chi-square), so the quantile is Student's t and a new
    observation's variance is s² sigma², not sigma²."""
    from scipy.optimize import curve_fit

    rng = np.random.default_rng(1)
    x = np.linspace(0.0, 3.0, 30)
    sigma = np.linspace(1.0, 2.0, x.size)
    y = 1.0 + 2.0 * x + rng.normal(0.0, 0.1 * sigma)
    run = tmp_path / "rel"
    r = fitcli.fit(
        x=x, y=y, sigma=sigma, basis=["1", "x"], run_dir=run, **{"data.absolute_sigma": False}
    )
    p, pcov = curve_fit(lambda t, a, b: a + b * t, x, y, sigma=sigma, absolute_sigma=False)
    s2 = float(np.sum(((y - (p[0] + p[1] * x)) / sigma) ** 2)) / (x.size - 2)
    g = np.column_stack([np.ones_like(x), x])
    var = np.einsum("ij,jk,ik->i", g, pcov, g)
    q = stats.t.ppf(0.975, x.size - 2)
    got = r.predict(x, band=0.95, sigma=sigma)
    assert isinstance(got, dict)
    np.testing.assert_allclose(got["conf_upper_95"] - got["fit"], q * np.sqrt(var), rtol=1e-7)
    half = q * np.sqrt(var + s2 * sigma**2)
    np.testing.assert_allclose(got["pred_upper_95"] - got["fit"], half, rtol=1e-7)
    record = summary_of(run)["bands"]
    assert record["quantile"] == "student_t" and record["prediction"] == "bands_data.csv"
    points = read_csv(run / "bands_data.csv")
    np.testing.assert_allclose(points["pred_upper_95"] - points["fit"], half, rtol=1e-7)


def test_the_api_figure_of_several_variables_has_a_panel_per_variable(surface):
    r = fitcli.load(surface)
    fig = r.figure()
    data = read_csv(surface / "data.csv")
    fitted = [t for t in fig.data if t.name == "fit"]
    # One fitted trace against each variable, at the data points, equal to the model there.
    assert len(fitted) == 2
    for trace, name in zip(fitted, ("u", "v"), strict=True):
        np.testing.assert_array_equal(np.asarray(trace.x), data[name])
        np.testing.assert_allclose(
            np.asarray(trace.y),
            model_np(np.array([r.params[k] for k in "abc"]), data["u"], data["v"]),
            rtol=1e-12,
        )
    page = r._repr_html_()
    assert "<pre>" in page and "plotly" in page
