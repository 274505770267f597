"""`fitcli runs`: find run directories below some paths and tabulate their summary.json."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fitcli import liveness
from fitcli.errors import InputError, RunFileError
from fitcli.rundir import files
from fitcli.rundir.reader import summary_problem

COLUMNS = ("name", "status", "epochs", "final_loss", "params", "time_s", "path")
SORT_KEYS = ("name", "status", "epochs", "final_loss", "time_s", "path")


def find_run_dirs(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Run directories at or below `paths` (a run directory's own subfolders are not searched),
    and (path, reason) for each given path that holds none or does not exist."""
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for root in paths:
        if not root.exists():
            skipped.append((root, "no such file or directory"))
            continue
        if not root.is_dir():
            skipped.append((root, "not a directory"))
            continue
        before = len(found)
        for here, dirs, names in os.walk(root):
            d = Path(here)
            # A folder with a summary.json is a candidate; `collect` reads it (files.read_summary)
            # and skips it with the reason when it is not a fitcli run directory after all.
            if files.SUMMARY in names:
                found.append(d)
                dirs.clear()
            else:
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        if len(found) == before:
            skipped.append((root, "no run directories below it"))
    return sorted(dict.fromkeys(found)), skipped


def _row(run_dir: Path, summary: dict) -> dict:
    params = summary.get("params") or {}
    loss = summary.get("final_loss")
    t = summary.get("elapsed_s")
    return {
        "name": str(summary.get("name", "")),
        "status": liveness.status_of(summary),
        "epochs": summary.get("epochs_run"),
        "final_loss": loss,
        "params": params,
        "time_s": t,
        "path": str(run_dir),
        "display": {
            "epochs": "" if summary.get("epochs_run") is None else str(summary["epochs_run"]),
            "final_loss": "-" if loss is None else f"{loss:.6g}",
            "params": "; ".join(
                part
                for part in (
                    _groups_text(summary),
                    ", ".join(
                        f"{k}={'-' if v is None else format(v, '.6g')}" for k, v in params.items()
                    ),
                )
                if part
            ),
            "time_s": "-" if t is None else f"{t:.2f}",
        },
    }


def _groups_text(summary: dict) -> str:
    """A grouped run's counts, shown before its shared parameters in the table: "96 groups: 95
    converged, 1 failed" (its per-group values are in its groups.csv); "" for a single run."""
    groups = summary.get("groups")
    if type(groups) is not int:
        return ""
    done = [
        f"{summary[key]} {word}"
        for key, word in (("groups_converged", "converged"), ("groups_failed", "failed"))
        if type(summary.get(key)) is int
    ]
    return f"{groups} groups" + (": " + ", ".join(done) if done else "")


def collect(paths: Iterable[Path]) -> tuple[list[dict], list[tuple[Path, str]]]:
    """One row per readable run directory; unreadable ones are skipped with the reason."""
    dirs, skipped = find_run_dirs(paths)
    rows = []
    for d in dirs:
        try:
            summary = files.read_summary(d)
        except RunFileError as exc:
            why, file = str(exc), f"{d / files.SUMMARY}: "
            why = f"unreadable {files.SUMMARY}: {why[len(file) :]}" if why.startswith(file) else why
            skipped.append((d, why.removeprefix(f"{d}: ")))
            continue
        problem = summary_problem(summary)
        if problem is not None:
            skipped.append((d, problem))
            continue
        rows.append(_row(d, summary))
    return rows, skipped


def sort_rows(rows: list[dict], key: str | None) -> list[dict]:
    if key is None:
        return rows
    if key not in SORT_KEYS:
        raise InputError(f"--sort: unknown column {key!r}; valid: {', '.join(SORT_KEYS)}")

    def k(r: dict) -> tuple:
        v = r[key]
        missing = v is None or (isinstance(v, float) and math.isnan(v))
        return (missing, v if not missing else 0)

    return sorted(rows, key=k)


def render_csv(rows: list[dict]) -> str:
    names: list[str] = []
    for r in rows:
        names += [n for n in r["params"] if n not in names]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "status", "epochs", "final_loss", *names, "time_s", "path"])
    for r in rows:
        p = r["params"]
        w.writerow(
            [
                r["name"],
                r["status"],
                "" if r["epochs"] is None else r["epochs"],
                "" if r["final_loss"] is None else files.fmt(r["final_loss"]),
                *("" if p.get(n) is None else files.fmt(p[n]) for n in names),
                "" if r["time_s"] is None else f"{r['time_s']:.6f}",
                r["path"],
            ]
        )
    return buf.getvalue()


def render_json(rows: list[dict]) -> str:
    out: list[Any] = [{k: r[k] for k in COLUMNS} for r in rows]
    return json.dumps(out, indent=2, allow_nan=False) + "\n"
