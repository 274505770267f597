"""The fault suite at a larger scale than CI runs it, with its figures.

    .venv/bin/python benchmarks/faults.py            # scale 2: 10 minutes on 2 shared cores
    .venv/bin/python benchmarks/faults.py --scale 4

Runs tests/test_faults_*.py and tests/test_resume.py with FITCLI_FAULTS_SCALE set: every config
mutation (not the CI subset) plus more random byte files, every payload through a real process,
more hypothesis examples, SCALE x the SIGINT and SIGKILL moments, and the 64 concurrent runs each
copying plotly.min.js. Prints each suite's figures and the time taken; RELIABILITY.md quotes them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = re.compile(
    r"^(payload cases|\d+ mutated configs|SIGINT:|SIGKILL:|\d+ runs at once|disk full at).*"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()
    tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_faults_*.py"))
    tests.append("tests/test_resume.py")
    env = {**os.environ, "FITCLI_FAULTS_SCALE": str(args.scale)}
    cmd = [sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    for line in proc.stdout.splitlines():
        line = line.strip().lstrip(".")
        if FIGURES.match(line):
            print(line[:300])
    tail = [ln for ln in proc.stdout.splitlines() if " passed" in ln or " failed" in ln]
    print(f"scale {args.scale}: {tail[-1].strip() if tail else '?'} in {took / 60:.1f} min")
    if proc.returncode:
        print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
