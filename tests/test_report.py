"""fitcli plot: snapshots rebuilt byte for byte, the report and comparison pages, runs in every
state, and damaged run directories (each file missing, truncated, garbled) -> exit 2 naming it."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fitcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
FITCLI = [sys.executable, "-m", "fitcli.cli"]
runner = CliRunner()


def train(run_dir: Path, config: str = "configs/seed.yaml", *args: str) -> None:
    res = runner.invoke(
        app,
        ["train", str(ROOT / config), *args, "--run-dir", str(run_dir), "--progress", "none"],
    )
    assert res.exit_code in (0, 3), res.output


def tree(path: Path) -> dict[str, str]:
    """Every file under path with the hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("seed") / "run"
    train(run, "configs/seed.yaml", "epochs=60")
    return run


@pytest.fixture()
def run(seed_run: Path, tmp_path: Path) -> Path:
    """A private copy of the seed run, free to damage."""
    dest = tmp_path / "run"
    shutil.copytree(seed_run, dest)
    return dest


def plot(*args: str):
    return runner.invoke(app, ["plot", *map(str, args)])


# -- rebuilding snapshots -----------------------------------------------------------------------


def test_plot_rebuilds_snapshots_byte_identical_and_changes_nothing_else(run: Path) -> None:
    before = tree(run)
    pages = sorted((run / "snapshots").glob("*.html"))
    assert len(pages) == 11
    for p in pages:
        p.unlink()
    res = plot(run)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(run / "report.html")
    after = tree(run)
    assert after.pop("report.html")
    assert after == before  # every snapshot page back, bit for bit; nothing else touched


@pytest.mark.parametrize(
    ("config", "args"),
    [
        # float32 through sigmoid/softplus bounds, a fixed parameter: the model could not be
        # re-evaluated bit for bit; the stored curve makes the rebuild exact.
        ("configs/damped-oscillator.yaml", ["epochs=40", "dtype=float32"]),
        ("configs/measured-decay.yaml", ["epochs=5"]),
        # LM converges early and fills the remaining snapshots with a "stopped at" note.
        ("configs/nist-misra1a.yaml", ["epochs=500"]),
    ],
)
def test_rebuild_is_exact_for_bounded_float32_and_file_data(tmp_path, config, args) -> None:
    run = tmp_path / "run"
    train(run, config, *args)
    before = tree(run / "snapshots")
    res = plot(run)
    assert res.exit_code == 0, res.output
    assert tree(run / "snapshots") == before


def test_snapshot_pages_are_deterministic(run: Path) -> None:
    page = (run / "snapshots" / "epoch-00.html").read_text()
    assert 'id="fitcli-epoch-0"' in page
    assert "../plotly.min.js" in page


def test_embed_mode_rebuild_matches_training(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, "configs/seed.yaml", "epochs=10", "snapshots=2", "--plotlyjs", "embed")
    before = tree(run)
    assert "plotly.min.js" not in before
    res = plot(run, "--plotlyjs", "embed")
    assert res.exit_code == 0, res.output
    after = tree(run)
    report = (run / "report.html").read_text()
    assert after.pop("report.html") and after == before
    assert "plotly.min.js" not in after
    assert report.count("Plotly.newPlot") == 6 and len(report) > 3_000_000


def test_directory_mode_copies_missing_plotly_js(run: Path) -> None:
    (run / "plotly.min.js").unlink()
    res = plot(run)
    assert res.exit_code == 0, res.output
    assert (run / "plotly.min.js").stat().st_size > 1_000_000


# -- the report ---------------------------------------------------------------------------------


def test_report_holds_every_part_once_with_one_plotly(run: Path) -> None:
    assert plot(run).exit_code == 0
    page = (run / "report.html").read_text()
    for div in (
        "fitcli-fit",
        "fitcli-bands",
        "fitcli-loss",
        "fitcli-params",
        "fitcli-residuals",
        "fitcli-correlation",
    ):
        assert f'id="{div}"' in page
    assert page.count("Plotly.newPlot") == 6
    assert "Plotly.addFrames" in page  # slider frames
    assert '"type":"log"' in page
    summary = json.loads((run / "summary.json").read_text())
    for key in ("status", "final loss", "device", "dtype", "seed", "time"):
        assert f"<th>{key}</th>" in page
    assert f"{summary['params']['theta1']:.8g}" in page
    assert "basis:" in page and "cos(x/4)" in page  # the config text
    for k in range(0, 61, 6):
        assert f'href="snapshots/epoch-{k:02d}.html"' in page


def test_report_shows_standard_errors_when_summary_has_them(run: Path) -> None:
    s = json.loads((run / "summary.json").read_text())
    s["stderr"] = {"theta0": 0.0123, "theta1": 0.0456, "theta2": None}
    (run / "summary.json").write_text(json.dumps(s))
    assert plot(run).exit_code == 0
    page = (run / "report.html").read_text()
    assert "± stderr" in page and "0.0123" in page and "0.0456" in page


def test_residuals_are_exact_against_the_model(run: Path) -> None:
    import numpy as np

    from fitcli import report

    r = report.read_run(run)
    epoch, res = report.residuals(r)
    p = r.summary["params"]
    x = r.data["x"]
    fit = p["theta0"] * x + p["theta1"] * np.sin(x) + p["theta2"] * np.cos(x / 4)
    assert epoch == 60
    np.testing.assert_allclose(res, r.data["y"] - fit, rtol=0, atol=1e-12)


def test_large_data_is_downsampled_with_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, "configs/seed.yaml", "epochs=2", "snapshots=1", "data.x.num=50000")
    assert plot(run).exit_code == 0
    page = (run / "report.html").read_text()
    assert "every 13th of 50,000 points" in page
    assert (run / "report.html").stat().st_size < 3_000_000


def test_diverged_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, "configs/seed.yaml", "epochs=200", "optimizer.lr=5")
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    before = tree(run / "snapshots")
    res = plot(run)
    assert res.exit_code == 0, res.output
    assert tree(run / "snapshots") == before
    assert 'class="status diverged"' in (run / "report.html").read_text()


def test_interrupted_run(tmp_path: Path) -> None:
    from fitcli.config import load_config
    from fitcli.experiment import execute, make_run_dir
    from fitcli.prepare import prepare

    prep = prepare(load_config(ROOT / "configs/seed.yaml", ["epochs=100"]))
    run = make_run_dir(prep.cfg, tmp_path, tmp_path / "run", False)
    summary = execute(prep, run, command=["test"], on_epoch=lambda e, loss: e >= 33)
    assert summary["status"] == "interrupted"
    res = plot(run)
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    assert 'class="status interrupted"' in page and "33 of 100" in page


def test_run_still_starting_and_running(run: Path) -> None:
    s = json.loads((run / "summary.json").read_text())
    s.update(status="running", final_loss=None, epochs_run=0)
    (run / "summary.json").write_text(json.dumps(s))
    (run / "metrics.csv").unlink()
    res = plot(run)
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    assert "metrics.csv is not written yet" in page and 'id="fitcli-fit"' in page
    assert 'id="fitcli-loss"' not in page
    # Before the first snapshot: only summary, config and data exist.
    shutil.rmtree(run / "snapshots")
    res = plot(run)
    assert res.exit_code == 0, res.output
    assert "no snapshot yet" in (run / "report.html").read_text()


@pytest.mark.slow
def test_plot_during_training_in_a_real_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [*FITCLI, "train", str(ROOT / "configs/seed.yaml"), "epochs=200000", "snapshots=1000"]
    proc = subprocess.Popen(
        [*cmd, "--run-dir", str(run), "--progress", "none"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (run / "snapshots" / "params.json").exists():
            assert proc.poll() is None, "training stopped early"
            assert time.monotonic() < deadline, "training never wrote a snapshot"
            time.sleep(0.1)
        time.sleep(0.5)
        res = subprocess.run(
            [*FITCLI, "plot", str(run)], capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr
        page = (run / "report.html").read_text()
        assert 'class="status running"' in page and 'id="fitcli-fit"' in page
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()


# -- several runs -------------------------------------------------------------------------------


def test_compare_page(seed_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    train(other, "configs/seed.yaml", "epochs=30", "optimizer.lr=0.02")
    out = tmp_path / "cmp" / "compare.html"
    out.parent.mkdir()
    before = tree(seed_run)
    res = plot(seed_run, other, "--out", out)
    assert res.exit_code == 0, res.output
    page = out.read_text()
    assert (out.parent / "plotly.min.js").exists() and 'src="plotly.min.js"' in page
    assert page.count("Plotly.newPlot") == 2
    assert "<td>run</td>" in page and "<td>other</td>" in page
    assert page.count("<tr>") == 3 and "<th>theta2</th>" in page
    assert tree(seed_run) == before  # comparing writes nothing into the runs


def test_single_report_elsewhere_links_back(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere.html"
    assert plot(run, "--out", out).exit_code == 0
    page = out.read_text()
    assert 'src="run/plotly.min.js"' in page and 'href="run/snapshots/epoch-00.html"' in page


def test_open_opens_the_page(run: Path, monkeypatch) -> None:
    import webbrowser

    opened = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url))
    assert plot(run, "--open").exit_code == 0
    assert opened == [(run / "report.html").resolve().as_uri()]


# -- config text stays text ---------------------------------------------------------------------

EVIL_NAME = "</script><script>window.__pwned=1</script>"
EVIL_FILE = "<img src=x onerror=window.__pwned=2>.csv"


def evil_run(tmp_path: Path) -> Path:
    """A run whose name and data file name are HTML injections (the tests in test_browser.py
    open it in a real browser)."""
    shutil.copy(ROOT / "configs/data/decay.csv", tmp_path / EVIL_FILE)
    config = tmp_path / "evil.yaml"
    config.write_text(
        json.dumps(
            {
                "name": EVIL_NAME,
                "epochs": 20,
                "snapshots": 4,
                "data": {"file": EVIL_FILE, "columns": {"x": "time_s", "y": "counts"}},
                "model": {
                    "expr": "A*exp(-x/tau) + B",
                    "params": {"A": 80, "tau": {"value": 5, "min": 0.1, "max": 100}, "B": 5},
                },
                "optimizer": {"name": "Adam", "lr": 0.5},
            }
        )
    )
    run = tmp_path / "run"
    train(run, str(config))
    return run


def test_injection_strings_are_escaped_in_every_page(tmp_path: Path) -> None:
    run = evil_run(tmp_path)
    assert plot(run).exit_code == 0
    for page in [run / "report.html", *sorted((run / "snapshots").glob("*.html"))]:
        text = page.read_text()
        assert "<script>window.__pwned" not in text, page
        assert "<img src=x" not in text, page
    report = (run / "report.html").read_text()
    assert "&lt;/script&gt;&lt;script&gt;window.__pwned=1" in report
    assert "&lt;img src=x onerror=window.__pwned=2&gt;.csv" in report


# -- damaged run directories --------------------------------------------------------------------

FILES = [
    "summary.json",
    "config.yaml",
    "data.csv",
    "metrics.csv",
    "snapshots/params.json",
    "snapshots/epoch-30.csv",
    "plotly.min.js",
]


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    mid = len(data) // 2
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[:mid])
    elif how == "garbled-binary":
        path.write_bytes(data[:mid] + bytes(range(128, 256)) + data[mid:])
    elif how == "garbled-text":
        path.write_bytes(data[:mid] + b"\n}{ ][ : :zz,\n" + data[mid:])
    else:  # pragma: no cover
        raise AssertionError(how)


CASES = [
    (f, how)
    for f in FILES
    for how in ("missing", "truncated", "garbled-binary", "garbled-text")
    if not (f == "plotly.min.js" and how == "missing")  # copied back: not damage
]


@pytest.mark.parametrize(("name", "how"), CASES, ids=[f"{f}-{h}" for f, h in CASES])
def test_damaged_file_exit_2_naming_it_and_nothing_changes(run: Path, name: str, how: str):
    damage(run / name, how)
    before = tree(run)
    res = plot(run)
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = " ".join(res.stderr.split())
    assert str(run / name) in err.replace("\n", ""), err
    assert "Traceback" not in res.output
    assert tree(run) == before  # nothing written, nothing deleted


def test_truncated_at_a_line_boundary_is_caught(run: Path) -> None:
    for name in ("data.csv", "metrics.csv"):
        path = run / name
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[: len(lines) // 2]))
        res = plot(run)
        assert res.exit_code == 2 and "truncated" in res.stderr, res.output
        assert name in res.stderr
        path.write_text("".join(lines))


def test_snapshot_file_names_cannot_escape_the_run_dir(run: Path) -> None:
    p = run / "snapshots" / "params.json"
    d = json.loads(p.read_text())
    d["snapshots"][0]["file"] = "../../evil.html"
    p.write_text(json.dumps(d))
    res = plot(run)
    assert res.exit_code == 2 and "is not epoch-N.html" in res.stderr
    assert not (run.parent.parent / "evil.html").exists()


def test_not_a_run_directory(tmp_path: Path) -> None:
    res = plot(tmp_path / "nope")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = plot(tmp_path)
    assert res.exit_code == 2 and "not a fitcli run directory" in res.stderr


@pytest.mark.slow
def test_damaged_run_in_a_real_process(run: Path) -> None:
    damage(run / "snapshots" / "params.json", "truncated")
    res = subprocess.run([*FITCLI, "plot", str(run)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "params.json" in res.stderr and "not valid JSON" in res.stderr
    assert "Traceback" not in res.stderr
    ok = subprocess.run(
        [*FITCLI, "plot", str(run.parent / "missing")], capture_output=True, text=True
    )
    assert ok.returncode == 2 and "Traceback" not in ok.stderr


def test_help_mentions_every_option() -> None:
    res = runner.invoke(app, ["plot", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--out", "--open", "--plotlyjs", "RUN_DIRS"):
        assert opt in res.output.upper() if opt == "RUN_DIRS" else opt in res.output
