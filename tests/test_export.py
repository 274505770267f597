"""Static figures for papers (`fitcli plot RUN_DIR --format`, `report.formats`): drawn by kaleido
in the system Chromium, checked as files (PNG chunks and pixels, PDF page size, SVG as XML with
the data's points in it). A missing browser is an exit 2 that says how to install one.

The tests that draw need a Chrome or Chromium: without one they skip, except in CI (CI=true),
where they fail (.ci/run installs Debian's chromium)."""

from __future__ import annotations

import os
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import fitcli_process

from fitcli import export
from fitcli.rundir import files

N = 24  # observations of the test run
NO_BROWSER = {"BROWSER_PATH": "/nonexistent/chromium"}


@pytest.fixture(scope="module")
def browser():
    try:
        return export.find_browser()
    except Exception as exc:
        why = f"needs Chrome or Chromium to draw figures ({exc})"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI=true and the figure tests cannot run: {why}", pytrace=False)
        pytest.skip(why)


def sigma_config(tmp_path: Path, extra: str = "") -> Path:
    """A small exponential decay with a sigma column, fitted by LM in a few epochs."""
    rng = np.random.default_rng(3)
    x = np.linspace(0, 10, N)
    s = 0.05 + 0.01 * x
    y = 2 * np.exp(-x / 3) + 1 + rng.normal(0, s)
    data = tmp_path / "decay.csv"
    np.savetxt(data, np.column_stack([x, y, s]), delimiter=",", header="t,y,err", comments="")
    cfg = tmp_path / "decay.yaml"
    cfg.write_text(
        "name: decay\ndevice: cpu\nepochs: 20\nsnapshots: 2\n"
        f"data: {{file: {data}, columns: {{x: t, y: y, sigma: err}}}}\n"
        "model: {expr: 'a*exp(-x/t) + c', params: {a: 1, t: 2, c: 0}}\n"
        "optimizer: {name: LM}\n" + extra
    )
    return cfg


def train(cfg: Path, run: Path, env: dict | None = None):
    return fitcli_process(
        "train", str(cfg), "--run-dir", str(run), "--progress", "none", env=env, timeout=300
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    run = tmp / "run"
    res = train(sigma_config(tmp), run)
    assert res.returncode == 0, res.stderr
    return run


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every chunk, each CRC checked (the PNG specification's layout)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, i = [], 8
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + n]
        (crc,) = struct.unpack(">I", data[i + 8 + n : i + 12 + n])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        out.append((kind, body))
        i += 12 + n
    return out


def check_png(path: Path, width: int, height: int, dpi: int) -> None:
    chunks = png_chunks(path.read_bytes())
    kinds = [k for k, _ in chunks]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    w, h, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    # Drawn at scale dpi/96: the pixels are the CSS size times dpi/96 (rounded down).
    assert abs(w - width * dpi / 96) <= 1 and abs(h - height * dpi / 96) <= 1, (w, h)
    phys = [b for k, b in chunks if k == b"pHYs"]
    assert len(phys) == 1
    px, py, unit = struct.unpack(">IIB", phys[0])
    assert unit == 1 and abs(px * 0.0254 - dpi) < 0.05 and px == py
    # The pixels decode to exactly h rows of w pixels (8-bit RGB or RGBA, one filter byte).
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    channels = {2: 3, 6: 4}[colour]
    assert depth == 8 and len(raw) == h * (1 + w * channels)


def check_pdf(path: Path, width: int, height: int) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert len(data) > 2000
    boxes = re.findall(rb"/MediaBox\s*\[\s*0 0 ([0-9.]+) ([0-9.]+)\s*\]", data)
    assert boxes, "no page size"
    w, h = map(float, boxes[0])
    # A CSS pixel is 1/96 in, a PDF point 1/72 in: a vector page of the figure's size.
    assert abs(w - width * 0.75) < 2 and abs(h - height * 0.75) < 2, (w, h)


SVG = "{http://www.w3.org/2000/svg}"


def svg_points(path: Path) -> list[int]:
    """The number of markers in each trace that has any."""
    root = ET.fromstring(path.read_bytes())
    counts = []
    for group in root.iter(f"{SVG}g"):
        if group.get("class") == "points":
            n = sum(1 for p in group if p.get("class") == "point")
            if n:
                counts.append(n)
    return counts


@pytest.mark.slow
def test_each_format_renders_with_its_size_and_the_data(run_dir, browser):
    width, height, dpi = 400, 300, 192
    res = fitcli_process(
        "plot",
        str(run_dir),
        *("--format", "png", "--format", "svg", "--format", "pdf"),
        *("--width", str(width), "--height", str(height), "--dpi", str(dpi)),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    figs = run_dir / files.FIGURES
    expected = [figs / f"{n}.{f}" for f in ("png", "svg", "pdf") for n in ("fit", "loss")]
    assert res.stdout.split() == [str(p) for p in expected]
    for name in ("fit", "loss"):
        check_png(figs / f"{name}.png", width, height, dpi)
        check_pdf(figs / f"{name}.pdf", width, height)
    root = ET.fromstring((figs / "fit.svg").read_bytes())
    assert float(root.get("width")) == width and float(root.get("height")) == height
    # The observations (with their error bars) and the residuals beneath: N markers each.
    assert svg_points(figs / "fit.svg") == [N, N]
    bars = [g for g in root.iter(f"{SVG}g") if g.get("class") == "errorbar"]
    assert len(bars) == N
    text = "".join(root.itertext())
    assert "observed ± 1σ" in text and "(y − fit)/σ" in text
    assert svg_points(figs / "loss.svg") == []  # a line, no markers
    assert "epoch" in "".join(ET.fromstring((figs / "loss.svg").read_bytes()).itertext())
    # The figures are fitcli's files: the run directory can still be replaced.
    assert files.foreign_entries(run_dir) == []


@pytest.mark.slow
def test_report_formats_in_a_config_writes_the_figures_during_train(tmp_path, browser):
    run = tmp_path / "run"
    res = train(sigma_config(tmp_path, "report: {formats: [svg]}\n"), run)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (run / files.FIGURES).iterdir()) == ["fit.svg", "loss.svg"]
    assert svg_points(run / files.FIGURES / "fit.svg") == [N, N]


def figures_written(run: Path) -> dict[str, bytes]:
    figs = run / files.FIGURES
    return {p.name: p.read_bytes() for p in figs.iterdir()} if figs.exists() else {}


def test_no_browser_is_exit_2_with_the_install_hint(run_dir):
    before = figures_written(run_dir)
    res = fitcli_process("plot", str(run_dir), "--format", "png", env=NO_BROWSER)
    assert res.returncode == 2, res.stderr
    assert "BROWSER_PATH='/nonexistent/chromium' is not an executable file" in res.stderr
    assert "apt-get install chromium" in res.stderr
    assert "Traceback" not in res.stderr
    assert figures_written(run_dir) == before  # nothing written


def test_train_with_report_formats_and_no_browser_fails_before_the_run(tmp_path):
    run = tmp_path / "run"
    res = train(sigma_config(tmp_path, "report: {formats: [png, pdf]}\n"), run, env=NO_BROWSER)
    assert res.returncode == 2, res.stderr
    assert "apt-get install chromium" in res.stderr
    assert not run.exists()


def test_no_browser_on_path_or_in_the_usual_places_never_downloads(
    run_dir, tmp_path, monkeypatch, runner
):
    import choreographer.cli
    import kaleido

    from fitcli.cli import app

    def download(*a, **k):
        raise AssertionError("a browser download was attempted")

    for mod in (kaleido, choreographer.cli):
        monkeypatch.setattr(mod, "get_chrome", download)
        monkeypatch.setattr(mod, "get_chrome_sync", download)
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no chromium on PATH
    monkeypatch.setattr(export, "TYPICAL_PATHS", ())
    res = runner.invoke(app, ["plot", str(run_dir), "--format", "svg"])
    assert res.exit_code == 2, res.output
    assert "none was found" in res.output and "apt-get install chromium" in res.output


def test_the_browser_is_found_on_path_by_its_name(tmp_path, monkeypatch):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    (tmp_path / "google-chrome").write_text("not executable")
    assert export.find_browser({"PATH": str(tmp_path)}) == str(fake)
    assert export.find_browser({"PATH": str(tmp_path), "BROWSER_PATH": str(fake)}) == str(fake)


def test_a_link_where_a_figure_goes_is_refused(run_dir, tmp_path):
    figs = run_dir / files.FIGURES
    figs.mkdir(exist_ok=True)
    mine = tmp_path / "mine.pdf"
    mine.write_bytes(b"my own figure")
    link = figs / "loss.pdf"
    link.unlink(missing_ok=True)
    link.symlink_to(mine)
    try:
        res = fitcli_process("plot", str(run_dir), "--format", "pdf")
        assert res.returncode == 2, res.stderr
        assert f"{link} is not a file fitcli wrote" in res.stderr
        assert mine.read_bytes() == b"my own figure"
        # Anything but fitcli's own figures in figures/ is the user's: --overwrite keeps off.
        assert files.foreign_entries(run_dir) == ["figures/loss.pdf"]
    finally:
        link.unlink()


def test_size_options_without_a_format_are_refused(run_dir, runner):
    from fitcli.cli import app

    res = runner.invoke(app, ["plot", str(run_dir), "--dpi", "600"])
    assert res.exit_code == 2
    assert "--dpi size static figures: add --format" in res.output


def test_report_formats_are_checked_in_the_config(tmp_path, runner):
    from fitcli.cli import app

    cfg = sigma_config(tmp_path, "report: {formats: [png, gif]}\n")
    res = runner.invoke(app, ["check", str(cfg)])
    assert res.exit_code == 2
    assert "report.formats[1]: must be one of png, svg, pdf (got 'gif')" in res.output


def test_with_dpi_sets_the_resolution_of_a_png():
    # A 1x1 RGB PNG built here by the specification, then given 300 dpi twice (replaced).
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00"))
        + chunk(b"IEND", b"")
    )
    out = export.with_dpi(export.with_dpi(png, 72), 300)
    kinds = [k for k, _ in png_chunks(out)]
    assert kinds == [b"IHDR", b"pHYs", b"IDAT", b"IEND"]
    body = dict(png_chunks(out))[b"pHYs"]
    assert struct.unpack(">IIB", body) == (11811, 11811, 1)  # 300 / 0.0254 m


@pytest.mark.slow
def test_the_fit_figure_of_several_variables_has_a_panel_per_variable(tmp_path, browser):
    # 6 x 5 grid points of the shipped two-variable surface.
    shipped = Path(__file__).resolve().parent.parent / "configs" / "surface-2d.yaml"
    run = tmp_path / "run"
    res = fitcli_process(
        "train",
        str(shipped),
        "data.x.u.num=6",
        "data.x.v.num=5",
        "snapshots=2",
        "--run-dir",
        str(run),
        "--progress",
        "none",
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    res = fitcli_process("plot", str(run), "--format", "svg", timeout=300)
    assert res.returncode == 0, res.stderr
    root = ET.fromstring((run / files.FIGURES / "fit.svg").read_bytes())
    # Observed, fitted and residual markers against each of u and v (and the bands' error
    # bars on them): every trace has every point (a one-variable figure had two traces of 60).
    counts = svg_points(run / files.FIGURES / "fit.svg")
    assert len(counts) >= 6 and set(counts) == {30}
    titles = [
        t.text for t in root.iter(f"{SVG}text") if re.fullmatch(r"x\d*title", t.get("class") or "")
    ]
    assert sorted(titles) == ["u", "u", "v"]  # under each residual panel, and the heatmap's
    assert any("heatmaplayer" in (g.get("class") or "") for g in root.iter(f"{SVG}g"))
