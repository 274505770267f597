"""Shared fixtures: small configs written to tmp_path and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

# The compiled group fits (fitcli.lm_jit) keep their machine code in a cache directory: the
# tests', and their subprocesses', is one of their own, never the user's.
os.environ.setdefault("FITCLI_CACHE_DIR", tempfile.mkdtemp(prefix="fitcli-test-cache-"))

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

SMALL = {
    "name": "small",
    "seed": 0,
    "device": "cpu",
    "epochs": 40,
    "snapshots": 4,
    "data": {
        "target": "1.5*sin(x) + 1.2*cos(x/4)",
        "x": {"start": -10, "stop": 10, "num": 200},
        "noise": {"std": 0.5},
    },
    "model": {"basis": ["x", "sin(x)", "cos(x/4)"]},
    "optimizer": {"name": "SGD", "lr": 0.01},
}


@pytest.fixture
def write_config(tmp_path):
    """write_config(overrides_dict=None, name='c.yaml') -> path of a YAML config in tmp_path."""

    def write(changes: dict | None = None, name: str = "c.yaml", base: dict | None = None) -> Path:
        cfg = json.loads(json.dumps(base or SMALL))
        for key, value in (changes or {}).items():
            node = cfg
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            if value is _DELETE:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    return write


_DELETE = object()


@pytest.fixture
def delete():
    return _DELETE


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


def fitcli_process(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120, **kw
) -> subprocess.CompletedProcess:
    """Run the real `fitcli` entry point in a subprocess."""
    full_env = {**os.environ, "COLUMNS": "120", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "fitcli.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def only_run_dir(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


# Whole suites of end-to-end tests (real processes, browsers, clusters, thousands of cases):
# marked slow, so `make test-fast` (pytest -m "not slow") leaves them to `make test`.
SLOW_FILES = (
    "test_faults_",
    "test_browser.py",
    "test_dask.py",
    "test_harness.py",
    "test_sweep_cli.py",
)


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if item.path.name.startswith(SLOW_FILES):
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter) -> None:
    """One line per group of skipped tests (their file and reason), so that a run that could not
    test something says so even with -q."""
    groups: dict[tuple[str, str], int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        key = (report.nodeid.split("::")[0], reason.removeprefix("Skipped: "))
        groups[key] = groups.get(key, 0) + 1
    for (where, reason), n in groups.items():
        terminalreporter.write_line(f"skipped {n} test{'s' * (n != 1)} in {where}: {reason}")
