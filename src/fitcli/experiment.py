"""One run, start to finish: a prepared run (`fitcli.prepare`) -> train -> run directory.

`prepare` validates everything and builds the tensors without touching the disk, so bad input
never leaves a half-written run directory; `execute` trains into the directory and writes it
through `rundir.writer`, deciding the run's status (one place) and its error bars.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fitcli.torchboot import import_torch

if TYPE_CHECKING:
    import torch
else:
    torch = import_torch()  # before the modules that use it (torchboot defers torch._dynamo)

import contextlib

from fitcli.errors import FitcliError, RunDirError, RunStatus, exit_code_for
from fitcli.prepare import Prepared
from fitcli.rundir import files
from fitcli.rundir.writer import (
    RunWriter,
    base_summary,
    failure_fields,
    interruption_fields,
    versions,
)
from fitcli.train import TrainResult, snapshot_epochs, train


def resolved_config_text(cfg: Any, device: torch.device, command: list[str]) -> str:
    """config.yaml of a run: the resolved config (rerunnable as is) with provenance comments."""
    from fitcli.config import config_to_dict, dump_yaml

    d = config_to_dict(cfg)
    d["device"] = str(device)
    v = versions()
    head = [
        "# Resolved config of this run: `fitcli train config.yaml` reruns it.",
        f"# fitcli {v['fitcli_version']}, torch {v['torch_version']}, Python {v['python_version']}",
    ]
    return "\n".join(head) + "\n" + files.command_comment(command) + dump_yaml(d)


def execute(
    prep: Prepared,
    run_dir: Path,
    *,
    plotlyjs: str = "directory",
    command: list[str] | None = None,
    on_epoch: Callable[[int, float], bool] | None = None,
    resume: Any = None,
    defer_state: bool = False,
    stopped_by: Callable[[], str | None] | None = None,
    copy_data: bool = False,
) -> dict:
    """Train a prepared run into `run_dir` (already created) and return its summary.

    With `resume` (a `resume.ResumePoint`), continue that run directory from its saved state.
    `defer_state` writes params.json and state.json once at the end (see `RunWriter`).
    `stopped_by` names the signal that made `on_epoch` stop the run (SIGINT, SIGTERM, SIGHUP;
    None when none did, e.g. --fail-fast): the summary records it and exits by it.
    `copy_data`: a data file above `files.DATA_CSV_MAX_ROWS` rows is copied (data.npz), not
    referenced (`rundir.writer.data_form`); a resumed run keeps the form it has.
    """
    from fitcli.train import History

    command = command if command is not None else sys.argv
    if getattr(prep, "grouped", False):  # data in groups: `fitcli.grouped_run`
        from fitcli.grouped_run import execute_grouped

        return execute_grouped(
            prep,  # type: ignore[arg-type]
            run_dir,
            plotlyjs=plotlyjs,
            command=command,
            on_epoch=on_epoch,
            stopped_by=stopped_by,
            resume=resume,
            copy_data=copy_data,
        )
    cfg = prep.cfg
    t0 = time.perf_counter()
    if resume is None and cfg.starts > 1 and prep.starts is None:
        # Not searched yet (`resume.start` searches before the run directory exists).
        from fitcli.starts import search

        search(prep)
    if resume is not None:
        copy_data = "data_file" not in resume.summary
    writer = RunWriter(run_dir, prep, plotlyjs, defer_state=defer_state, copy_data=copy_data)
    # A plain dict while it is filled in: stats and the optimizer adapters return plain dicts.
    summary: dict[str, Any] = dict(base_summary(prep, run_dir, command, data_form=writer.data_form))
    history, start_epoch = History(), 0
    if resume is not None:
        history, start_epoch = resume.history, resume.epoch
        summary = resume.continued_summary(summary)
    writer.history = history
    try:
        # Inside the try: a fault (disk full, Ctrl-C) while starting still marks the run.
        if resume is None:
            writer.begin(resolved_config_text(cfg, prep.device, command), summary)
        else:
            text = resolved_config_text(cfg, prep.device, command) if resume.overrides else None
            writer.resume(text, summary, resume)
        result = train(
            prep.model,
            prep.stepper,
            epochs=cfg.epochs,
            evaluate_loss=prep.evaluate_loss,
            snapshots_at=snapshot_epochs(cfg.epochs, cfg.snapshots),
            on_epoch=on_epoch,
            on_snapshot=writer.snapshot,
            start_epoch=start_epoch,
            history=history,
        )
        writer.metrics(result)
        # Still inside: a second Ctrl-C or a fault while finishing must not leave "running".
        conclude(prep, result, summary, t0=t0, stopped_by=stopped_by)
        if prep.lm:
            fill_converged_snapshots(writer, prep, result, bool(summary.get("converged")))
        # After the last snapshot page: it is drawn again with the bands of the final fit (or,
        # held back by `defer_state`, drawn once with them before `flush` writes the state).
        writer.bands(summary)  # needs the error bars; summary.json says what it wrote
        writer.flush()
        if "params" in summary.get("intervals", {}):
            files.write_json(run_dir / files.INTERVALS, summary["intervals"])
        files.write_json(run_dir / files.SUMMARY, summary)
    except BaseException as exc:
        summary.update(params=prep.model.values())
        summary.update(failure_fields(exc, time.perf_counter() - t0, stopped_by))
        summary.pop("process", None)
        with contextlib.suppress(Exception):
            writer.flush()  # the last snapshot's state, as fitcli train would have left it
        with contextlib.suppress(FitcliError):
            files.write_json(run_dir / files.SUMMARY, summary)
        raise
    writer.figures(summary)  # after the run is written whole: a failure here leaves it so
    return summary


def conclude(
    prep: Prepared,
    result: TrainResult,
    summary: dict[str, Any],
    *,
    t0: float,
    stopped_by: Callable[[], str | None] | None = None,
) -> dict[str, Any]:
    """Fill in the end of a run's summary (in place, and returned): its status, parameters,
    error bars and verdict. The one place a trained run's outcome is decided, for a run
    directory (`execute`) and for a fit in memory (`fitcli.api.fit`) alike; no I/O.

    The run's status is the loop's, unless the optimizer reports that it cannot continue (LM at
    a point where the model is not finite), which fails the run.
    """
    from fitcli.stats import minimum_of, verdict

    status, reason = result.status, result.reason
    failure = getattr(prep.stepper, "failure", None)
    if failure is not None:
        status, reason = RunStatus.FAILED, failure
    summary.update(
        status=status,
        exit_code=int(exit_code_for(status)),
        epochs_run=result.epochs_run,
        final_loss=result.final_loss,
        params=prep.model.values(),
        reason=reason,
        elapsed_s=time.perf_counter() - t0,
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    if status == RunStatus.INTERRUPTED:
        by = stopped_by() if stopped_by is not None else None
        summary.update(interruption_fields(by, f"after epoch {result.epochs_run}"))
    summary.pop("process", None)  # finished: no process writes it any more
    if prep.lm:
        summary.update(prep.stepper.summary_fields())
    summary.update(finish_stats(prep, result))
    if prep.cfg.uncertainty.method != "covariance":
        summary["intervals"] = finish_intervals(prep, summary)
    summary.update(
        verdict(
            summary["status"],
            summary["reason"],
            result.epochs_run,
            summary["uncertainty"],
            minimum_of(prep.cfg.loss),
        )
    )
    return summary


def fill_converged_snapshots(
    writer: RunWriter, prep: Prepared, result: TrainResult, converged: bool = False
) -> None:
    """LM stopped early by itself: the scheduled snapshots it did not reach show the final fit,
    so that a run still has `snapshots + 1` of them (the final one takes the place of the next
    scheduled one when it is not itself scheduled). Their note says what happened: "converged
    at epoch N" when the run's verdict (`stats.verdict`, with the error bars: `converged`) says
    it converged, else "stopped at epoch N"; the plots title them as the final fit."""
    stepper, cfg = prep.stepper, prep.cfg
    done = result.epochs_run
    if result.status != RunStatus.COMPLETED or stepper.failure or not stepper.converged:
        return
    scheduled = snapshot_epochs(cfg.epochs, cfg.snapshots)
    later = [e for e in scheduled if e > done]
    if done not in scheduled:
        later = later[1:]
    history, writer.history = writer.history, None  # state.json stays at the real last epoch
    try:
        for epoch in later:
            how = "converged" if converged else "stopped"
            writer.snapshot(epoch, result.final_loss, note=f"{how} at epoch {done}")
    finally:
        writer.history = history


@contextlib.contextmanager
def small_data_threads(n: int):
    """One torch thread while working on fewer than `model.ROW_EXACT_LIMIT` points.

    Below it torch's own kernels are serial anyway, but LAPACK (the QR of the fit statistics)
    may split its work by thread count, so the last bits of the statistics would depend on how
    many threads the calling process runs: one thread makes `fitcli train` and `fitcli sweep`
    agree whatever each process uses. It is also faster: on busy cores a parallel region of a
    small op waits for a second thread far longer than the op takes.
    """
    from fitcli.lm import one_thread
    from fitcli.model import ROW_EXACT_LIMIT

    if n >= ROW_EXACT_LIMIT:
        yield
        return
    with one_thread():
        yield


def finish_stats(prep: Prepared, result: TrainResult) -> dict:
    """Error bars and fit statistics at the final parameters, in float64, after any optimizer;
    the closed-form optimum and the distance to the truth where they exist (`stats.run_report`).
    A failure here never fails the run: the summary then says why there are no error bars."""
    with small_data_threads(prep.dataset.n):
        return _finish_stats(prep, result)


def _finish_stats(prep: Prepared, result: TrainResult) -> dict:
    import copy

    from fitcli.stats import run_report

    ds, model = prep.dataset, prep.model
    f64 = torch.float64
    try:
        if model.raw.dtype != f64:
            model = copy.deepcopy(model).to(f64)
        x = torch.as_tensor(ds.x, dtype=f64).to(prep.device)
        y = torch.as_tensor(ds.y, dtype=f64).to(prep.device)
        weights = None if prep.weights is None else prep.weights.to(f64)
        if ds.sigma is not None:
            weights = torch.as_tensor(1.0 / ds.sigma, dtype=f64).to(prep.device)
        y_true = None if ds.y_true is None else torch.as_tensor(ds.y_true, dtype=f64)
        return run_report(
            model,
            x,
            y,
            weights=weights,
            y_true=None if y_true is None else y_true.to(prep.device),
            loss=prep.cfg.loss,
            final_loss=result.final_loss,
            model_expr=prep.cfg.model.expr,
            target=prep.cfg.data.target,
            absolute_sigma=prep.cfg.data.absolute_sigma is not False,
        )
    except Exception as exc:  # error bars are a report, not the fit: say why they are missing
        return {
            "stderr": dict.fromkeys(prep.model.names),
            "uncertainty": {
                "status": RunStatus.FAILED,
                "reason": f"error bars could not be computed: {type(exc).__name__}: {exc}",
                "condition_number": None,
            },
        }


def finish_intervals(prep: Prepared, summary: dict[str, Any]) -> dict[str, Any]:
    """The config's profile, bootstrap or MCMC intervals at the final parameters
    (`fitcli.intervals`);
    like the error bars, a failure here never fails the run: the result then says why."""
    import copy

    from fitcli import intervals

    method = prep.cfg.uncertainty.method
    if summary["status"] != RunStatus.COMPLETED:
        return {"method": method, "error": f"not computed: the run is {summary['status']}"}
    ds, model = prep.dataset, prep.model
    try:
        intervals.check_loss(prep.cfg.loss)
        f64 = torch.float64
        model = copy.deepcopy(model).to(f64)
        weights = None if prep.weights is None else prep.weights.to(f64)
        if ds.sigma is not None:
            weights = torch.as_tensor(1.0 / ds.sigma, dtype=f64).to(prep.device)
        prob = intervals.Problem(
            model,
            torch.as_tensor(ds.x, dtype=f64).to(prep.device),
            torch.as_tensor(ds.y, dtype=f64).to(prep.device),
            weights,
        )
        return intervals.for_config(prob, prep.cfg, method, weighted=ds.sigma is not None)
    except Exception as exc:  # intervals are a report, not the fit: say why they are missing
        return {"method": method, "error": f"not computed: {exc}"}


def make_run_dir(cfg: Any, out: Path, run_dir: Path | None, overwrite: bool) -> Path:
    if run_dir is not None:
        return files.claim_run_dir(run_dir, overwrite=overwrite)
    return files.create_run_dir(out, cfg.name)


__all__ = ["RunDirError", "conclude", "execute", "make_run_dir"]
