"""Confidence and prediction bands (`fitcli.bands`): against the exact formula by numpy for a
linear model and lmfit's `eval_uncertainty` for a nonlinear one, their coverage measured on
1,000 simulated replicates, bands.csv and bands_data.csv as `fitcli train` writes them, the
skip of a singular fit, the drawn bands, and `report.levels`."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from typer.testing import CliRunner

import fitcli
from fitcli import bands
from fitcli.cli import app
from fitcli.config import config_from_dict
from fitcli.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import band_coverage as coverage  # noqa: E402  (benchmarks/band_coverage.py)

runner = CliRunner()

QUADRATIC = {
    "name": "quadratic",
    "seed": 3,
    "device": "cpu",
    "epochs": 30,
    "snapshots": 2,
    "data": {
        "target": "1 + 2*x - 0.5*x**2",
        "x": {"start": 0, "stop": 4, "num": 40},
        "noise": {"std": 0.3},
    },
    "model": {"basis": ["1", "x", "x**2"]},
    "optimizer": {"name": "LM"},
}


def train(tmp_path: Path, cfg: dict, *args: str, name: str = "run") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run = tmp_path / name
    res = runner.invoke(
        app, ["train", str(path), *args, "--run-dir", str(run), "--progress", "none"]
    )
    assert res.exit_code in (0, 3), res.output
    return run


def read_csv(path: Path) -> dict[str, np.ndarray]:
    head, *rows = path.read_text().splitlines()
    table = np.array([[float(v) for v in row.split(",")] for row in rows])
    return {c: table[:, k] for k, c in enumerate(head.split(","))}


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# -- the bands against independent computations -------------------------------------------------


def test_bands_csv_is_the_exact_linear_formula_by_numpy_on_a_1000_point_grid(tmp_path):
    run = train(tmp_path, QUADRATIC)
    data = read_csv(run / "data.csv")
    got = read_csv(run / "bands.csv")
    assert list(got) == [
        "x",
        "fit",
        "conf_lower_68",
        "conf_upper_68",
        "conf_lower_95",
        "conf_upper_95",
        "pred_lower_68",
        "pred_upper_68",
        "pred_lower_95",
        "pred_upper_95",
    ]
    x, y = data["x"], data["y"]
    np.testing.assert_array_equal(got["x"], np.linspace(x.min(), x.max(), 1000))
    design = np.column_stack([np.ones_like(x), x, x**2])
    beta, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = x.size - 3
    s2 = rss[0] / dof
    inv = np.linalg.inv(design.T @ design)
    x0 = np.column_stack([np.ones_like(got["x"]), got["x"], got["x"] ** 2])
    fit = x0 @ beta
    var = s2 * np.einsum("ij,jk,ik->i", x0, inv, x0)  # s² x0^T (X^T X)^-1 x0
    np.testing.assert_allclose(got["fit"], fit, rtol=1e-10)
    for level, tag in ((0.68, "68"), (0.95, "95")):
        t = stats.t.ppf(0.5 + level / 2, dof)
        np.testing.assert_allclose(got[f"conf_upper_{tag}"] - fit, t * np.sqrt(var), rtol=1e-8)
        np.testing.assert_allclose(fit - got[f"conf_lower_{tag}"], t * np.sqrt(var), rtol=1e-8)
        half = t * np.sqrt(var + s2)
        np.testing.assert_allclose(got[f"pred_upper_{tag}"] - fit, half, rtol=1e-8)
        np.testing.assert_allclose(fit - got[f"pred_lower_{tag}"], half, rtol=1e-8)
    record = summary_of(run)["bands"]
    assert record["levels"] == [0.68, 0.95] and record["quantile"] == "student_t"
    assert record["dof"] == dof and record["prediction"] == "bands.csv"


def test_nonlinear_bands_match_lmfit_eval_uncertainty():
    lmfit = pytest.importorskip("lmfit")
    rng = np.random.default_rng(11)
    x = np.linspace(0.0, 5.0, 60)
    y = 3.0 * np.exp(-0.8 * x) + 0.5 + rng.normal(0.0, 0.1, x.size)
    start = {"a": 1.0, "b": 0.5, "c": 0.0}
    r = fitcli.fit(x=x, y=y, expr="a*exp(-b*x) + c", params=start, device="cpu")
    model = lmfit.Model(lambda x, a, b, c: a * np.exp(-b * x) + c)
    out = model.fit(y, model.make_params(**start), x=x, fit_kws={"xtol": 1e-14, "ftol": 1e-14})
    np.testing.assert_allclose(list(r.params.values()), list(out.best_values.values()), rtol=1e-7)
    # lmfit's covariance comes from MINPACK's finite-difference Jacobian: 1e-5 from the exact.
    own = out.covar.copy()
    np.testing.assert_allclose(r.covariance, own, rtol=1e-4)
    new = np.linspace(-0.5, 6.0, 80)
    for level in (0.68, 0.95):
        got = r.predict(new, band=level)
        assert isinstance(got, dict)
        tag = bands.level_tag(level)
        conf, pred = got[f"conf_upper_{tag}"] - got["fit"], got[f"pred_upper_{tag}"] - got["fit"]
        # sigma < 1 is the level itself; Student's t with n - p dof, central differences of
        # step dscale * stderr (small here, so that lmfit's Jacobian is near exact).
        out.covar = own
        dely = out.eval_uncertainty(x=new, sigma=level, dscale=1e-5)
        np.testing.assert_allclose(conf, dely, rtol=1e-4)
        np.testing.assert_allclose(pred, out.dely_predicted, rtol=1e-4)
        # With fitcli's covariance in it, lmfit's band is fitcli's to the central differences'
        # precision: the Jacobian, the quantile and the formula agree.
        out.covar = r.covariance
        np.testing.assert_allclose(
            conf, out.eval_uncertainty(x=new, sigma=level, dscale=1e-5), rtol=1e-7
        )
        np.testing.assert_allclose(pred, out.dely_predicted, rtol=1e-7)


# -- coverage ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "absolute", "low", "high"),
    [
        ("linear", False, 0.93, 0.97),
        ("linear", True, 0.93, 0.97),
        ("nonlinear", False, 0.90, 0.98),
        ("nonlinear", True, 0.90, 0.98),
    ],
)
def test_the_95_percent_band_covers_the_true_curve_95_percent_of_the_time(
    kind, absolute, low, high
):
    """1,000 seeded replicates of a known model fitted as one batched program, each one's
    band from `fitcli.bands`; the batched fits are fitcli's LM's (checked on two replicates)."""
    case = coverage.CASES[kind]
    reps = coverage.simulate(case, 1000, absolute=absolute, grid_points=100, seed=1)
    found = coverage.coverage(reps)
    assert low <= found.pointwise <= high, found
    # A pointwise band holds the whole curve less often; Working-Hotelling's multiplier does.
    assert found.simultaneous < found.pointwise
    p = reps.theta.shape[-1]
    wh = coverage.coverage(reps, multiplier=coverage.working_hotelling(p, reps.dof, absolute))
    assert wh.simultaneous >= found.simultaneous
    assert coverage.check_against_fitcli(case, reps, indices=(0, 1)) < 1e-6


# -- the run directory -------------------------------------------------------------------------


def test_with_a_sigma_column_the_prediction_band_is_at_the_data_points(tmp_path):
    rng = np.random.default_rng(5)
    x = np.linspace(0.0, 3.0, 25)
    sigma = np.linspace(0.1, 0.4, x.size)
    y = 0.5 + 1.5 * x + rng.normal(0.0, sigma)
    data = tmp_path / "d.csv"
    data.write_text(
        "t,v,s\n"
        + "".join(
            f"{a!r},{b!r},{c!r}\n"
            for a, b, c in zip(x.tolist(), y.tolist(), sigma.tolist(), strict=True)
        )
    )
    cfg = {
        **QUADRATIC,
        "data": {"file": str(data), "columns": {"x": "t", "y": "v", "sigma": "s"}},
        "model": {"basis": ["1", "x"]},
    }
    run = train(tmp_path, cfg)
    grid = read_csv(run / "bands.csv")
    assert list(grid) == ["x", "fit", *bands.column_names([0.68, 0.95], prediction=False)]
    points = read_csv(run / "bands_data.csv")
    assert list(points) == ["x", "fit", *bands.column_names([0.68, 0.95])]
    np.testing.assert_array_equal(points["x"], x)  # data.csv's rows, in its order
    design = np.column_stack([np.ones_like(x), x])
    w = 1.0 / sigma
    cov = np.linalg.inv((design * w[:, None] ** 2).T @ design)  # absolute sigma
    var = np.einsum("ij,jk,ik->i", design, cov, design)
    z = stats.norm.ppf(0.975)  # sigma is known: the normal quantile
    fit = points["fit"]
    np.testing.assert_allclose(points["conf_upper_95"] - fit, z * np.sqrt(var), rtol=1e-8)
    half = z * np.sqrt(var + sigma**2)
    np.testing.assert_allclose(points["pred_upper_95"] - fit, half, rtol=1e-8)
    np.testing.assert_allclose(fit - points["pred_lower_95"], half, rtol=1e-8)
    record = summary_of(run)["bands"]
    assert record["quantile"] == "normal" and record["prediction"] == "bands_data.csv"
    final = (run / "snapshots" / f"epoch-{record['snapshot']:02d}.html").read_text()
    assert "95% prediction band at the data points" in final


def test_a_singular_fit_has_no_bands_and_says_why(tmp_path):
    cfg = {**QUADRATIC, "model": {"basis": ["x", "2*x"]}}
    run = train(tmp_path, cfg)
    assert summary_of(run)["uncertainty"]["status"] == "singular"
    assert not (run / "bands.csv").exists()
    record = summary_of(run)["bands"]
    assert record["levels"] == [0.68, 0.95]
    assert record["skipped"].startswith("the error bars are singular (")
    assert runner.invoke(app, ["plot", str(run)]).exit_code == 0
    report = (run / "report.html").read_text()
    assert "No bands: the error bars are singular" in report
    assert "confidence band" not in "".join(
        p.read_text() for p in (run / "snapshots").glob("*.html")
    )
    with pytest.raises(ValueError, match="no band: the error bars are singular"):
        fitcli.load(run).predict([1.0], band=0.95)


def _digests(run: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((run / "snapshots").glob("*.html"))
    }


def test_the_final_snapshot_and_the_report_draw_the_bands_and_plot_rebuilds_them(tmp_path):
    run = train(tmp_path, QUADRATIC)
    record = summary_of(run)["bands"]
    pages = sorted((run / "snapshots").glob("*.html"))
    final = run / "snapshots" / f"epoch-{record['snapshot']:02d}.html"
    assert final == pages[-1]
    for page in pages:
        text = page.read_text()
        drawn = [name in text for name in ("95% confidence band", "68% prediction band")]
        assert drawn == [page == final] * 2, page.name
    before = _digests(run)
    assert runner.invoke(app, ["plot", str(run)]).exit_code == 0
    assert _digests(run) == before  # rebuilt from bands.csv, byte for byte
    report = (run / "report.html").read_text()
    assert 'id="fitcli-bands"' in report and "95% confidence band" in report
    assert "Student&#x27;s t quantile with 37 degrees of freedom" in report


def test_a_damaged_bands_csv_is_named_by_fitcli_plot(tmp_path):
    run = train(tmp_path, QUADRATIC)
    text = (run / "bands.csv").read_text()
    (run / "bands.csv").write_text(text[: len(text) // 2])
    res = runner.invoke(app, ["plot", str(run)])
    assert res.exit_code == 2
    assert "bands.csv: truncated" in res.output


def test_report_levels_name_the_columns(tmp_path):
    run = train(tmp_path, QUADRATIC, "report.levels=[0.5, 0.995]")
    got = read_csv(run / "bands.csv")
    assert list(got)[2:] == [
        "conf_lower_50",
        "conf_upper_50",
        "conf_lower_99_5",
        "conf_upper_99_5",
        "pred_lower_50",
        "pred_upper_50",
        "pred_lower_99_5",
        "pred_upper_99_5",
    ]
    dof = summary_of(run)["bands"]["dof"]
    ratio = (got["conf_upper_99_5"] - got["fit"]) / (got["conf_upper_50"] - got["fit"])
    np.testing.assert_allclose(ratio, stats.t.ppf(0.9975, dof) / stats.t.ppf(0.75, dof))


def test_empty_report_levels_write_no_bands(tmp_path):
    run = train(tmp_path, QUADRATIC, "report.levels=[]")
    assert not (run / "bands.csv").exists()
    assert summary_of(run)["bands"] == {"levels": [], "skipped": "report.levels is empty"}


# -- report.levels ----------------------------------------------------------------------------


BASE = {"data": {"target": "x", "x": {"start": 0, "stop": 1, "num": 5}}, "model": {"basis": ["x"]}}


def problems(levels) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({**BASE, "report": {"levels": levels}})
    return list(exc.value.problems)


def test_report_levels_default_and_are_validated_each_by_its_index():
    assert config_from_dict(BASE).report.levels == [0.68, 0.95]
    assert problems([0.5, 1.5, "a", 0, 0.9]) == [
        "report.levels[1]: must be a level between 0 and 1, e.g. 0.95 for 95% (got 1.5)",
        "report.levels[2]: must be a number (got 'a')",
        "report.levels[3]: must be a level between 0 and 1, e.g. 0.95 for 95% (got 0.0)",
    ]
    assert problems([0.9, 0.95, 0.9]) == ["report.levels[2]: 0.9 is given twice (also levels[0])"]
    assert problems(0.95) == ["report.levels: must be a list (got 0.95)"]
    assert problems([0.5] * 11) == ["report.levels: must have at most 10 entries (got 11)"]
    with pytest.raises(ConfigError, match="report: unknown key 'level'; did you mean 'levels'"):
        config_from_dict({**BASE, "report": {"level": [0.9]}})


def test_a_bad_level_on_the_command_line_exits_2_before_a_run_directory(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(QUADRATIC))
    res = runner.invoke(
        app, ["train", str(path), "report.levels=[95]", "--run-dir", str(tmp_path / "r")]
    )
    assert res.exit_code == 2
    assert "report.levels[0]: must be a level between 0 and 1" in res.output
    assert not (tmp_path / "r").exists()


@given(st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True))
def test_a_level_s_column_suffix_reads_back_as_the_same_level(level):
    tag = bands.level_tag(level)
    assert tag.replace("_", "").isdigit()
    assert bands.level_of_tag(tag) == level
