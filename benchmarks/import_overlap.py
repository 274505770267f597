"""The whole `fitcli train` process with the data file read while torch is imported (a helper
thread, `fitcli.torchboot.importing_meanwhile`) against the two one after the other
(FITCLI_IMPORT_MEANWHILE=0), side by side, runs interleaved.

    python benchmarks/import_overlap.py                   # 10^4 and 10^5 groups; BENCHMARKS.md
    python benchmarks/import_overlap.py --groups 10000 --reps 3 --no-record

The data are those of benchmarks/groups.py's 1-D Gaussian (100 points per group, one group
column; 10^5 groups: 10^7 rows, 441 MB of CSV), fitted by the compiled independent fits with
a warm kernel cache (one run before the measured ones).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import alternate, machine, record, train_cmd, wall  # noqa: E402
from groups import GAUSS1, make_1d, write_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, nargs="*", default=[10_000, 100_000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    lines = [
        "Command: `python benchmarks/import_overlap.py"
        + (
            ""
            if args.groups == [10_000, 100_000]
            else f" --groups {' '.join(map(str, args.groups))}"
        )
        + ("" if args.reps == 5 else f" --reps {args.reps}")
        + "`",
        "",
        f"Machine: {machine()} (shared with other jobs: wall times are noisy).",
        "",
        "| groups (rows) | one after the other, s (median) | meanwhile, s (median) | saved, s | "
        "ratio | runs, one after the other | runs, meanwhile |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for groups in args.groups:
            frame, _ = make_1d(groups, np.random.default_rng(0))
            data = Path(tmp) / f"g{groups}.csv"
            frame.to_csv(data, index=False)
            del frame
            cfg = Path(tmp) / f"g{groups}.yaml"
            write_config(cfg, str(data), GAUSS1, {"x": "x", "y": "y", "group": "g"}, "float64")
            run = Path(tmp) / "run"

            def cmd(value: str, cfg: Path = cfg, run: Path = run) -> list[str]:
                return [
                    "env",
                    f"FITCLI_IMPORT_MEANWHILE={value}",
                    *train_cmd(cfg, run),
                    "--overwrite",
                ]

            wall(cmd("1"))  # compiles or loads the kernels; the page cache holds the file
            times = alternate({"seq": cmd("0"), "par": cmd("1")}, args.reps)
            seq, par = statistics.median(times["seq"]), statistics.median(times["par"])
            lines.append(
                f"| {groups:,} ({groups * 100:,}) | {seq:.2f} | {par:.2f} | {seq - par:.2f} | "
                f"{seq / par:.2f} | {', '.join(f'{t:.2f}' for t in times['seq'])} | "
                f"{', '.join(f'{t:.2f}' for t in times['par'])} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if not args.no_record:
        record("import-overlap", text)


if __name__ == "__main__":
    main()
