"""End to end: whole `fitcli train` processes against a whole Python script that reads the same
data file with `pandas.read_csv` and calls scipy's `curve_fit` (same model, same start), side by
side; where a `fitcli train` spends its time; and peak memory of whole runs at 10^7 points.
Writes the `e2e` section of BENCHMARKS.md.

    .venv/bin/python benchmarks/e2e.py                 # 10^6 and 10^7 points (about 5 minutes)
    .venv/bin/python benchmarks/e2e.py --quick         # 10^6 only, no memory rows
    .venv/bin/python benchmarks/e2e.py --reps 5        # more alternations per size
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BIN, alternate, machine, median, peak_rss, record  # noqa: E402

TARGET = "90*exp(-0.01*x) + 100*exp(-(x-110)**2/25**2)"
MODEL = "a*exp(-b*x) + c*exp(-(x-d)**2/s**2)"
NAMES = ["a", "b", "c", "d", "s"]
START = [80.0, 0.02, 90.0, 100.0, 20.0]

# The baseline a user would write: read the file, fit, print the parameters.
CURVE_FIT = f"""
import sys, json
import numpy as np, pandas as pd
from scipy.optimize import curve_fit
def f(x, a, b, c, d, s):
    return a * np.exp(-b * x) + c * np.exp(-((x - d) ** 2) / s**2)
df = pd.read_csv(sys.argv[1])
p, cov = curve_fit(f, df["x"].to_numpy(), df["y"].to_numpy(), p0={START!r})
print(json.dumps(list(map(float, p))))
"""

# `fitcli train` in one process with its stages timed: the functions each stage is spent in are
# wrapped (after the imports, which are timed as start-up), then the command runs as usual.
BREAKDOWN = """
import time, sys, json
t0 = time.perf_counter()
import fitcli.cli, fitcli.resume, fitcli.experiment, fitcli.data, fitcli.plots, fitcli.stats
from fitcli.rundir import writer, files
t_import = time.perf_counter() - t0
spent = {}
def wrap(owner, name, label):
    fn = getattr(owner, name)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, timed)
wrap(fitcli.data, "load_table", "read")
wrap(fitcli.data, "file_digest", "digest")
wrap(fitcli.experiment, "train", "train")
wrap(writer.RunWriter, "begin", "begin")
wrap(writer.RunWriter, "snapshot", "snapshots")
wrap(fitcli.experiment, "fill_converged_snapshots", "filled")
wrap(fitcli.experiment, "finish_stats", "stats")
wrap(writer.RunWriter, "metrics", "metrics")
wrap(writer.RunWriter, "bands", "bands")
wrap(writer.RunWriter, "flush", "state")
sys.argv = ["fitcli", *sys.argv[1:]]
fitcli.cli._IN_MAIN = True
try:
    fitcli.cli.app(prog_name="fitcli")  # what `main` runs, without its exit (below)
except SystemExit:
    pass
spent["imports"] = t_import
spent["total"] = time.perf_counter() - t0
print(json.dumps(spent), file=sys.stderr)
sys.stderr.flush()
import os
os._exit(0)  # as `fitcli.cli.main` ends
"""


def write_data(n: int, path: Path) -> None:
    from fitcli.rundir import files

    x = np.linspace(0, 250, n)
    y = 90 * np.exp(-0.01 * x) + 100 * np.exp(-((x - 110) ** 2) / 25**2)
    y += np.random.default_rng(0).normal(0, 2, n)
    files.write_data_csv(path, x, y)


def file_config(path: Path, tmp: Path) -> Path:
    cfg = {
        "name": f"e2e-{path.stem}",
        "seed": 0,
        "epochs": 200,
        "device": "cpu",
        "data": {"file": str(path)},
        "model": {"expr": MODEL, "params": dict(zip(NAMES, START, strict=True))},
        "optimizer": {"name": "LM"},
    }
    out = tmp / f"{path.stem}.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def fitcli_cmd(cfg: Path, run: Path, *extra: str) -> list[str]:
    return [str(BIN / "fitcli"), "train", str(cfg), "--run-dir", str(run), "--overwrite",
            "--progress", "none", *extra]  # fmt: skip


def side_by_side(n: int, tmp: Path, reps: int) -> tuple[list[str], dict]:
    path = tmp / f"data-{n:.0e}.csv".replace("+", "")
    write_data(n, path)
    cfg = file_config(path, tmp)
    run = tmp / "run"
    py = str(BIN / "python")
    times = alternate(
        {"curve_fit": [py, "-c", CURVE_FIT, str(path)], "fitcli": fitcli_cmd(cfg, run)}, reps
    )
    ref = json.loads(subprocess.run([py, "-c", CURVE_FIT, str(path)], capture_output=True,
                                    text=True, check=True).stdout)  # fmt: skip
    got = json.loads((run / "summary.json").read_text())["params"]
    diff = max(abs(got[k] - r) / abs(r) for k, r in zip(NAMES, ref, strict=True))
    ratios = [f / c for f, c in zip(times["fitcli"], times["curve_fit"], strict=True)]
    stored = sorted(p.name for p in run.iterdir() if p.name.startswith("data"))
    row = (
        f"| {n:.0e} | {path.stat().st_size / 1e6:.0f} MB | {median(times['curve_fit']):.2f} s "
        f"| {median(times['fitcli']):.2f} s | {median(ratios):.2f}x "
        f"({min(ratios):.2f}-{max(ratios):.2f}) | {diff:.1e} | {', '.join(stored) or 'none'} |"
    )
    print(row, flush=True)
    res = subprocess.run([py, "-c", BREAKDOWN, *fitcli_cmd(cfg, run)[1:]], capture_output=True,
                         text=True, check=True)  # fmt: skip
    spent = json.loads(res.stderr.strip().splitlines()[-1])
    if "train" not in spent:
        raise RuntimeError(
            f"the timed run did not train:\n{res.stdout[-3000:]}{res.stderr[-3000:]}"
        )
    path.unlink()
    return [row], spent


def breakdown_rows(spent_by_n: dict[int, dict], python_s: float) -> list[str]:
    head = ["| stage |", "|---|"]
    labels = [
        ("Python start-up (`python -c pass`)", lambda s: python_s),
        ("imports (fitcli, torch, plotly, ...)", lambda s: s["imports"]),
        ("reading the data file (with its digest)", lambda s: s.get("read", 0.0)),
        ("of which the digest", lambda s: s.get("digest", 0.0)),
        ("run-directory data (data.csv / data.npz / a reference)", lambda s: s["begin"]),
        ("training (LM steps)", lambda s: s["train"] - (s["snapshots"] - s.get("filled", 0.0))),
        ("snapshots (pages and fitted curves)", lambda s: s["snapshots"]),
        ("final statistics", lambda s: s["stats"]),
        ("metrics.csv", lambda s: s.get("metrics", 0.0)),
        ("bands (bands.csv, the last page again)", lambda s: s.get("bands", 0.0)),
    ]
    for n in spent_by_n:
        head[0] += f" n = {n:.0e} |"
        head[1] += "---:|"
    rows = list(head)
    for label, get in labels:
        rows.append(f"| {label} | " + " | ".join(f"{get(s):.2f} s" for s in spent_by_n.values())
                    + " |")  # fmt: skip
    rest = [
        s["total"] - s["imports"] - s.get("read", 0.0) - s["begin"] - s["train"] - s["stats"]
        - s.get("filled", 0.0) - s.get("metrics", 0.0) - s.get("bands", 0.0)
        for s in spent_by_n.values()
    ]  # fmt: skip
    rows.append("| the rest (config, model, summary) | "
                + " | ".join(f"{r:.2f} s" for r in rest) + " |")  # fmt: skip
    return rows


def startup(reps: int) -> list[str]:
    py = str(BIN / "python")
    times = alternate(
        {
            "python": [py, "-c", "pass"],
            "torch": [py, "-c", "import torch"],
            "help": [str(BIN / "fitcli"), "--help"],
        },
        reps,
    )
    ratios = [h / t for h, t in zip(times["help"], times["torch"], strict=True)]
    return [
        "| `python -c pass` | `python -c 'import torch'` | `fitcli --help` | --help / torch |",
        "|---:|---:|---:|---:|",
        f"| {median(times['python']):.2f} s | {median(times['torch']):.2f} s "
        f"| {median(times['help']):.2f} s | {median(ratios):.2f}x "
        f"({min(ratios):.2f}-{max(ratios):.2f}) |",
    ]


def memory(n: int, tmp: Path) -> list[str]:
    rows = [
        f"| run (n = {n:.0e} synthetic points, float64) | wall | peak RSS | run-directory data |",
        "|---|---:|---:|---:|",
    ]
    for label, opt, epochs in (
        ("LM to convergence", {"name": "LM"}, 100),
        ("Adam, 20 epochs", {"name": "Adam", "lr": 0.01}, 20),
    ):
        cfg = {
            "name": label.split(",")[0].replace(" ", "-"),
            "seed": 0,
            "epochs": epochs,
            "device": "cpu",
            "data": {
                "target": TARGET,
                "x": {"start": 0, "stop": 250, "num": n},
                "noise": {"std": 2},
            },  # fmt: skip
            "model": {"expr": MODEL, "params": dict(zip(NAMES, START, strict=True))},
            "optimizer": opt,
        }
        path = tmp / "mem.yaml"
        path.write_text(yaml.safe_dump(cfg))
        run = tmp / f"mem-{cfg['name']}"
        wall, mb = peak_rss(fitcli_cmd(path, run))
        data = [p for p in run.iterdir() if p.name.startswith("data.")]
        size = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.0f} MB" for p in data)
        rows.append(f"| {label} | {wall:.1f} s | {mb:.0f} MB | {size} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    sizes = [10**6] if args.quick else [10**6, 10**7]
    rows = [
        "| n | data file | curve_fit script | `fitcli train` | ratio (range) "
        "| max rel. param difference | data in the run directory |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    spent: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for n in sizes:
            got, spent[n] = side_by_side(n, tmp, args.reps if n <= 10**6 else max(2, args.reps - 1))
            rows += got
        python_s = median(alternate({"p": [str(BIN / "python"), "-c", "pass"]}, 3)["p"])
        stages = breakdown_rows(spent, python_s)
        start = startup(5)
        mem = [] if args.quick else memory(10**7, tmp)
    load = Path("/proc/loadavg").read_text().split()[:3]
    text = "\n".join(
        [
            "## End to end: `fitcli train` against a curve_fit script",
            "",
            f"`.venv/bin/python benchmarks/e2e.py{' --quick' if args.quick else ''}"
            f"{f' --reps {args.reps}' if args.reps != 3 else ''}` on {machine()}, CPU only; load "
            f"average at the end {' '.join(load)} (other work shared the cores: compare ratios, "
            "not seconds).",
            "",
            f"A data file of n rows `x,y` (`{TARGET}` plus N(0, 2) noise, x in [0, 250]); model "
            f"`{MODEL}` from {dict(zip(NAMES, START, strict=True))}. Each is a whole process, "
            "alternated: `fitcli train FILE.yaml --run-dir R --overwrite --progress none` (LM, "
            "float64, default snapshots, the whole run directory written) against a Python "
            "script that reads the file with `pandas.read_csv`, calls `curve_fit` and prints "
            "the parameters. Ratio = fitcli / script, median over the alternations (range).",
            "",
            *rows,
            "",
            "Where one `fitcli train` spends its time (one run per size, stages timed inside "
            "the process; training excludes the snapshots written during it):",
            "",
            *stages,
            "",
            "Start-up, whole processes alternated 5 times (medians):",
            "",
            *start,
            *(
                [
                    "",
                    "Peak resident set of a whole `fitcli train` (`/usr/bin/time -v`):",
                    "",
                    *mem,
                ]
                if mem
                else []
            ),
        ]
    )
    print(text)
    if not args.no_record:
        record("e2e", text)


if __name__ == "__main__":
    main()
