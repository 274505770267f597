"""The generated pages opened the way a user opens them: a real headless Chromium, straight from
disk (file://), with no network. Debian's chromium and chromium-driver (installed by .ci/run);
selenium never downloads a browser or a driver here."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_report import EVIL_FILE, EVIL_NAME, evil_run, plot, train

# Debian's paths; FITCLI_TEST_CHROMIUM / FITCLI_TEST_CHROMEDRIVER name others.
CHROMIUM = Path(os.environ.get("FITCLI_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("FITCLI_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))


@pytest.fixture(scope="module", autouse=True)
def needs_chromium():
    """Skip without a browser, except in CI (CI=true), where a missing browser fails the run:
    these are the only tests of the pages in a real browser."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    why = (
        f"needs Chromium and its driver ({' and '.join(missing)} not found; "
        "apt-get install chromium chromium-driver; .ci/run installs them)"
    )
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI=true and the browser tests cannot run: {why}", pytrace=False)
    pytest.skip(why)


def make_driver(profile: Path, width: int = 1280, height: int = 1000):
    """Headless Chromium from /usr/bin with the chromedriver beside it: no selenium-manager,
    no network, a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = make_driver(tmp_path_factory.mktemp("chromium-profile"))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> None:
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(path.resolve().as_uri())


def wait_rendered(driver, div_ids: list[str]) -> None:
    """Every plot div holds plotly's SVG (plotly renders synchronously after its script)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def done(d):
        return all(
            d.execute_script(f"return document.querySelectorAll('#{i} .main-svg').length") > 0
            for i in div_ids
        )

    WebDriverWait(driver, 30).until(done)


def severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def seed_report(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("seed") / "run"
    train(run, "configs/seed.yaml", "epochs=60")
    assert plot(run).exit_code == 0
    return run


REPORT_DIVS = ["fitcli-fit", "fitcli-loss", "fitcli-params", "fitcli-residuals"]


def test_report_renders_every_plot_with_a_clean_console(browser, seed_report: Path) -> None:
    open_page(browser, seed_report / "report.html")
    wait_rendered(browser, REPORT_DIVS)
    assert browser.execute_script("return typeof Plotly") == "object"
    assert browser.execute_script("return document.querySelectorAll('script[src]').length") == 1
    assert severe(browser) == []
    body = browser.find_element("tag name", "body").text
    assert "seed-sine: fitcli report" in body and "completed" in body
    # the log axis and the slider are there as a user sees them
    assert browser.execute_script(
        "return document.getElementById('fitcli-loss').layout.yaxis.type"
    ) == ("log")
    assert browser.execute_script(
        "return document.querySelectorAll('#fitcli-fit .slider-container').length"
    )


def fit_y(driver) -> list[float]:
    return driver.execute_script(
        "var gd = document.getElementById('fitcli-fit');"
        "var t = gd.data.filter(function (t) { return t.name === 'fit'; })[0];"
        "return Array.prototype.slice.call(t.y);"
    )


def test_moving_the_slider_changes_the_fitted_curve(browser, seed_report: Path) -> None:
    import json

    open_page(browser, seed_report / "report.html")
    wait_rendered(browser, ["fitcli-fit"])
    last = fit_y(browser)
    params = json.loads((seed_report / "snapshots" / "params.json").read_text())
    assert [s["epoch"] for s in params["snapshots"]][-1] == 60
    # Click the left end of the slider's rail as a user would: it jumps to the first step.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    rail = browser.find_element("css selector", "#fitcli-fit .slider-rail-touch-rect")
    width = rail.size["width"]
    ActionChains(browser).move_to_element_with_offset(rail, -width // 2 + 3, 0).click().perform()
    WebDriverWait(browser, 10).until(lambda d: fit_y(d) != last)
    first = fit_y(browser)
    assert first != last
    # the curve shown is the one stored for epoch 0, point for point
    import numpy as np

    stored = np.loadtxt(seed_report / "snapshots" / "epoch-00.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(first, stored[:, 1], rtol=1e-12)
    title = browser.execute_script("return document.getElementById('fitcli-fit').layout.title.text")
    assert "epoch 0/60" in title
    # and through plotly's API, to a middle snapshot
    browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "Plotly.animate('fitcli-fit', ['30'], {mode: 'immediate', frame: {duration: 0, "
        "redraw: true}, transition: {duration: 0}}).then(function () { done(); });"
    )
    middle = fit_y(browser)
    assert middle != first and middle != last
    stored = np.loadtxt(seed_report / "snapshots" / "epoch-30.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(middle, stored[:, 1], rtol=1e-12)
    assert severe(browser) == []


def test_play_button_animates_through_the_snapshots(browser, seed_report: Path) -> None:
    open_page(browser, seed_report / "report.html")
    wait_rendered(browser, ["fitcli-fit"])
    browser.execute_script(
        "window.__frames = [];"
        "document.getElementById('fitcli-fit').on('plotly_animatingframe',"
        " function (e) { window.__frames.push(e.name); });"
    )
    buttons = browser.find_elements("css selector", "#fitcli-fit .updatemenu-button")
    assert [b.text for b in buttons] == ["Play", "Pause"]
    buttons[0].click()
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda d: len(d.execute_script("return window.__frames")) >= 11
    )
    assert browser.execute_script("return window.__frames")[:3] == ["0", "6", "12"]


def test_snapshot_pages_render(browser, seed_report: Path) -> None:
    for name in ("epoch-00.html", "epoch-60.html"):
        open_page(browser, seed_report / "snapshots" / name)
        browser.implicitly_wait(0)
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(
            lambda d: d.execute_script("return document.querySelectorAll('.main-svg').length")
        )
        assert severe(browser) == []


def test_report_shows_status_words_and_the_correlation_heatmap(browser, seed_report) -> None:
    import json

    from fitcli.stats import uncertainty_words

    open_page(browser, seed_report / "report.html")
    wait_rendered(browser, [*REPORT_DIVS, "fitcli-correlation"])
    summary = json.loads((seed_report / "summary.json").read_text())
    words = uncertainty_words(summary["uncertainty"])
    assert words is not None and words.startswith("not converged")
    note = browser.find_element("css selector", "#summary .uncertainty")
    assert note.is_displayed() and note.text == f"Error bars: {words}"
    # The heatmap is drawn with one labelled cell per pair of parameters, summary's matrix.
    n = len(summary["covariance_params"])
    z = browser.execute_script("return document.getElementById('fitcli-correlation').data[0].z")
    assert z == summary["correlation"]
    assert (
        browser.execute_script("return document.querySelectorAll('#fitcli-correlation .hm').length")
        == 1
    )
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('#fitcli-correlation .heatmap-label'))"
        ".map(function (t) { return t.textContent; })"
    )
    assert len(cells) == n * n
    shown = [float(c.replace("\u2212", "-")) for c in cells]  # row by row, as drawn
    flat = [v for row in summary["correlation"] for v in row]
    assert shown == pytest.approx(flat, abs=0.005)
    assert severe(browser) == []


def test_sigma_error_bars_render_in_report_and_snapshots(browser, tmp_path: Path) -> None:
    import numpy as np

    csv = tmp_path / "line.csv"
    csv.write_text("t,v,dv\n" + "".join(f"{i},{1 + 0.5 * i},{0.1 + 0.01 * i}\n" for i in range(30)))
    config = tmp_path / "line.yaml"
    config.write_text(
        "name: line\nepochs: 10\nsnapshots: 2\n"
        "data: {file: line.csv, columns: {x: t, y: v, sigma: dv}}\n"
        'model: {basis: ["1", "x"]}\noptimizer: {name: LM}\n'
    )
    run = tmp_path / "run"
    train(run, str(config))
    assert plot(run).exit_code == 0
    want = np.loadtxt(csv, delimiter=",", skiprows=1)[:, 2]
    pages = [(run / "report.html", "fitcli-fit")]
    pages += [(p, None) for p in sorted((run / "snapshots").glob("*.html"))]
    for page, div in pages:
        open_page(browser, page)
        div = div or browser.execute_script("return document.querySelector('.plotly-graph-div').id")
        wait_rendered(browser, [div])
        # plotly drew one error bar per point, from the sigma column (typed arrays included)
        bars = browser.execute_script(
            f"return document.querySelectorAll('#{div} .errorbar').length"
        )
        assert bars == len(want), page.name
        got = browser.execute_script(
            # the observations' trace (bands, drawn beneath them, come first on the final page)
            f"var t = document.getElementById('{div}')._fullData"
            ".find(d => d.error_y && d.error_y.visible);"
            "return Array.prototype.slice.call(t.error_y.array);"
        )
        np.testing.assert_allclose(got, want, rtol=1e-15)
        title = browser.execute_script(
            f"return document.getElementById('{div}').layout.xaxis.title.text"
        )
        assert title == "t"
        assert severe(browser) == []


def test_injection_strings_stay_inert_and_visible(browser, tmp_path: Path) -> None:
    run = evil_run(tmp_path)
    assert plot(run).exit_code == 0
    pages = [run / "report.html", *sorted((run / "snapshots").glob("epoch-*.html"))]
    for page in pages:
        open_page(browser, page)
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(
            lambda d: d.execute_script("return document.querySelectorAll('.main-svg').length")
        )
        assert browser.execute_script("return typeof window.__pwned") == "undefined", page
        assert browser.execute_script("return document.querySelectorAll('img').length") == 0
        assert severe(browser) == [], page
    open_page(browser, run / "report.html")
    wait_rendered(browser, REPORT_DIVS)
    body = browser.find_element("tag name", "body").text
    assert EVIL_NAME in body  # the heading and the config show the name as text
    assert EVIL_FILE in body  # the data file name in the config
    svg_text = browser.execute_script(
        "return document.querySelector('#fitcli-fit .gtitle').textContent"
    )
    assert EVIL_NAME in svg_text  # the plot title shows it as text too
    assert browser.execute_script("return typeof window.__pwned") == "undefined"


def test_compare_page_renders(browser, seed_report: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    train(other, "configs/seed.yaml", "epochs=20", "optimizer.lr=0.03")
    out = tmp_path / "compare.html"
    assert plot(seed_report, other, "--out", out).exit_code == 0
    open_page(browser, out)
    wait_rendered(browser, ["fitcli-loss", "fitcli-fits"])
    assert severe(browser) == []
    rows = browser.find_elements("css selector", "table.runs tr")
    assert len(rows) == 3


def test_report_works_offline_with_embedded_and_moved_run(browser, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, "configs/seed.yaml", "epochs=10", "snapshots=2", "--plotlyjs", "embed")
    assert plot(run, "--plotlyjs", "embed").exit_code == 0
    moved = tmp_path / "moved elsewhere #1"
    shutil.move(run, moved)
    open_page(browser, moved / "report.html")
    wait_rendered(browser, REPORT_DIVS)
    assert severe(browser) == []


def test_graph_page_renders(browser, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fitcli.cli import app

    out = tmp_path / "graph.html"
    root = Path(__file__).resolve().parents[1]
    res = CliRunner().invoke(
        app, ["graph", str(root / "configs/damped-oscillator.yaml"), "--html", str(out)]
    )
    assert res.exit_code == 0, res.output
    open_page(browser, out)
    wait_rendered(browser, ["fitcli-graph"])
    assert severe(browser) == []
    labels = browser.execute_script(
        "return Array.from(document.querySelectorAll('#fitcli-graph .textpoint'))"
        ".map(function (e) { return e.textContent; })"
    )
    assert "MseLossBackward0" in labels and "SigmoidBackward0" in labels
    assert any(lbl.startswith("raw: free parameters (a, k, w, phi)") for lbl in labels)
