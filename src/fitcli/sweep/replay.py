"""Replay: how every run directory of a sweep is written.

A sweep computes each run somewhere (a batch in this process, a worker process, a Dask worker)
into a `Trace`: the loss before each step, the parameters after it and the stepper state at every
snapshot epoch. Its run directory is then written by replaying that trace through
`experiment.execute`, the very code `fitcli train` runs, with a `ReplayStepper` in place of the
optimizer (`write_run`). So a sweep's run directory is the one `fitcli train` writes for that
config, file for file, with the parameters the same to the last bit (see `model.rows_dot`), and
there is no second writer of run directories to keep in step with the first: summaries, snapshots,
plots, resume state and error bars all come from one place. The process that owns the sweep
directory (or writer processes it forks) replays into it; a Dask worker replays into a scratch
folder of its own and sends the files back (`sweep.cluster.Rendered`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitcli.errors import RunStatus
from fitcli.rundir import files
from fitcli.sweep.plan import Plan, RunSpec
from fitcli.sweep.table import SHARED_JS

# --------------------------------------------------------------------------------------------
# Traces: what a computed run hands back to the process that writes it
# --------------------------------------------------------------------------------------------


@dataclass
class Trace:
    """A computed run: enough to replay it through the training loop without computing again.

    Step k (0-based) started from the parameters after k steps, whose loss is `losses[k]`, and
    left `params[k]`; `lrs[k]` is the learning rate before step k (one more at the end);
    `states[k]` is the stepper's state_dict after k steps, kept at snapshot epochs and the end.
    `failure` and `summary_fields` are what the stepper reports once it has stopped (LM's
    `failure` and `summary_fields()`, which `experiment.execute` reads after training).
    """

    index: int
    losses: list[float] = field(default_factory=list)
    params: Any = None  # tensor [steps, p]
    lrs: list[float] = field(default_factory=list)
    states: dict[int, Any] = field(default_factory=dict)
    converged: dict[int, str] = field(default_factory=dict)
    failure: str | None = None
    summary_fields: dict = field(default_factory=dict)
    stop_epoch: int | None = None
    stop_signal: str | None = None  # what stopped it at stop_epoch (set by the sweep's process)
    elapsed: list[float] = field(default_factory=list)
    wall: float = 0.0
    error: str | None = None
    exit_code: int | None = None
    batched: int = 1  # how many runs shared the tensor program
    starts: dict | None = None  # the multi-start search that chose the start (`fitcli.starts`)


class _Loss(float):
    """A recorded loss as `train` reads a stepper's: `step().item()`."""

    def item(self) -> float:
        return float(self)


class ReplayStepper:
    """Plays a Trace back into a model: what `train` sees in place of the real stepper."""

    # `state_dict` hands out the trace's recorded states, which nothing changes afterwards.
    state_dicts_are_copies = True

    def __init__(self, trace: Trace, model: Any) -> None:
        self.trace, self.model, self.k = trace, model, 0
        self.converged: str | None = None
        self.failure: str | None = None
        self.rows = trace.params.unbind(0) if trace.params is not None else ()

    def step(self) -> Any:
        k = self.k
        self.model.raw.data.copy_(self.rows[k])  # `.data`: outside autograd, as under no_grad
        self.k = k + 1
        self.converged = self.trace.converged.get(k + 1)
        if self.k == len(self.trace.losses):
            # A stepper's failure stops the run in the step that finds it: the last one.
            self.failure = self.trace.failure
        return _Loss(self.trace.losses[k])

    def summary_fields(self) -> dict:
        return copy.deepcopy(self.trace.summary_fields)

    def lr(self) -> float:
        return self.trace.lrs[min(self.k, len(self.trace.lrs) - 1)]

    def state_dict(self) -> Any:
        return self.trace.states[self.k]


class RecordingStepper:
    """Wraps a real stepper and records its trace (one run computed on its own)."""

    def __init__(self, inner: Any, model: Any, trace: Trace, keep: set[int]) -> None:
        self.inner, self.model, self.trace, self.keep = inner, model, trace, keep
        self.k = 0
        self.rows: list[Any] = []
        self._lr = getattr(inner, "lr", lambda: float("nan"))
        self.trace.states[0] = self._state()

    @property
    def converged(self) -> str | None:
        return self.inner.converged

    def _state(self) -> Any:
        sd = getattr(self.inner, "state_dict", None)
        return copy.deepcopy(sd()) if sd is not None else None

    def lr(self) -> float:
        return self._lr()

    def step(self) -> Any:
        self.trace.lrs.append(self._lr())
        loss = self.inner.step()
        self.k += 1
        self.trace.losses.append(float(loss.item()))
        self.rows.append(self.model.raw.detach().clone())
        if self.inner.converged:
            self.trace.converged[self.k] = self.inner.converged
        if self.k in self.keep:
            self.trace.states[self.k] = self._state()
        return loss

    def finish(self) -> None:
        import torch  # lazy: torch-free Dask client, fast CLI start-up

        self.trace.lrs.append(self._lr())
        self.trace.states[self.k] = self._state()
        self.trace.failure = getattr(self.inner, "failure", None)
        fields = getattr(self.inner, "summary_fields", None)
        self.trace.summary_fields = fields() if fields is not None else {}
        p = self.model.raw.numel()
        self.trace.params = (
            torch.stack(self.rows) if self.rows else torch.empty(0, p, dtype=self.model.raw.dtype)
        )


def compute_single(prep: Any, index: int, stop: Callable[[], bool] | None = None) -> Trace:
    """One run through the real stepper and training loop, recorded."""
    from fitcli.train import snapshot_epochs, train  # lazy: imports torch

    cfg = prep.cfg
    if cfg.starts > 1 and prep.starts is None:
        from fitcli.starts import search

        search(prep)
    trace = Trace(index, starts=prep.starts)
    keep = set(snapshot_epochs(cfg.epochs, cfg.snapshots))
    t0 = time.perf_counter()
    rec = RecordingStepper(prep.stepper, prep.model, trace, keep)
    stopped: list[int] = []

    def on_epoch(epoch: int, loss: float) -> bool:
        trace.elapsed.append(time.perf_counter() - t0)
        if stop is not None and stop():
            stopped.append(epoch)
            return True
        return False

    result = train(
        prep.model, rec, epochs=cfg.epochs, evaluate_loss=prep.evaluate_loss, on_epoch=on_epoch
    )
    rec.finish()
    if result.status == RunStatus.INTERRUPTED and stopped:
        trace.stop_epoch = stopped[0]
    trace.wall = time.perf_counter() - t0
    return trace


# --------------------------------------------------------------------------------------------
# Writing run directories (only in the process that owns the sweep directory)
# --------------------------------------------------------------------------------------------


def claim_and_write(
    plan: Plan, run: RunSpec, trace: Trace, target: Path, plotlyjs: str, prep: Any = None
) -> dict:
    """Create (or replace) the run directory `target` and write the run into it."""
    run_dir = files.claim_run_dir(target, overwrite=True, own=True)
    return write_run(plan, run, trace, run_dir, plotlyjs, prep)


def write_run(
    plan: Plan, run: RunSpec, trace: Trace, run_dir: Path, plotlyjs: str, prep: Any = None
) -> dict:
    """The run directory `fitcli train` would write, from a trace; returns its summary.

    `prep` is the run's prepared state when the caller still holds it untouched (a batched run
    computed in this process), else it is prepared again from the plan.
    """
    from fitcli.experiment import execute, small_data_threads  # lazy: imports torch
    from fitcli.prepare import prepare

    if prep is None:
        prep = prepare(plan.cfg(run))
    if trace.starts is not None and prep.starts is None:
        # The start the computation chose: the replay begins there, without searching again.
        prep.model.set_values({**prep.model.values(), **trace.starts["start"]})
        prep.starts = trace.starts
    if plotlyjs == "directory":
        shared = run_dir.parent / SHARED_JS
        if shared.exists():
            files.link_or_copy(shared, run_dir / files.PLOTLY_JS)
    replay = dataclasses.replace(prep, stepper=ReplayStepper(trace, prep.model))
    stop_at = trace.stop_epoch

    def on_epoch(epoch: int, loss: float) -> bool:
        return stop_at is not None and epoch >= stop_at

    # The replay only reads the trace and evaluates the model on the data and the snapshot grid:
    # serial kernels below ROW_EXACT_LIMIT points, so one thread writes the same bytes, faster.
    # params.json and state.json are written once: no one resumes from inside a replay.
    with small_data_threads(prep.dataset.n):
        summary = execute(
            replay,
            run_dir,
            plotlyjs=plotlyjs,
            command=plan.command(run),
            on_epoch=on_epoch,
            defer_state=True,
            stopped_by=lambda: trace.stop_signal,
        )
    if plotlyjs == "directory" and not (run_dir.parent / SHARED_JS).exists():
        files.link_or_copy(run_dir / files.PLOTLY_JS, run_dir.parent / SHARED_JS)
    return summary
