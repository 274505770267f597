"""The bands of a model of several variables as a user sees them: a real headless Chromium (the
set-up of test_browser.py) opens the final snapshot and the report from disk and finds the
confidence band's error bars on the fitted values, from bands.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_browser import browser, needs_chromium, open_page, severe, wait_rendered  # noqa: F401
from test_report import plot, train

# The band traces' error bars, against the first variable: (name, y, error plus, error minus).
BAND_TRACE = (
    "var t = document.getElementById(arguments[0])._fullData"
    ".find(d => d.name === '95% confidence band' && d.xaxis === 'x' && d.yaxis === 'y');"
    "if (!t) return null;"
    "var a = x => Array.prototype.slice.call(x);"
    "return [a(t.y), a(t.error_y.array), a(t.error_y.arrayminus)];"
)


@pytest.fixture(scope="module")
def surface_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("surface") / "run"
    train(run, "configs/surface-2d.yaml")
    assert plot(run).exit_code == 0
    return run


def test_the_confidence_band_of_several_variables_is_drawn_from_bands_csv(
    browser,  # noqa: F811
    surface_run: Path,
) -> None:
    head, *rows = (surface_run / "bands.csv").read_text().splitlines()
    table = np.array([[float(v) for v in r.split(",")] for r in rows])
    cols = {c: table[:, k] for k, c in enumerate(head.split(","))}
    final = sorted((surface_run / "snapshots").glob("*.html"))[-1]
    for page, div in ((final, None), (surface_run / "report.html", "fitcli-bands")):
        open_page(browser, page)
        div = div or browser.execute_script("return document.querySelector('.plotly-graph-div').id")
        wait_rendered(browser, [div])
        found = browser.execute_script(BAND_TRACE, div)
        assert found is not None, page.name
        y, plus, minus = map(np.array, found)
        np.testing.assert_array_equal(y, cols["fit"])
        np.testing.assert_allclose(plus, cols["conf_upper_95"] - cols["fit"], rtol=1e-15)
        np.testing.assert_allclose(minus, cols["fit"] - cols["conf_lower_95"], rtol=1e-15)
        # plotly drew them: one error bar per point and band trace, in every panel
        bars = browser.execute_script(
            f"return document.querySelectorAll('#{div} .errorbar').length"
        )
        assert bars >= len(cols["fit"]) * 2, page.name
        legend = browser.execute_script(
            f"return Array.from(document.querySelectorAll('#{div} .legendtext'), "
            "e => e.textContent)"
        )
        assert "95% confidence band" in legend and "95% prediction band" in legend
        assert severe(browser) == []
    first = sorted((surface_run / "snapshots").glob("*.html"))[0]
    open_page(browser, first)
    div = browser.execute_script("return document.querySelector('.plotly-graph-div').id")
    wait_rendered(browser, [div])
    assert browser.execute_script(BAND_TRACE, div) is None  # only the final fit has bands
