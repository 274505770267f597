"""Sweeps: grid expansion, executors (in-process batched, local processes, Dask), the run table.

A sweep is the Cartesian product of axes (`key=a,b,c` or `key=range(start, stop[, step])`) over a
base config. Every run is computed somewhere (a batch in this process, a local process, a Dask
worker) into a `Trace`: the loss before each step, the parameters after it and the stepper state
at every snapshot epoch. Its run directory is written by replaying the trace through
`experiment.execute` (`write_run`), so it is the one `fitcli train` writes, file for file, and the
parameters are the same to the last bit (see `model.rows_dot`). This process, or writer processes
it forks, replay into the sweep directory; a Dask worker replays into a scratch folder of its own
and sends the files back (`Rendered`), which this process puts in place whole.

Runs that share a basis model, data grid, loss and epochs, and use an elementwise torch.optim
optimizer without a scheduler or mini-batches, train together as one batched tensor program: a
leading run dimension on the parameters, one optimizer per distinct optimizer section.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fitcli import console
from fitcli.config import load_yaml
from fitcli.errors import ExitCode, RunStatus, exit_code_for, strict_exit_code
from fitcli.rundir import files
from fitcli.sweep.batch import (
    Task,
    batch_key,
    batchable,
    compute_batch,
    make_tasks,
    run_task,
)
from fitcli.sweep.cluster import (
    CONNECT_TIMEOUT_S,
    DASK_HINT,
    DASK_RENDER_RUNS,
    Rendered,
    _run_dask,
    connect,
    dask_available,
    dask_setup,
    disconnect,
    install_rendered,
    probe_scheduler,
    read_tree,
    render_task,
    render_traces,
    shared_plotly_js,
)
from fitcli.sweep.local import _run_here, _run_processes, _write_forked, writer_processes
from fitcli.sweep.plan import (
    FORMAT,
    MAX_RUNS,
    SWEEP_FILE,
    Axis,
    Plan,
    RunSpec,
    SweepError,
    check_grid_size,
    check_on_cluster,
    dry_run_lines,
    expand,
    make_plan,
    parse_assignments,
    split_values,
    torch_problems,
    validate_plan,
)
from fitcli.sweep.replay import (
    RecordingStepper,
    ReplayStepper,
    Trace,
    claim_and_write,
    compute_single,
    write_run,
)
from fitcli.sweep.table import (
    RUNS_FILE,
    SHARED_JS,
    Row,
    create_sweep,
    load_sweep,
    row_from_summary,
    run_dir_name,
    write_table,
)

# Statuses a resumed sweep keeps; anything else (missing, interrupted, failed) runs again.
FINISHED = (RunStatus.COMPLETED, RunStatus.DIVERGED)


# --------------------------------------------------------------------------------------------
# Running a sweep
# --------------------------------------------------------------------------------------------


@dataclass
class Options:
    """How a sweep runs (everything but what it runs)."""

    workers: int = 0
    scheduler: str | None = None
    fail_fast: bool = False
    plotlyjs: str = "directory"
    client: Any = None  # a Dask client connected before the sweep directory was made
    strict: bool = False  # exit 4 when every run completed but some did not converge


@dataclass
class Outcome:
    """What `run_sweep` hands back to the command line."""

    sweep_dir: Path
    plan: Plan
    rows: list[Row]
    interrupted: bool = False
    signal: str | None = None  # the signal that interrupted it (None: Ctrl-C as far as known)
    strict: bool = False

    @property
    def completed(self) -> int:
        return sum(r.status == RunStatus.COMPLETED for r in self.rows)

    @property
    def failed(self) -> int:
        return sum(r.status not in (RunStatus.COMPLETED, RunStatus.PENDING) for r in self.rows)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return int(exit_code_for(RunStatus.INTERRUPTED, self.signal))
        if not all(r.status == RunStatus.COMPLETED for r in self.rows):
            return int(exit_code_for(RunStatus.FAILED))
        converged = all(r.converged is not False for r in self.rows)
        return strict_exit_code(int(exit_code_for(RunStatus.COMPLETED)), converged, self.strict)

    def to_json(self) -> dict:
        runs = []
        for r in self.rows:
            entry = dict(r.summary) if r.summary else {"status": r.status, "run_dir": None}
            if r.summary is None and r.reason:
                entry["reason"] = r.reason
            entry["index"] = r.run.index
            # The values as the run's config reads them (`0.001` a number), not their texts.
            entry["values"] = {k: load_yaml(v, f"{k}={v}") for k, v in r.run.values.items()}
            runs.append(entry)
        return {
            "sweep_dir": str(self.sweep_dir),
            "runs": runs,
            "completed": self.completed,
            "failed": self.failed,
        }


class _Stop:
    """Stop requests from a signal (`flag`: Ctrl-C, SIGTERM, SIGHUP) and --fail-fast."""

    def __init__(self, flag: Any, fail_fast: bool) -> None:
        self.flag, self.fail_fast, self.failed = flag, fail_fast, False

    @property
    def signal(self) -> str | None:
        """The signal that asked to stop, if one did."""
        if self.flag is None or not self.flag.requested:
            return None
        return getattr(self.flag, "signal", None)

    def __call__(self) -> bool:
        return bool(self.flag is not None and self.flag.requested) or (
            self.fail_fast and self.failed
        )


def run_sweep(
    plan: Plan,
    sweep_dir: Path,
    rows: list[Row],
    options: Options,
    *,
    stop_flag: Any = None,
    progress: Any = None,
) -> Outcome:
    """Compute every pending row (batched where possible) and write its run directory."""
    todo = [r for r in rows if r.status not in FINISHED]
    cfgs = {r.run.index: plan.cfg(r.run) for r in todo}
    stop = _Stop(stop_flag, options.fail_fast)
    outcome = Outcome(sweep_dir, plan, rows, strict=options.strict)
    by_index = {r.run.index: r for r in rows}
    done = [
        sum(r.status in FINISHED for r in rows),
        sum(r.status == RunStatus.DIVERGED for r in rows),
    ]
    if progress is not None:
        progress.update(done[0], done[1])

    def target_of(trace: Trace) -> Path:
        return sweep_dir / run_dir_name(plan, by_index[trace.index].run)

    def record(trace: Trace, summary: dict | None) -> None:
        """A run computed (and written, with its summary): its row and the progress bar."""
        row = by_index[trace.index]
        if trace.error is not None:
            row.status, row.exit_code, row.reason = RunStatus.FAILED, trace.exit_code, trace.error
            if trace.exit_code == int(ExitCode.INVALID_INPUT):
                row.status = "invalid"
            console.warn(f"run {row.run.index} failed: {trace.error}")
        else:
            assert summary is not None
            row_from_summary(row, summary, sweep_dir, target_of(trace))
            if trace.batched > 1 and row.time_s is not None:
                row.time_s = trace.wall + row.time_s
        done[0] += 1
        if row.status != RunStatus.COMPLETED:
            done[1] += 1
            if row.status != RunStatus.INTERRUPTED:
                stop.failed = True
        if progress is not None:
            progress.update(done[0], done[1])

    def stamp(trace: Trace) -> None:
        """A run stopped mid-way was stopped by this process's stop: by its signal, if any."""
        if trace.stop_epoch is not None and trace.stop_signal is None:
            trace.stop_signal = stop.signal

    def accept(trace: Trace, prep: Any = None) -> None:
        summary = None
        stamp(trace)
        if trace.error is None:
            run = by_index[trace.index].run
            summary = claim_and_write(plan, run, trace, target_of(trace), options.plotlyjs, prep)
        record(trace, summary)

    def accept_batch(pairs: list[tuple[Trace, Any]]) -> None:
        """A computed batch (each trace with its untouched prepared run): the first run is written
        here (it sets up the sweep's shared plotly.js), the rest by forked writer processes."""
        ready = [(t, p) for t, p in pairs if t.error is None]
        for trace, _ in pairs:
            stamp(trace)  # before the writers fork: they replay it
            if trace.error is not None:
                record(trace, None)
        if ready:
            accept(*ready[0])
        jobs = [
            (plan, by_index[t.index].run, t, target_of(t), options.plotlyjs, p)
            for t, p in ready[1:]
        ]
        _write_forked(jobs, lambda k, summary: record(jobs[k][2], summary))

    def accept_rendered(rendered: Rendered) -> None:
        """A run a Dask worker computed and wrote: its files go in place here."""
        trace, summary = rendered.trace, None
        if trace.error is None:
            summary = install_rendered(rendered, target_of(trace), options.plotlyjs)
        record(trace, summary)

    indices = [r.run.index for r in todo]
    unfinished: list[int] = []  # runs handed to a Dask cluster that did not come back
    try:
        if options.scheduler:
            _run_dask(plan, cfgs, indices, options, accept_rendered, stop, unfinished)
        elif options.workers > 1:
            _run_processes(plan, cfgs, indices, options, accept, stop, unfinished)
        else:
            _run_here(plan, cfgs, indices, accept, stop, accept_batch)
    except KeyboardInterrupt as exc:
        outcome.interrupted = True
        outcome.signal = getattr(exc, "signal", None) or stop.signal
    finally:
        if stop_flag is not None and stop_flag.requested:
            outcome.interrupted = True
            outcome.signal = outcome.signal or stop.signal
        for r in rows:
            if r.status == RunStatus.RUNNING:
                r.status = RunStatus.INTERRUPTED
        if outcome.interrupted:
            where = "Dask" if options.scheduler else "its worker process"
            for i in unfinished:
                if by_index[i].status == RunStatus.PENDING:
                    by_index[i].status = RunStatus.INTERRUPTED
                    by_index[i].reason = f"interrupted before its result came back from {where}"
                    by_index[i].exit_code = outcome.exit_code
        write_table(sweep_dir, plan, rows)
    return outcome


def start(
    config: Path | None,
    axes: list[str],
    *,
    resume: Path | None,
    out: Path,
    options: Options,
    stop: Any,
    command: list[str],
    dry_run: bool = False,
    progress: Any = None,
) -> Outcome | Iterable[str]:
    """Run a sweep: plan it from `config` and `axes` (or load the sweep directory `resume`),
    connect to the Dask scheduler and check the plan there, make the sweep directory, run it.
    With `dry_run`, the runs as `fitcli train` commands instead (one line each, as they are
    made), with nothing run or written.

    `stop` (the command's stop flag) is armed once there is a sweep directory to record a stop
    in; before, a signal ends the command at once. `progress(n_runs, label)` makes the progress
    bar (a context manager) the runs report to. A client connected here is disconnected if the
    sweep directory cannot be made, and by `run_sweep` otherwise.
    """
    if resume is not None:
        if config is not None or axes:
            raise SweepError("--resume takes the sweep directory only, no config or axes")
        plan, rows = load_sweep(resume)
        sweep_dir = resume
        stop.arm()
    elif config is None:
        raise SweepError("missing the config file: fitcli sweep CONFIG key=a,b ...")
    else:
        # With a Dask scheduler the checks against torch run on a worker, after connecting.
        plan = make_plan(config, axes, torch_checks=not options.scheduler)
        rows = None
    if dry_run:
        return dry_run_lines(plan)
    if options.workers < 0:
        raise SweepError("--workers must be 0 or more")
    if options.scheduler and not dask_available():
        raise SweepError(DASK_HINT)
    client = connect(options.scheduler) if options.scheduler else None
    if rows is None:
        try:
            if client is not None:
                check_on_cluster(client, plan)
            stop.arm()
            sweep_dir = create_sweep(plan, out, command)
        except BaseException:
            if client is not None:
                disconnect(client)
            raise
        rows = [Row(r) for r in plan.runs]
    options = replace(options, client=client)
    label = plan.base.get("name", "sweep") if isinstance(plan.base, dict) else "sweep"
    shown = progress(len(rows), label) if progress is not None else contextlib.nullcontext()
    with shown as bar:
        return run_sweep(plan, sweep_dir, rows, options, stop_flag=stop, progress=bar)


__all__ = [
    "Axis",
    "CONNECT_TIMEOUT_S",
    "DASK_HINT",
    "DASK_RENDER_RUNS",
    "FORMAT",
    "MAX_RUNS",
    "Options",
    "Outcome",
    "Plan",
    "RUNS_FILE",
    "RecordingStepper",
    "Rendered",
    "ReplayStepper",
    "Row",
    "RunSpec",
    "SHARED_JS",
    "SWEEP_FILE",
    "SweepError",
    "Task",
    "Trace",
    "_write_forked",
    "batch_key",
    "batchable",
    "check_grid_size",
    "check_on_cluster",
    "claim_and_write",
    "compute_batch",
    "compute_single",
    "connect",
    "create_sweep",
    "dask_available",
    "dask_setup",
    "disconnect",
    "dry_run_lines",
    "expand",
    "install_rendered",
    "load_sweep",
    "make_plan",
    "make_tasks",
    "parse_assignments",
    "probe_scheduler",
    "read_tree",
    "render_task",
    "render_traces",
    "row_from_summary",
    "run_dir_name",
    "run_sweep",
    "run_task",
    "shared_plotly_js",
    "split_values",
    "files",
    "start",
    "torch_problems",
    "validate_plan",
    "write_run",
    "write_table",
    "writer_processes",
]


class _CallableSweep(types.ModuleType):
    """`fitcli.sweep` is this package, and called it is the Python API's `fitcli.api.sweep`:
    importing the package binds the name `fitcli.sweep` to it, so a function of that name in
    `fitcli` would be replaced by the package as soon as anything imported it."""

    def __call__(self, config: Any, axes: Any, **options: Any) -> Any:
        from fitcli.api import sweep as run

        return run(config, axes, **options)


sys.modules[__name__].__class__ = _CallableSweep
