"""What the report and the snapshots show a scientist: the error bars' status in words, the
statistics block and the correlation heatmap (against summary.json), sigma error bars and
residuals in units of sigma (against numpy), axis titles from the data's column names and the
config's `report:` section, log axes, and an early-stopped fit titled by what happened."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np
import pytest
from test_report import plot, train

from fitcli.stats import uncertainty_words


def figure(page: str, div_id: str) -> tuple[list[dict], dict]:
    """The traces and layout of the plotly figure drawn into `div_id` on a page."""
    match = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    assert match, f"no figure {div_id}"
    decoder = json.JSONDecoder()
    traces, end = decoder.raw_decode(page, match.end())
    layout, _ = decoder.raw_decode(page, page.index("{", end))
    return traces, layout


def values(v) -> np.ndarray:
    """A plotly data array: a list, or a typed array (base64 bytes)."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype="<" + v["dtype"])
    return np.asarray(v, dtype=np.float64)


def trace(traces: list[dict], prefix: str) -> dict:
    found = [t for t in traces if t.get("name", "").startswith(prefix)]
    assert len(found) == 1, [t.get("name") for t in traces]
    return found[0]


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory) -> Path:
    """SGD for 60 epochs: far from the minimum (not_converged)."""
    run = tmp_path_factory.mktemp("seed") / "run"
    train(run, "configs/seed.yaml", "epochs=60", "snapshots=2")
    assert plot(run).exit_code == 0
    return run


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    """Levenberg-Marquardt on the same problem: converged (ok) long before its 300 epochs."""
    run = tmp_path_factory.mktemp("lm") / "run"
    train(run, "configs/seed.yaml", "epochs=300", "optimizer={name: LM}", "data.x.num=200")
    assert plot(run).exit_code == 0
    return run


SIGMA_CSV_ROWS = 40


@pytest.fixture(scope="module")
def sigma_run(tmp_path_factory) -> Path:
    """A data file with a sigma column, x unsorted, fitted by LM with a straight line."""
    tmp = tmp_path_factory.mktemp("sigma")
    rng = np.random.default_rng(3)
    x = rng.permutation(np.linspace(0.5, 10, SIGMA_CSV_ROWS))
    sigma = 0.2 + 0.05 * x
    y = 1.5 + 0.7 * x + rng.normal(0, sigma)
    (tmp / "line.csv").write_text(
        "time_s,signal,dsignal\n"
        + "".join(f"{a!r},{b!r},{c!r}\n" for a, b, c in np.stack([x, y, sigma], 1).tolist())
    )
    config = tmp / "line.yaml"
    config.write_text(
        "name: line\nepochs: 50\nsnapshots: 2\n"
        "data: {file: line.csv, columns: {x: time_s, y: signal, sigma: dsignal}}\n"
        'model: {basis: ["1", "x"]}\noptimizer: {name: LM}\n'
    )
    run = tmp / "run"
    train(run, str(config))
    assert plot(run).exit_code == 0
    return run


# -- the summary: status in words, statistics, correlations --------------------------------------


def test_status_words_appear_for_a_run_whose_error_bars_are_not_ok(seed_run, lm_run) -> None:
    s = summary_of(seed_run)
    assert s["uncertainty"]["status"] == "not_converged"
    page = (seed_run / "report.html").read_text()
    words = uncertainty_words(s["uncertainty"])
    assert words is not None and words.startswith("not converged: ")
    assert s["uncertainty"]["reason"] in words and words.endswith("the error bars are not reliable")
    assert f'<p class="uncertainty">Error bars: {html.escape(words)}</p>' in page
    # Next to the parameter table: in the same column of the summary.
    assert page.index('class="uncertainty"') < page.index('<table class="params">')
    ok = summary_of(lm_run)
    assert ok["uncertainty"]["status"] == "ok"
    assert 'class="uncertainty"' not in (lm_run / "report.html").read_text()


def test_statistics_block_holds_summary_values(seed_run) -> None:
    s = summary_of(seed_run)
    page = (seed_run / "report.html").read_text()
    rows = dict(re.findall(r'<tr data-key="(\w+)"><th>[^<]*</th><td class=num>([^<]*)</td>', page))
    want = {
        k: s[k]
        for k in ("n_points", "n_params", "rss", "r2", "chi2_reduced", "aic", "bic")
        + ("optimum_loss", "gap")
    }
    want["condition_number"] = s["uncertainty"]["condition_number"]
    assert all(v is not None for v in want.values())  # a basis model with mse has them all
    assert set(rows) == set(want)
    for key, value in want.items():
        assert float(rows[key]) == pytest.approx(value, rel=1e-7), key


def test_correlation_heatmap_is_summary_matrix(seed_run) -> None:
    s = summary_of(seed_run)
    page = (seed_run / "report.html").read_text()
    (heat,), _ = figure(page, "fitcli-correlation")
    assert heat["type"] == "heatmap" and heat["zmin"] == -1 and heat["zmax"] == 1
    assert heat["x"] == heat["y"] == s["covariance_params"]
    np.testing.assert_array_equal(np.array(heat["z"], dtype=float), np.array(s["correlation"]))


# -- data with sigma ------------------------------------------------------------------------------


def test_sigma_error_bars_and_residuals_in_sigma(sigma_run) -> None:
    s = summary_of(sigma_run)
    data = np.loadtxt(sigma_run / "data.csv", delimiter=",", skiprows=1)
    x, y, sigma = data[:, 0], data[:, 1], data[:, 2]
    order = np.argsort(x, kind="stable")
    page = (sigma_run / "report.html").read_text()
    traces, _ = figure(page, "fitcli-fit")
    obs = trace(traces, "observed")
    np.testing.assert_array_equal(values(obs["x"]), x[order])
    np.testing.assert_array_equal(values(obs["error_y"]["array"]), sigma[order])
    assert obs["error_y"]["visible"] is True and obs["name"] == "observed ± 1 sigma"
    # The observations are drawn above the fit line.
    assert obs["zorder"] > trace(traces, "fit").get("zorder", 0)
    # The snapshot pages draw the same error bars (as typed arrays).
    snap = sorted((sigma_run / "snapshots").glob("*.html"))[-1].read_text()
    snap_obs = trace(figure(snap, snap.split('id="')[1].split('"')[0])[0], "observed")
    np.testing.assert_array_equal(values(snap_obs["error_y"]["array"]), sigma[order])

    p = s["params"]
    fit = p["theta0"] + p["theta1"] * x
    (res, _), layout = figure(page, "fitcli-residuals")
    np.testing.assert_allclose(values(res["y"]), ((y - fit) / sigma)[order], rtol=1e-9, atol=1e-12)
    assert layout["yaxis"]["title"]["text"] == "(y - fit) / sigma"
    assert res["name"].startswith("residual (y - fit) / sigma")
    (zero,) = layout["shapes"]
    assert zero["type"] == "line" and zero["y0"] == zero["y1"] == 0
    assert (zero["xref"], zero["x0"], zero["x1"]) == ("x domain", 0, 1)


def test_residuals_without_sigma_are_y_minus_fit_with_a_zero_line(seed_run) -> None:
    (res, _), layout = figure((seed_run / "report.html").read_text(), "fitcli-residuals")
    assert layout["yaxis"]["title"]["text"] == "y - fit"
    assert layout["shapes"][0]["y0"] == 0


# -- axis titles and log axes ---------------------------------------------------------------------


def test_axis_titles_are_the_column_names_or_x_and_y(sigma_run, seed_run) -> None:
    assert summary_of(sigma_run)["columns"] == {"x": "time_s", "y": "signal", "sigma": "dsignal"}
    page = (sigma_run / "report.html").read_text()
    _, layout = figure(page, "fitcli-fit")
    assert (layout["xaxis"]["title"]["text"], layout["yaxis"]["title"]["text"]) == (
        "time_s",
        "signal",
    )
    assert figure(page, "fitcli-residuals")[1]["xaxis"]["title"]["text"] == "time_s"
    snap = (sigma_run / "snapshots" / "epoch-00.html").read_text()
    _, snap_layout = figure(snap, "fitcli-epoch-0")
    assert snap_layout["xaxis"]["title"]["text"] == "time_s"
    assert "columns" not in summary_of(seed_run)  # synthetic data
    _, seed_layout = figure((seed_run / "report.html").read_text(), "fitcli-fit")
    assert (seed_layout["xaxis"]["title"]["text"], seed_layout["yaxis"]["title"]["text"]) == (
        "x",
        "y",
    )


def test_report_section_overrides_titles_and_sets_log_axes(tmp_path) -> None:
    run = tmp_path / "run"
    train(
        run,
        "configs/measured-decay.yaml",
        "epochs=3",
        "snapshots=1",
        "report.x_label=time since the shot (s)",
        "report.title=Decay & background",
        "report.log_x=true",
        "report.log_y=true",
    )
    before = {p.name: p.read_bytes() for p in (run / "snapshots").glob("*.html")}
    assert plot(run).exit_code == 0
    # fitcli plot rebuilds the same pages from the run directory alone.
    assert {p.name: p.read_bytes() for p in (run / "snapshots").glob("*.html")} == before
    page = (run / "report.html").read_text()
    for where, div in ((page, "fitcli-fit"), (before["epoch-3.html"].decode(), "fitcli-epoch-3")):
        _, layout = figure(where, div)
        assert layout["xaxis"]["title"]["text"] == "time since the shot (s)"
        assert layout["yaxis"]["title"]["text"] == "counts"  # the column name, not overridden
        assert layout["xaxis"]["type"] == layout["yaxis"]["type"] == "log"
        assert layout["title"]["text"].startswith("Decay &amp; background: ")
    _, res = figure(page, "fitcli-residuals")
    assert res["xaxis"]["type"] == "log" and res["yaxis"].get("type") is None


# -- a run that stopped early ----------------------------------------------------------------------


def test_lm_converged_early_is_titled_by_it_and_its_loss_axis_ends_there(lm_run) -> None:
    s = summary_of(lm_run)
    done = s["epochs_run"]
    assert s["converged"] is True and done < 300
    page = (lm_run / "report.html").read_text()
    _, layout = figure(page, "fitcli-fit")
    assert f"converged at epoch {done} (the final fit)" in layout["title"]["text"]
    assert "/300" not in layout["title"]["text"]
    steps = layout["sliders"][0]["steps"]
    assert steps[-1]["label"] == f"{done} (final fit)"
    assert len(steps) == len({st["label"] for st in steps})  # the final fit once
    loss_traces, loss_layout = figure(page, "fitcli-loss")
    assert loss_layout["xaxis"]["range"][1] == done
    snaps = trace(loss_traces, "snapshots")
    assert max(values(snaps["x"])) <= done  # no marker past the stop
    # Every snapshot page filled in after the stop is marked as the converged fit.
    snapshots = json.loads((lm_run / "snapshots" / "params.json").read_text())["snapshots"]
    later = [e for e in snapshots if e["epoch"] > done]
    assert later and all(e["note"] == f"converged at epoch {done}" for e in later)
    for e in later:
        text = (lm_run / "snapshots" / e["file"]).read_text()
        assert f"converged at epoch {done} (the final fit)" in text
        assert f"epoch {e['epoch']}/300" not in text


def test_static_figures_take_the_same_axis_titles_and_log_axes(sigma_run, tmp_path) -> None:
    from fitcli.figures import figures_of
    from fitcli.rundir.reader import read_run

    layout = figures_of(read_run(sigma_run))["fit"]["layout"]
    assert layout["xaxis2"]["title"]["text"] == "time_s"  # the residual panel holds the x title
    assert layout["yaxis"]["title"]["text"] == "signal"
    run = tmp_path / "run"
    train(run, "configs/measured-decay.yaml", "epochs=2", "snapshots=1", "report.log_x=true")
    layout = figures_of(read_run(run))["fit"]["layout"]
    assert layout["xaxis"]["type"] == layout["xaxis2"]["type"] == "log"
    assert layout["yaxis"].get("type") is None
