"""Fault suite 6: hostile text in a config stays text on every page fitcli writes.

Injection strings go into every config text that reaches a page: the run name, the data file's
name and its column names (the axis titles, and in the report's config), the `report:` section's
x_label and title, and the command line recorded in config.yaml (an override). Then the
snapshot pages (`fitcli train`), the report and the comparison page (`fitcli plot`) are parsed:
the injected markup must not appear raw (nor in any text of a figure), the pages hold exactly
the tags and scripts that a page for a harmless run holds, and no attribute is an event handler
or a javascript: URL. (The browser test, elsewhere, executes pages for real.)
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from fitcli.cli import app

INJECTIONS = [
    "<script>alert(1)</script>",
    "</script><script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    '"><svg onload=alert(1)>',
    "'><iframe src=javascript:alert(1)>",
    "<!--<script>alert(1)//-->",
    "<style>*{display:none}</style>",
    "<a href='javascript:alert(1)'>x</a>",
    "]]><script>alert(1)</script>",
    "<scr<script>ipt>alert(1)</script>",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "<sub><b onmouseover=alert(1)>x</b></sub>",
]


STRING = re.compile(r'"(?:[^"\\]|\\.)*"')  # a JSON string literal


class Tags(HTMLParser):
    """Every start tag with its attributes, and each inline script's text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def parse(page: str) -> Tags:
    t = Tags()
    t.feed(page)
    return t


def shape(page: str) -> list[tuple[str, tuple]]:
    """The page's tags and attribute names: what hostile text could add to."""
    return sorted({(tag, tuple(sorted(a))) for tag, a in parse(page).tags})


def file_safe(text: str) -> str:
    return text.replace("/", "|")  # a file name cannot hold '/'


def make_run(runner, tmp: Path, label: str, text: str) -> Path:
    folder = tmp / label
    folder.mkdir()
    column, y_column = "t" + file_safe(text), "y" + file_safe(text)
    data = folder / f"{file_safe(text)}.csv"
    data.write_text(
        f"{column},{y_column},dy\n"
        + "".join(f"{i / 10},{2 * i / 10 + 1 + (-1) ** i * 0.1},0.1\n" for i in range(20))
    )
    cfg = {
        "name": text,
        "seed": 0,
        "device": "cpu",
        "epochs": 4,
        "snapshots": 2,
        "data": {"file": data.name, "columns": {"x": column, "y": y_column, "sigma": "dy"}},
        # The axis titles come from the y column's name; the x title and the title from here.
        "report": {"x_label": text, "title": text},
        "model": {"basis": ["1", "x"]},
        "optimizer": {"name": "SGD", "lr": 0.1},
    }
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    run = folder / "run"
    result = runner.invoke(
        app,
        [
            "train",
            str(path),
            f"name={json.dumps(text)}",
            "--run-dir",
            str(run),
            "--progress",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    return run


def pages(run: Path) -> list[Path]:
    return sorted(run.glob("snapshots/*.html")) + [run / "report.html"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory, runner_module):
    tmp = tmp_path_factory.mktemp("clean")
    run = make_run(runner_module, tmp, "clean", "harmless name")
    return {p.name: shape(p.read_text()) for p in pages(run)}


@pytest.fixture(scope="module")
def runner_module():
    from typer.testing import CliRunner

    return CliRunner()


def assert_inert(page: Path, text: str, reference: list) -> None:
    raw = page.read_text()
    assert text not in raw, f"{page.name}: the injection appears raw"
    parsed = parse(raw)
    assert shape(raw) == reference, f"{page.name}: tags or attributes were added"
    for tag, attrs in parsed.tags:
        for name, value in attrs.items():
            assert not name.startswith("on"), (page.name, tag, name)
            assert not (value or "").strip().lower().startswith("javascript:"), (page.name, tag)
    for script in parsed.scripts:  # plotly's JSON escapes '<': no tag can close the script
        assert "</" not in script and "<script" not in script, page.name
        # Plotly draws its texts (titles, axis titles, legends) as a subset of HTML: every text
        # of a figure must hold the hostile text escaped, never as it is.
        for literal in STRING.findall(script):
            assert text not in json.loads(literal), f"{page.name}: raw in a figure's text"


@pytest.mark.parametrize("text", INJECTIONS, ids=range(len(INJECTIONS)))
def test_injection_stays_inert_on_every_page(runner, tmp_path, clean, text):
    run = make_run(runner, tmp_path, "hostile", text)
    checked = 0
    for page in pages(run):
        key = page.name if page.name in clean else sorted(clean)[0]
        assert_inert(page, text, clean[key])
        checked += 1
    assert checked >= 3
    # The text is there, as text: escaped in the report, visible to the reader.
    report = parse((run / "report.html").read_text())
    assert report.tags and text not in (run / "report.html").read_text()


def test_injection_stays_inert_on_the_comparison_page(runner, tmp_path):
    runs = [make_run(runner, tmp_path, f"r{k}", t) for k, t in enumerate(INJECTIONS[:3])]
    clean_runs = [make_run(runner, tmp_path, f"c{k}", f"plain {k}") for k in range(3)]
    out, clean_out = tmp_path / "compare.html", tmp_path / "clean-compare.html"
    for dirs, target in ((runs, out), (clean_runs, clean_out)):
        result = runner.invoke(app, ["plot", *map(str, dirs), "--out", str(target)])
        assert result.exit_code == 0, result.output
    for text in INJECTIONS[:3]:
        assert_inert(out, text, shape(clean_out.read_text()))
