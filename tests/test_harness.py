"""The test run itself tells the truth: what it skipped, and why; in CI a missing browser fails."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import ROOT


def browser_tests(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """tests/test_browser.py in a pytest of its own, with no Chromium where it looks for one."""
    full = {k: v for k, v in os.environ.items() if k != "CI"}
    full["FITCLI_TEST_CHROMIUM"] = str(tmp_path / "no-chromium")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_browser.py", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_missing_browser_fails_the_run_in_ci(tmp_path):
    res = browser_tests(tmp_path, CI="true")
    assert res.returncode == 1, res.stdout
    assert "CI=true" in res.stdout and "no-chromium" in res.stdout
    assert " passed" not in res.stdout


def test_a_missing_browser_is_one_skip_line_locally(tmp_path):
    res = browser_tests(tmp_path)
    assert res.returncode == 0, res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("skipped ")]
    assert len(lines) == 1, res.stdout
    assert re.match(r"skipped \d+ tests in tests/test_browser.py: needs Chromium", lines[0])
    assert "no-chromium" in lines[0]
    assert "apt-get install chromium chromium-driver" in lines[0]
