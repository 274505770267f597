"""`fitcli plot` on the seed run directory, whole process, and the size of what it writes,
side by side with the tutorial's way (benchmarks/tutorial_baseline.py: 11 pages with plotly.js
embedded in each). Writes its figures into BENCHMARKS.md (its `plot` section only).

    .venv/bin/python benchmarks/plot_speed.py [--repeat 5] [--no-write]
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FITCLI = [sys.executable, "-m", "fitcli.cli"]
BEGIN, END = "<!-- plot begin -->", "<!-- plot end -->"


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def size(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = {}
        for mode in ("directory", "embed"):
            run = tmp / f"seed-{mode}"
            subprocess.run(
                [*FITCLI, "train", str(ROOT / "configs/seed.yaml"), "--run-dir", str(run)]
                + ["--progress", "none", "--plotlyjs", mode],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            times = [
                timed([*FITCLI, "plot", str(run), "--plotlyjs", mode]) for _ in range(args.repeat)
            ]
            pages = [run / "report.html", *sorted((run / "snapshots").glob("*.html"))]
            js = [run / "plotly.min.js"] if (run / "plotly.min.js").exists() else []
            rows[mode] = {
                "median": statistics.median(times),
                "min": min(times),
                "report": (run / "report.html").stat().st_size,
                "snapshots": size(pages[1:]),
                "n_snapshots": len(pages) - 1,
                "total": size(pages) + size(js),
            }
        base_dir = tmp / "baseline"
        base_times = [
            timed([sys.executable, str(ROOT / "benchmarks/tutorial_baseline.py"), str(base_dir)])
            for _ in range(max(1, args.repeat // 2))
        ]
        base_files = sorted(base_dir.glob("*.html"))
        base_total = size(base_files)

    d, e = rows["directory"], rows["embed"]
    lines = [
        "## fitcli plot: speed and size",
        "",
        "Command: `.venv/bin/python benchmarks/plot_speed.py` (whole-process `fitcli plot` on a "
        f"fresh `configs/seed.yaml` run, {args.repeat} repeats; the tutorial baseline "
        "`benchmarks/tutorial_baseline.py` run in the same script). "
        f"Machine: {platform.machine()}, Python {platform.python_version()}, "
        "2 shared cores (noisy).",
        "",
        "| | fitcli plot, plotly.js once per run dir (default) | fitcli plot, `--plotlyjs embed` "
        "| tutorial baseline (train + 11 `write_html`) |",
        "|---|---|---|---|",
        f"| whole process, median (min) | {d['median']:.2f} s ({d['min']:.2f} s) | "
        f"{e['median']:.2f} s ({e['min']:.2f} s) | {statistics.median(base_times):.2f} s |",
        f"| report.html | {mb(d['report'])} | {mb(e['report'])} | (none) |",
        f"| snapshot pages | {d['n_snapshots']} pages, {mb(d['snapshots'])} | "
        f"{e['n_snapshots']} pages, {mb(e['snapshots'])} | {len(base_files)} pages, "
        f"{mb(base_total)} |",
        f"| everything written, plotly.js included | {mb(d['total'])} | {mb(e['total'])} | "
        f"{mb(base_total)} |",
        f"| size vs baseline | {d['total'] / base_total:.3f}x ({base_total / d['total']:.1f}x "
        f"smaller) | {e['total'] / base_total:.3f}x | 1x |",
        "",
        "`fitcli plot` rebuilds all 11 snapshot pages (byte-identical to training's) and writes "
        "the report, which holds what the tutorial's 11 files show plus the loss curve, "
        "parameter trajectories, residuals and the summary, with one plotly.js. "
        "The baseline's time includes its 500 training epochs; fitcli's is plotting only "
        "(most of it is importing torch, which the residuals need: they evaluate the model "
        "rebuilt from config.yaml at every data point, exactly).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        bench = ROOT / "BENCHMARKS.md"
        current = bench.read_text() if bench.exists() else "# Benchmarks\n"
        block = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in current and END in current:
            current = re.sub(
                re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: block, current, flags=re.S
            )
        else:
            current = current.rstrip("\n") + "\n\n" + block + "\n"
        bench.write_text(current)


if __name__ == "__main__":
    main()
