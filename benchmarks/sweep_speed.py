"""fitcli sweep against a shell loop of fitcli train, side by side, plus Dask and scaling.

    .venv/bin/python benchmarks/sweep_speed.py            # prints a Markdown section

1. The same 100 configurations (configs/seed.yaml, 10 learning rates x 10 seeds, default
   snapshots): a bash loop of 100 `fitcli train --json` processes, then `fitcli sweep` three
   times (the median counts: a short command suffers more from a burst of load on a shared
   machine than a three-minute loop), and once with one writer process (FITCLI_SWEEP_WRITERS=1).
   All write every run directory; the final parameters of every pair must be identical.
2. The same sweep on a local two-worker Dask cluster (`--scheduler local`) against in-process,
   alternated three times (medians), with identical final parameters.
3. In-process sweep time for 10, 100 and 1,000 runs.
Every command is timed from outside as a whole process (start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FITCLI = str(Path(sys.executable).parent / "fitcli")  # the environment running this script
CONFIG = "configs/seed.yaml"
LRS = ["0.001", "0.002", "0.003", "0.005", "0.007", "0.01", "0.012", "0.015", "0.02", "0.03"]


def timed(cmd: list[str] | str, **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=False, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def sweep_cmd(out: Path, seeds: int, *extra: str) -> list[str]:
    return [
        FITCLI, "sweep", CONFIG, f"optimizer.lr={','.join(LRS)}", f"seed=range(0,{seeds})",
        "--out", str(out), "--progress", "none", *extra,
    ]  # fmt: skip


def params_by_key(root: Path) -> dict[tuple[str, int], dict]:
    out = {}
    for s in root.rglob("summary.json"):
        doc = json.loads(s.read_text())
        cmd = doc["command"]
        lr = next(a.split("=", 1)[1] for a in cmd if a.startswith("optimizer.lr="))
        out[(lr, doc["seed"])] = doc["params"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,100,1000", help="runs for the scaling series")
    ap.add_argument("--skip-loop", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fitcli-sweep-bench-"))
    lines = [f"Load average (1, 5, 15 min) at the start: {load()}; CPUs: {os.cpu_count()}.", ""]
    try:
        if not args.skip_loop:
            loop_out = tmp / "loop"
            script = (
                f"for lr in {' '.join(LRS)}; do for seed in $(seq 0 9); do "
                f"{FITCLI} train {CONFIG} optimizer.lr=$lr seed=$seed --out {loop_out} "
                "--json --progress none > /dev/null; done; done"
            )
            t_loop = timed(["bash", "-c", script])
            sweeps = [timed(sweep_cmd(tmp / f"sweep{k}", 10)) for k in range(3)]
            t_sweep = sorted(sweeps)[1]
            one = {**os.environ, "FITCLI_SWEEP_WRITERS": "1"}
            t_one = timed(sweep_cmd(tmp / "one", 10), env=one)
            a = params_by_key(loop_out)
            same = all(
                len(a) == len(b) == 100 and all(a[k] == b[k] for k in a)
                for b in [params_by_key(tmp / f"sweep{k}") for k in range(3)]
                + [params_by_key(tmp / "one")]
            )
            lines += [
                "| 100 runs (seed config, 10 lr x 10 seeds) | wall s | ratio |",
                "|---|---:|---:|",
                f"| bash loop of `fitcli train --json` | {t_loop:.1f} | 1 |",
                f"| `fitcli sweep` (in-process, batched; median of "
                f"{', '.join(f'{t:.1f}' for t in sweeps)}) | {t_sweep:.1f} | "
                f"{t_loop / t_sweep:.1f}x faster |",
                f"| `fitcli sweep`, one writer process | {t_one:.1f} | "
                f"{t_loop / t_one:.1f}x faster |",
                "",
                f"Final parameters identical for all 100 runs: {'yes' if same else 'NO'}.",
                "",
            ]
        # Alternated, three times each (the medians count): a burst of load on a shared machine
        # then hits both sides alike.
        heres, dasks = [], []
        for k in range(3):
            heres.append(timed(sweep_cmd(tmp / f"here{k}", 10)))
            dasks.append(timed(sweep_cmd(tmp / f"dask{k}", 10, "--scheduler", "local")))
        t_here, t_dask = sorted(heres)[1], sorted(dasks)[1]
        here, dask = params_by_key(tmp / "here0"), params_by_key(tmp / "dask0")
        same = len(here) == len(dask) == 100 and all(here[k] == dask[k] for k in here)
        lines += [
            "| 100 runs | wall s (median of 3) | runs | ratio to in-process |",
            "|---|---:|---|---:|",
            f"| in-process | {t_here:.2f} | {', '.join(f'{t:.2f}' for t in heres)} | 1 |",
            f"| Dask, local cluster of 2 workers (`--scheduler local`) | {t_dask:.2f} | "
            f"{', '.join(f'{t:.2f}' for t in dasks)} | {t_dask / t_here:.2f}x |",
            "",
            f"Final parameters identical, Dask and in-process: {'yes' if same else 'NO'}.",
            "",
            "| runs | sweep wall s | s per run |",
            "|---:|---:|---:|",
        ]
        for n in [int(s) for s in args.sizes.split(",")]:
            t = timed(sweep_cmd(tmp / f"n{n}", max(1, n // 10)))
            lines.append(f"| {n} | {t:.1f} | {t / n:.3f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines += ["", f"Load average at the end: {load()}."]
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
