"""How long static figures take (`fitcli plot RUN_DIR --format`): kaleido in the system
Chromium, on a fresh `configs/seed.yaml` run. In-process, `repeat` browser sessions each draw
the fit and the loss figure in PNG, SVG and PDF (six images, in that order); then the whole
`fitcli plot --format png` process. Writes the "Static figures" section of BENCHMARKS.md.

    .venv/bin/python benchmarks/export_speed.py [--repeat 3] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, machine, record, wall

from fitcli import export
from fitcli.figures import figures_of
from fitcli.rundir.reader import read_run

FITCLI = [sys.executable, "-m", "fitcli.cli"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md")
    args = ap.parse_args()
    browser = export.find_browser()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "seed"
        subprocess.run(
            [*FITCLI, "train", str(ROOT / "configs/seed.yaml"), "--run-dir", str(run)]
            + ["--progress", "none"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        figs = figures_of(read_run(run))
        images = [
            export.Image(figs[name], fmt) for fmt in export.FORMATS for name in ("fit", "loss")
        ]
        sessions = [export.render(images, browser) for _ in range(args.repeat)]
        whole = [wall([*FITCLI, "plot", str(run), "--format", "png"]) for _ in range(args.repeat)]
    start = statistics.median(s.start_s for s in sessions)
    first = statistics.median(s.start_s + s.each_s[0] for s in sessions)
    later = [t for s in sessions for t in s.each_s[1:]]
    by_kind = {
        f"{im.format} {name}": statistics.median(s.each_s[k] for s in sessions)
        for k, (im, name) in enumerate(zip(images, ["fit", "loss"] * 3, strict=True))
    }
    lines = [
        "## Static figures",
        "",
        "Command: `.venv/bin/python benchmarks/export_speed.py` (a fresh `configs/seed.yaml` "
        f"run; {args.repeat} browser sessions, each drawing the fit and loss figures in PNG "
        f"(300 dpi), SVG and PDF at 700 x 500, in that order; browser {browser}). "
        f"Machine: {machine()}, shared and noisy.",
        "",
        "| | median | max |",
        "|---|---|---|",
        f"| browser start (once per `fitcli plot --format` or train) | {start:.2f} s | "
        f"{max(s.start_s for s in sessions):.2f} s |",
        f"| first figure, browser start included | {first:.2f} s | "
        f"{max(s.start_s + s.each_s[0] for s in sessions):.2f} s |",
        f"| each figure after the first | {statistics.median(later):.2f} s | {max(later):.2f} s |",
        f"| whole `fitcli plot RUN --format png` process (2 figures) | "
        f"{statistics.median(whole):.2f} s | {max(whole):.2f} s |",
        "",
        "Each image after the first, median: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in list(by_kind.items())[1:])
        + ". All the figures of a call share one browser session; the whole process also "
        "imports torch (the residuals evaluate the rebuilt model at every data point).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        record("figures", text)


if __name__ == "__main__":
    main()
