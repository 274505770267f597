"""What pyproject.toml declares is true of the source tree, in the form current tools accept."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_an_spdx_expression_and_the_backend_reads_it():
    # The table form ({text = "MIT"}) is deprecated: setuptools warns about it on every install.
    assert PROJECT["project"]["license"] == "MIT"
    (setuptools,) = [r for r in PROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    low = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools)
    assert low and int(low.group(1)) >= 77  # the first setuptools to read a license string


def test_every_declared_package_file_exists():
    where = PROJECT["tool"]["setuptools"]["packages"]["find"]["where"]
    for package, patterns in PROJECT["tool"]["setuptools"]["package-data"].items():
        folder = ROOT.joinpath(*where, *package.split("."))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: {pattern} is declared but absent"
