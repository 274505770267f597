"""Helpers shared by the benchmark scripts: timing whole processes and updating BENCHMARKS.md."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def train_cmd(cfg: Path, run: Path) -> list[str]:
    """`fitcli train CFG --run-dir RUN --progress none` with the Python running the script."""
    return [
        sys.executable, "-m", "fitcli.cli", "train", str(cfg),
        "--run-dir", str(run), "--progress", "none",
    ]  # fmt: skip


def wall(cmd: list[str], **kw) -> float:
    """Seconds one whole process takes (stdout/stderr discarded); fails loudly on non-zero exit."""
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t


def alternate(cmds: dict[str, list[str]], reps: int, **kw) -> dict[str, list[float]]:
    """Run each command `reps` times, interleaved, so machine noise hits all of them alike."""
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(reps):
        for name, cmd in cmds.items():
            times[name].append(wall(cmd, **kw))
    return times


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak resident set in MB) of one whole process, by /usr/bin/time -v."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {res.stderr[-2000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    assert found is not None, res.stderr[-2000:]
    return wall, int(found.group(1)) / 1024


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def record(section: str, text: str) -> None:
    """Replace the `<!-- {section} begin/end -->` block of BENCHMARKS.md with `text`."""
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text()
    begin, end = f"<!-- {section} begin -->", f"<!-- {section} end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    block = f"{begin}\n{text.rstrip()}\n{end}"
    doc = pattern.sub(lambda _: block, doc) if pattern.search(doc) else doc + "\n" + block + "\n"
    path.write_text(doc)
