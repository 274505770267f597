"""The sweep directory: runs.csv (a `Row` per run), and creating or loading a sweep directory.
Torch-free at import."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitcli.config import dump_yaml, load_yaml
from fitcli.errors import (
    RunFileError,
    RunStatus,
)
from fitcli.rundir import files
from fitcli.rundir.reader import summary_problem
from fitcli.sweep.plan import SWEEP_FILE, Plan, RunSpec, SweepError

RUNS_FILE = "runs.csv"
SHARED_JS = ".plotly.min.js"


# --------------------------------------------------------------------------------------------
# The run table
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of runs.csv."""

    run: RunSpec
    status: str = RunStatus.PENDING
    exit_code: int | None = None
    converged: bool | None = None
    epochs: int | None = None
    final_loss: float | None = None
    params: dict[str, float] = field(default_factory=dict)
    time_s: float | None = None
    run_dir: str = ""
    reason: str | None = None
    summary: dict | None = None


def run_dir_name(plan: Plan, run: RunSpec) -> str:
    width = len(str(max(len(plan.runs) - 1, 0)))
    parts = [f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in run.values.items()]
    tail = files.slug("-".join(parts)) if parts else "run"
    return f"{run.index:0{width}d}-{tail}"[:80]


def write_table(sweep_dir: Path, plan: Plan, rows: Sequence[Row]) -> None:
    names: list[str] = []
    for r in rows:
        names += [n for n in r.params if n not in names]
    header = [
        "index",
        *(a.key for a in plan.axes),
        "status",
        "exit_code",
        "converged",
        "epochs",
        "final_loss",
        *names,
        "time_s",
        "run_dir",
    ]

    def cell(v: Any) -> str:
        if v is None:
            return ""
        return files.fmt(v) if isinstance(v, float) else str(v)

    lines = [
        [
            r.run.index,
            *(r.run.values[a.key] for a in plan.axes),
            r.status,
            cell(r.exit_code),
            "" if r.converged is None else str(r.converged).lower(),
            cell(r.epochs),
            cell(r.final_loss),
            *(cell(r.params.get(n)) for n in names),
            "" if r.time_s is None else f"{r.time_s:.6f}",
            r.run_dir,
        ]
        for r in rows
    ]
    files.write_csv(sweep_dir / RUNS_FILE, header, lines)


def row_from_summary(row: Row, summary: dict, sweep_dir: Path, run_dir: Path) -> None:
    row.summary = summary
    row.status = summary.get("status", RunStatus.FAILED)
    row.exit_code = summary.get("exit_code")
    row.converged = summary.get("converged")
    row.epochs = summary.get("epochs_run")
    row.final_loss = summary.get("final_loss")
    row.params = dict(summary.get("params") or {})
    row.time_s = summary.get("elapsed_s")
    row.reason = summary.get("reason")
    row.run_dir = os.path.relpath(run_dir, sweep_dir)


def create_sweep(plan: Plan, out: Path, command: list[str]) -> Path:
    """A new sweep directory with sweep.yaml and a runs.csv of pending runs."""
    name = plan.base.get("name", "sweep") if isinstance(plan.base, dict) else "sweep"
    sweep_dir = files.create_run_dir(out, f"{name}-sweep")
    doc = plan.to_doc()
    head = (
        "# A fitcli sweep: `fitcli sweep --resume DIR` runs what is missing or unfinished.\n"
        + files.command_comment(command)
    )
    files.atomic_write(sweep_dir / SWEEP_FILE, head + dump_yaml(doc))
    write_table(sweep_dir, plan, [Row(r) for r in plan.runs])
    return sweep_dir


def load_sweep(sweep_dir: Path) -> tuple[Plan, list[Row]]:
    """Plan and rows of an existing sweep directory (rows filled from the run directories; a run
    whose summary is unreadable or garbled is failed, so that it runs again)."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE})")
    text = files.read_run_text(sweep_dir, SWEEP_FILE)
    plan = Plan.from_doc(load_yaml(text, str(path)), str(path))
    rows = [Row(r) for r in plan.runs]
    for row in rows:
        d = sweep_dir / run_dir_name(plan, row.run)
        if os.path.lexists(d / files.SUMMARY):
            try:
                summary = files.read_summary(d)
                problem = summary_problem(summary)
            except RunFileError as exc:
                problem = str(exc).removeprefix(f"{d}: ")
            if problem is None:
                row_from_summary(row, summary, sweep_dir, d)
            else:
                row.status, row.reason = RunStatus.FAILED, problem
    return plan, rows
