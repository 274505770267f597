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
import copy
import itertools
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitcli import store
from fitcli.errors import (
    ConfigError,
    ExitCode,
    FitcliError,
    InputError,
    RunFileError,
    exit_code_for,
    strict_exit_code,
)

SWEEP_FILE = "sweep.yaml"
RUNS_FILE = "runs.csv"
SHARED_JS = ".plotly.min.js"
FORMAT = "fitcli-sweep"
# Optimizers whose update is elementwise, checked bit for bit against single runs in the tests.
BATCHABLE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")
MAX_BATCH = 1024
MAX_WRITERS = 4  # processes writing a batch's run directories (see `writer_processes`)
# Statuses a resumed sweep keeps; anything else (missing, interrupted, failed) runs again.
FINISHED = ("completed", "diverged")


class SweepError(InputError):
    """A sweep's axes, options or sweep directory are invalid (exit 2)."""


# --------------------------------------------------------------------------------------------
# Grid expansion
# --------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*range\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*(?:,\s*([^,()]+?)\s*)?\)\s*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_OPEN, _CLOSE = "([{", ")]}"


def split_values(text: str) -> list[str]:
    """Split on top-level commas: a comma inside quotes, (), [] or {} belongs to its value.

    So `1,2,3` is three values, while `[x, sin(x)]`, `"sine, v2"` and `{std: 0.1, seed: 1}` are
    one.
    """
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _range_values(text: str, where: str) -> list[str] | None:
    m = _RANGE.match(text)
    if not m:
        return None
    try:
        args = [int(a) for a in m.groups() if a is not None]
    except ValueError:
        raise SweepError(f"{where}: range() takes integers, e.g. range(0, 10, 2)") from None
    if len(args) == 3 and args[2] == 0:
        raise SweepError(f"{where}: range() step must not be 0")
    steps = range(*args)
    if not steps:
        raise SweepError(f"{where}: {text.strip()} is empty")
    if len(steps) > MAX_RUNS:  # checked before a value is made: range(0, 10**9) costs nothing
        raise SweepError(f"{where}: {len(steps):,} values; a sweep has at most {MAX_RUNS:,} runs")
    return [str(v) for v in steps]


@dataclass(frozen=True)
class Axis:
    """One swept key and the YAML texts of its values, in order."""

    key: str
    values: tuple[str, ...]


def parse_assignments(items: Sequence[str]) -> tuple[list[str], list[Axis]]:
    """Fixed overrides (`key=value`) and axes (`key=a,b` or `key=range(...)`), in given order."""
    fixed: list[str] = []
    axes: list[Axis] = []
    seen: set[str] = set()
    problems: list[str] = []
    for text in items:
        key, eq, value = text.partition("=")
        key = key.strip()
        if not eq or not _KEY.match(key):
            problems.append(f"{text!r} is not key.path=value or key.path=a,b,c")
            continue
        if key in seen:
            problems.append(f"{key!r} is given twice")
            continue
        seen.add(key)
        try:
            values = _range_values(value, text)
        except SweepError as exc:
            problems.append(str(exc))
            continue
        if values is None:
            values = split_values(value)
            if len(values) == 1:
                fixed.append(f"{key}={value}")
                continue
            if any(v == "" for v in values):
                problems.append(f"{text!r} has an empty value between commas")
                continue
        axes.append(Axis(key, tuple(values)))
    if problems:
        raise SweepError("invalid sweep axes:\n" + "\n".join(f"  - {p}" for p in problems))
    return fixed, axes


@dataclass
class RunSpec:
    """One point of the grid: its index and the value text of each axis."""

    index: int
    values: dict[str, str]

    def overrides(self, fixed: Sequence[str]) -> list[str]:
        return [*fixed, *(f"{k}={v}" for k, v in self.values.items())]


MAX_RUNS = 100_000  # the most runs one sweep may have (README: Sweeps)


def check_grid_size(axes: Sequence[Axis]) -> int:
    """The number of runs the axes make; a SweepError above MAX_RUNS, before any is built."""
    total = math.prod(len(a.values) for a in axes)
    if total > MAX_RUNS:
        sizes = " x ".join(f"{a.key} ({len(a.values):,} values)" for a in axes)
        raise SweepError(
            f"the grid {sizes} has {total:,} runs; a sweep has at most {MAX_RUNS:,} runs "
            "(split it into several sweeps)"
        )
    return total


def expand(axes: Sequence[Axis]) -> list[RunSpec]:
    """The Cartesian product of the axes (the last axis varies fastest), at most MAX_RUNS."""
    check_grid_size(axes)
    combos = itertools.product(*(a.values for a in axes)) if axes else [()]
    return [
        RunSpec(i, {a.key: v for a, v in zip(axes, combo, strict=True)})
        for i, combo in enumerate(combos)
    ]


# --------------------------------------------------------------------------------------------
# The plan: base config, overrides, axes; sweep.yaml
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything a sweep needs to (re)build each run's config, independent of this machine."""

    config: str  # the config file as given, for the runs' `fitcli train` command lines
    base: dict  # the config file's mapping, before overrides
    base_dir: str  # where a relative data.file is found
    fixed: list[str]
    axes: list[Axis]
    runs: list[RunSpec] = field(default_factory=list)
    # Validated configs by run index: validation is paid once per run (nothing changes them).
    _cfgs: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.runs:
            self.runs = expand(self.axes)

    def overrides(self, run: RunSpec) -> list[str]:
        return run.overrides(self.fixed)

    def cfg(self, run: RunSpec) -> Any:
        """The run's validated config: what `load_config(config, overrides)` gives."""
        from fitcli.config import apply_overrides, config_from_dict

        own = run.index < len(self.runs) and self.runs[run.index] is run
        if own and run.index in self._cfgs:
            return self._cfgs[run.index]
        raw = apply_overrides(self.base, self.overrides(run), self.config)
        cfg = config_from_dict(raw, self.config, Path(self.base_dir))
        if own:
            self._cfgs[run.index] = cfg
        return cfg

    def command(self, run: RunSpec) -> list[str]:
        """The `fitcli train` command line that makes the same run on its own."""
        return ["fitcli", "train", self.config, *self.overrides(run)]

    def to_doc(self) -> dict:
        return {
            "format": FORMAT,
            "config": self.config,
            "base_dir": self.base_dir,
            "overrides": list(self.fixed),
            "axes": [{"key": a.key, "values": list(a.values)} for a in self.axes],
            "runs": len(self.runs),
            "base": self.base,
        }

    @classmethod
    def from_doc(cls, doc: Any, source: str) -> Plan:
        try:
            if doc.get("format") != FORMAT:
                raise ValueError("not a fitcli sweep file")
            axes = [Axis(str(a["key"]), tuple(str(v) for v in a["values"])) for a in doc["axes"]]
            return cls(
                str(doc["config"]),
                dict(doc["base"]),
                str(doc["base_dir"]),
                [str(o) for o in doc["overrides"]],
                axes,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise SweepError(f"{source} is not a valid {SWEEP_FILE}: {exc}") from None


def make_plan(config: Path, assignments: Sequence[str], *, torch_checks: bool = True) -> Plan:
    """Read the base config and expand the axes; every run's config is validated up front
    (without the checks against torch when `torch_checks` is False: see `check_on_cluster`)."""
    from fitcli.config import load_yaml, read_config_text

    fixed, axes = parse_assignments(assignments)
    base = load_yaml(read_config_text(config), str(config))
    if not isinstance(base, dict):
        from fitcli.config import load_config

        load_config(config)  # raises the config file's own top-level problem
    plan = Plan(str(config), base, os.path.dirname(os.path.abspath(config)), fixed, axes)
    validate_plan(plan, torch_checks=torch_checks)
    return plan


MAX_PLAN_PROBLEMS = 20  # a plan's validation stops after this many problems


def validate_plan(plan: Plan, *, torch_checks: bool = True) -> list[Any]:
    """Every run's config, or one ConfigError naming each bad run and its problems."""
    cfgs, problems = _check_runs(plan, _TorchChecks(plan) if torch_checks else None)
    if problems:
        raise ConfigError(problems, source=plan.config)
    return cfgs


def _check_runs(
    plan: Plan, checks: _TorchChecks | None, *, invalid: bool = True
) -> tuple[list[Any], list[str]]:
    """(the valid runs' configs, the problems found, labelled by run), stopping after
    MAX_PLAN_PROBLEMS; a config that does not validate is a problem only with `invalid`."""
    cfgs: list[Any] = []
    problems: list[str] = []
    for run in plan.runs:
        if len(problems) > MAX_PLAN_PROBLEMS:
            break
        try:
            cfg = plan.cfg(run)
        except ConfigError as exc:
            if invalid:
                problems += [f"run {run.index} ({_label(plan, run)}): {p}" for p in exc.problems]
            continue
        cfgs.append(cfg)
        if checks is not None:
            problems += checks(run, cfg)
    return cfgs, problems


def _label(plan: Plan, run: RunSpec) -> str:
    return " ".join(plan.overrides(run)) or "(base config)"


class _TorchChecks:
    """Names and keyword arguments of optimizers and schedulers checked against torch
    (`optim.validate`, once per distinct choice), so a typo is exit 2 before anything runs, not
    a failed run per point."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.checked: dict[str, list[str]] = {}  # optimizer/scheduler/loss choice -> verdict

    def __call__(self, run: RunSpec, cfg: Any) -> list[str]:
        from fitcli import optim

        key = json.dumps(
            [
                cfg.optimizer.model_dump(),
                cfg.scheduler and cfg.scheduler.model_dump(),
                cfg.loss,
                cfg.batch_size is None,
                cfg.model.basis is None,
            ],
            sort_keys=True,
            default=str,
        )
        if key not in self.checked:
            self.checked[key] = optim.validate(cfg)
        return [f"run {run.index} ({_label(self.plan, run)}): {p}" for p in self.checked[key]]


def torch_problems(plan_doc: dict) -> list[str]:
    """The checks of `validate_plan` that need torch, for a plan whose configs are valid
    otherwise: what a Dask worker runs for the client (`check_on_cluster`)."""
    plan = Plan.from_doc(plan_doc, SWEEP_FILE)
    # Configs that do not validate here the client has reported already.
    return _check_runs(plan, _TorchChecks(plan), invalid=False)[1]


def check_on_cluster(client: Any, plan: Plan) -> None:
    """`validate_plan`'s checks against torch, run by a Dask worker: the client of a Dask sweep
    never imports torch (about a second of a core, which the workers, importing it themselves at
    the same moment, would otherwise share with it). Raises the same ConfigError."""
    problems = client.submit(torch_problems, plan.to_doc(), pure=False).result()
    if problems:
        raise ConfigError(problems, source=plan.config)


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
        import torch

        self.trace.lrs.append(self._lr())
        self.trace.states[self.k] = self._state()
        self.trace.failure = getattr(self.inner, "failure", None)
        fields = getattr(self.inner, "summary_fields", None)
        self.trace.summary_fields = fields() if fields is not None else {}
        p = self.model.raw.numel()
        self.trace.params = (
            torch.stack(self.rows) if self.rows else torch.empty(0, p, dtype=self.model.raw.dtype)
        )


def _stopper(stop: Callable[[], bool] | None) -> Callable[[int, float], bool] | None:
    if stop is None:
        return None
    return lambda epoch, loss: stop()


def compute_single(prep: Any, index: int, stop: Callable[[], bool] | None = None) -> Trace:
    """One run through the real stepper and training loop, recorded."""
    from fitcli.train import snapshot_epochs, train

    cfg = prep.cfg
    trace = Trace(index)
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
    if result.status == "interrupted" and stopped:
        trace.stop_epoch = stopped[0]
    trace.wall = time.perf_counter() - t0
    return trace


# --------------------------------------------------------------------------------------------
# The batched engine
# --------------------------------------------------------------------------------------------


def batch_key(cfg: Any) -> tuple | None:
    """Runs with equal keys can train as one batch (checked again on the prepared data)."""
    from fitcli import optim

    name, kwargs = optim.split_spec(cfg.optimizer)
    if cfg.model.basis is None or cfg.scheduler is not None or cfg.batch_size is not None:
        return None
    if name not in BATCHABLE_OPTIMIZERS or kwargs.get("foreach") or kwargs.get("fused"):
        return None
    data = cfg.data.model_dump(mode="json", exclude={"noise", "target"})
    return (
        json.dumps(data, sort_keys=True, default=str),
        tuple(cfg.model.basis),
        cfg.loss,
        cfg.epochs,
        cfg.dtype,
        cfg.device,
    )


def _slice_state(sd: dict, row: int) -> dict:
    """Row `row` of a batched optimizer's state_dict: the state_dict its single run would have."""
    import torch

    def cut(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v[row].clone() if v.dim() >= 1 else v.clone()
        return copy.deepcopy(v)

    return {
        "state": {k: {n: cut(v) for n, v in s.items()} for k, s in sd["state"].items()},
        "param_groups": copy.deepcopy(sd["param_groups"]),
    }


def batchable(preps: Sequence[Any]) -> bool:
    """Whether prepared runs can share one tensor program and stay bit-identical to single runs."""
    import torch

    from fitcli.model import ROW_EXACT_LIMIT, BasisModel

    p0 = preps[0]
    for p in preps:
        m, st = p.model, p.stepper
        if not isinstance(m, BasisModel) or not m._all_free_unbounded or p.lm:
            return False
        if st.batch_size is not None or st.needs_closure or st.scheduler is not None:
            return False
        if p.dataset.n >= ROW_EXACT_LIMIT or p.x.shape != p0.x.shape:
            return False
        if not torch.equal(p.x, p0.x) or p.model.raw.shape != p0.model.raw.shape:
            return False
        c, c0 = p.cfg, p0.cfg
        same = ("loss", "epochs", "snapshots", "dtype")
        if any(getattr(c, k) != getattr(c0, k) for k in same) or p.device != p0.device:
            return False
        if (p.weights is None) != (p0.weights is None):
            return False
        if p.weights is not None and not torch.equal(p.weights, p0.weights):
            return False
    return True


def compute_batch(
    preps: Sequence[Any], indices: Sequence[int], stop: Callable[[], bool] | None = None
) -> list[Trace]:
    """Train runs as one tensor program with a leading run dimension; one Trace per run.

    Each step does what `TorchStepper.step` does for one run (zero grads, forward, loss, backward,
    optimizer step), on all runs at once: the forward is `rows_dot` (same kernels as a single
    run), each run's loss is the mean over its own row, and one optimizer per distinct
    `optimizer` section updates its runs' rows elementwise.
    """
    import torch

    threads = torch.get_num_threads()
    # One thread: the batch's rows are reduced one after another either way (each row exactly as
    # a single run), and on a shared 2-core machine parallel regions wait on each other (5x).
    torch.set_num_threads(1)
    try:
        return _compute_batch(preps, indices, stop)
    finally:
        torch.set_num_threads(threads)


def _compute_batch(
    preps: Sequence[Any], indices: Sequence[int], stop: Callable[[], bool] | None
) -> list[Trace]:
    import torch

    from fitcli import optim
    from fitcli.model import rows_dot
    from fitcli.train import LOSSES, snapshot_epochs

    t0 = time.perf_counter()
    cfg0, p0 = preps[0].cfg, preps[0]
    epochs = cfg0.epochs
    keep = set(snapshot_epochs(epochs, cfg0.snapshots))
    # Rows grouped by optimizer section, each group one leaf tensor with its own optimizer.
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(preps):
        spec = json.dumps(p.cfg.optimizer.model_dump(mode="json"), sort_keys=True)
        groups.setdefault(spec, []).append(i)
    order = [i for rows in groups.values() for i in rows]
    leaves, opts, lrs, row_of = [], [], [], {}
    for rows in groups.values():
        leaf = torch.nn.Parameter(torch.stack([preps[i].model.raw.detach() for i in rows]))
        opt = optim.build_optimizer(preps[rows[0]].cfg.optimizer, [leaf])
        for j, i in enumerate(rows):
            row_of[i] = (len(leaves), j)
        leaves.append(leaf)
        opts.append(opt)
        lrs.append(float(opt.param_groups[0].get("lr", float("nan"))))
    phi_t = p0.model.design_t(p0.x)
    y = torch.stack([preps[i].y for i in order])
    w = p0.weights
    base = LOSSES[cfg0.loss]
    n_runs = len(preps)
    gen_states = [p.stepper.generator.get_state() for p in preps]

    def stepper_state(i: int, sds: list[dict]) -> dict:
        g, j = row_of[i]
        return {
            "optimizer": _slice_state(sds[g], j),
            "scheduler": None,
            "generator": gen_states[i].clone(),
        }

    def all_states() -> list[dict]:
        return [opt.state_dict() for opt in opts]

    traces = [Trace(idx, batched=n_runs) for idx in indices]
    for i, tr in enumerate(traces):
        tr.states[0] = stepper_state(i, all_states())
    pos = {i: k for k, i in enumerate(order)}  # run -> row of the batch
    done = [False] * n_runs
    steps = [epochs] * n_runs
    # The history in buffers allocated once: small tensors kept from every step would pin the
    # heap under each step's freed temporaries, and the process would grow by their size per
    # step (hundreds of MB for 100 runs, paid again in page faults).
    p0_raw = p0.model.raw
    hist_raw = p0_raw.new_empty((epochs, n_runs, p0_raw.numel()))  # parameters before step k+1
    hist_loss = p0_raw.new_empty((epochs, n_runs))
    elapsed: list[float] = []
    stop_epoch = None
    k = 0
    while k < epochs:
        raw = torch.cat(leaves)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        yhat = rows_dot(phi_t, raw)
        if w is not None:
            yhat = yhat * w
        loss = base(yhat, y, reduction="none").mean(-1)
        loss.sum().backward()
        for opt in opts:
            opt.step()
        loss = loss.detach()
        hist_raw[k] = raw.detach()
        hist_loss[k] = loss
        k += 1
        elapsed.append(time.perf_counter() - t0)
        finite = torch.isfinite(loss)
        sds = None
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            for r in bad:
                i = order[r]
                if not done[i]:
                    done[i], steps[i] = True, k
                    sds = sds or all_states()
                    traces[i].states[k] = stepper_state(i, sds)
        if k in keep:
            sds = sds or all_states()
            for i in range(n_runs):
                if not done[i]:
                    traces[i].states[k] = stepper_state(i, sds)
        if all(done):
            break
        if stop is not None and stop() and k < epochs:
            stop_epoch = k
            break
    final = torch.cat(leaves).detach()
    sds = all_states()
    raws = torch.cat([hist_raw[1:k], final[None]])  # [steps, B, p]: parameters after each step
    losses = hist_loss[:k].T.tolist()  # [B][steps]
    wall = time.perf_counter() - t0
    for i, tr in enumerate(traces):
        r = pos[i]
        g, _ = row_of[i]
        n = steps[i] if done[i] else k
        tr.losses = losses[r][:n]
        tr.params = raws[:n, r].clone()
        tr.lrs = [lrs[g]] * (n + 1)
        tr.elapsed = elapsed[:n]
        tr.wall = wall / n_runs
        if not done[i]:
            tr.states[n] = stepper_state(i, sds)
            tr.stop_epoch = stop_epoch
    return traces


# --------------------------------------------------------------------------------------------
# Tasks: the unit an executor runs (picklable; no files touched)
# --------------------------------------------------------------------------------------------


@dataclass
class Task:
    """Runs to compute together (a batch) or one by one, with what builds their configs."""

    plan: dict
    indices: list[int]
    batch: bool


def _failed(index: int, exc: BaseException) -> Trace:
    code = int(exc.exit_code) if isinstance(exc, FitcliError) else int(ExitCode.FAILED)
    msg = str(exc) if isinstance(exc, FitcliError) else f"{type(exc).__name__}: {exc}"
    return Trace(index, error=msg or type(exc).__name__, exit_code=code)


def run_task(
    task: Task, stop: Callable[[], bool] | None = None, preps: dict | None = None
) -> list[Trace]:
    """Compute a task's runs: one batch when they qualify, else one after another.

    This is what local worker processes and Dask workers execute; it writes nothing.
    """
    from fitcli.experiment import prepare

    if stop is not None and stop():
        return []  # stopped before this task began: its runs stay pending
    plan = Plan.from_doc(task.plan, SWEEP_FILE)
    ready: dict[int, Any] = {}
    out: list[Trace] = []
    for i in task.indices:
        try:
            ready[i] = preps[i] if preps and i in preps else prepare(plan.cfg(plan.runs[i]))
        except Exception as exc:
            out.append(_failed(i, exc))
    idx = list(ready)
    if task.batch and len(idx) > 1 and batchable([ready[i] for i in idx]):
        try:
            return out + compute_batch([ready[i] for i in idx], idx, stop)
        except Exception as exc:  # an engine fault must not cost the runs: do them one by one
            if os.environ.get("FITCLI_SWEEP_STRICT") == "1":
                raise
            _ = exc
    for i in idx:
        if stop is not None and stop():
            break
        try:
            out.append(compute_single(ready[i], i, stop))
        except Exception as exc:
            out.append(_failed(i, exc))
    return out


def make_tasks(plan: Plan, cfgs: dict[int, Any], indices: Sequence[int], chunks: int) -> list[Task]:
    """Batches of batchable runs (split in up to `chunks` parts each) and single-run tasks."""
    doc = plan.to_doc()
    groups: dict[Any, list[int]] = {}
    singles: list[int] = []
    for i in indices:
        key = batch_key(cfgs[i])
        if key is None:
            singles.append(i)
        else:
            groups.setdefault(key, []).append(i)
    tasks = []
    for rows in groups.values():
        parts = max(1, min(chunks, len(rows)), math.ceil(len(rows) / MAX_BATCH))
        size = math.ceil(len(rows) / parts)
        for s in range(0, len(rows), size):
            part = rows[s : s + size]
            tasks.append(Task(doc, part, len(part) > 1))
    tasks += [Task(doc, [i], False) for i in singles]
    tasks.sort(key=lambda t: t.indices[0])
    return tasks


# --------------------------------------------------------------------------------------------
# Writing run directories (only in the process that owns the sweep directory)
# --------------------------------------------------------------------------------------------


def claim_and_write(
    plan: Plan, run: RunSpec, trace: Trace, target: Path, plotlyjs: str, prep: Any = None
) -> dict:
    """Create (or replace) the run directory `target` and write the run into it."""
    run_dir = store.claim_run_dir(target, overwrite=True, own=True)
    return write_run(plan, run, trace, run_dir, plotlyjs, prep)


def write_run(
    plan: Plan, run: RunSpec, trace: Trace, run_dir: Path, plotlyjs: str, prep: Any = None
) -> dict:
    """The run directory `fitcli train` would write, from a trace; returns its summary.

    `prep` is the run's prepared state when the caller still holds it untouched (a batched run
    computed in this process), else it is prepared again from the plan.
    """
    import dataclasses

    from fitcli.experiment import execute, prepare, small_data_threads

    if prep is None:
        prep = prepare(plan.cfg(run))
    if plotlyjs == "directory":
        shared = run_dir.parent / SHARED_JS
        if shared.exists():
            store.link_or_copy(shared, run_dir / store.PLOTLY_JS)
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
        store.link_or_copy(run_dir / store.PLOTLY_JS, run_dir.parent / SHARED_JS)
    return summary


# --------------------------------------------------------------------------------------------
# Rendered runs: run directories written where they are computed, sent back as bytes (Dask)
# --------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """A run computed and written on a Dask worker: its summary and its run directory's files.

    `files` maps POSIX paths relative to the run directory to their bytes (a path ending in "/"
    to None: a directory), without the shared plotly.js, which the client links as a local
    sweep does. `summary["run_dir"]` names the worker's scratch folder until the client puts the
    real one in (`install_rendered`).
    """

    trace: Trace  # index, error and timings only: the tensors stay on the worker
    summary: dict | None = None
    files: dict[str, bytes | None] = field(default_factory=dict)


def read_tree(run_dir: Path, skip: Iterable[str] = ()) -> dict[str, bytes | None]:
    """A directory's files as {relative POSIX path: bytes}, its subdirectories as {"sub/": None}."""
    out: dict[str, bytes | None] = {}
    skip = set(skip)
    for top, dirs, names in os.walk(run_dir):
        rel_top = Path(top).relative_to(run_dir).as_posix()
        prefix = "" if rel_top == "." else rel_top + "/"
        dirs.sort()
        for d in dirs:
            out[f"{prefix}{d}/"] = None
        for name in sorted(names):
            rel = prefix + name
            if rel not in skip:
                with open(os.path.join(top, name), "rb") as fh:
                    out[rel] = fh.read()
    return out


def render_task(task: Task, plotlyjs: str) -> list[Rendered]:
    """Compute a task's runs (`run_task`) and render them (`render_traces`): one Dask task."""
    plan = Plan.from_doc(task.plan, SWEEP_FILE)
    preps = {}
    # Imported here: what a worker imports first, paid once per worker process.
    from fitcli.experiment import prepare

    for i in task.indices:
        with contextlib.suppress(Exception):  # run_task reports it
            preps[i] = prepare(plan.cfg(plan.runs[i]))
    traces = run_task(task, None, preps)
    return render_traces(task.plan, traces, task.indices, plotlyjs, preps)


def render_traces(
    plan_doc: dict,
    traces: Sequence[Trace],
    indices: Sequence[int],
    plotlyjs: str,
    preps: dict | None = None,
) -> list[Rendered]:
    """Write the run directory of each trace among `indices` into a scratch folder of this
    process, the same replay as `write_run`; hand back the files and delete the folder.

    What Dask workers execute: they compute and write in parallel, the client only puts bytes
    in place, and no filesystem is shared. `preps` holds runs' prepared state left untouched
    by a batch computed in this task; other runs are prepared again.
    """
    import tempfile

    plan = Plan.from_doc(plan_doc, SWEEP_FILE)
    wanted = set(indices)
    skip = [store.PLOTLY_JS] if plotlyjs == "directory" else []
    out = []
    with tempfile.TemporaryDirectory(prefix="fitcli-render-", dir=_scratch_root()) as scratch:
        for trace in traces:
            if trace.index not in wanted:
                continue
            light = Trace(
                trace.index,
                wall=trace.wall,
                error=trace.error,
                exit_code=trace.exit_code,
                batched=trace.batched,
            )
            if trace.error is not None:
                out.append(Rendered(light))
                continue
            run = plan.runs[trace.index]
            run_dir = Path(scratch) / run_dir_name(plan, run)
            run_dir.mkdir()
            prep = preps.pop(trace.index, None) if preps and trace.batched > 1 else None
            summary = write_run(plan, run, trace, run_dir, plotlyjs, prep)
            out.append(Rendered(light, summary, read_tree(run_dir, skip)))
            shutil.rmtree(run_dir)
    return out


SCRATCH_SHM_FREE = 1 << 28  # bytes free in /dev/shm for a worker to write run directories there


def _scratch_root() -> str | None:
    """Where a worker writes run directories for a moment before sending them: memory
    (/dev/shm) where it has room to spare (a run directory is a few MB, 50 with --plotlyjs
    embed; one at a time), else the temporary folder. It makes a Dask sweep about 3% faster."""
    try:
        st = os.statvfs("/dev/shm")
    except (AttributeError, OSError):  # not Linux, or no /dev/shm
        return None
    room = st.f_bavail * st.f_frsize >= SCRATCH_SHM_FREE
    return "/dev/shm" if room and os.access("/dev/shm", os.W_OK | os.X_OK) else None


def shared_plotly_js(sweep_dir: Path) -> Path:
    """The sweep's one copy of plotly.js that its run directories link to (made if missing)."""
    shared = sweep_dir / SHARED_JS
    if not shared.exists():
        store.atomic_write(shared, store.plotly_js_source().read_bytes())
    return shared


def install_rendered(rendered: Rendered, target: Path, plotlyjs: str) -> dict:
    """Put a rendered run directory in place at `target`, whole or not at all; its summary."""
    assert rendered.summary is not None
    # The summary as `fitcli train` writes it into `target`: the worker wrote its scratch path.
    summary = {**rendered.summary, "run_dir": str(target)}
    files = {**rendered.files, store.SUMMARY: store.dumps_json(summary).encode("utf-8")}
    links = {}
    if plotlyjs == "directory":
        links[store.PLOTLY_JS] = shared_plotly_js(target.parent)
    store.install_run_dir(target, files, links, own=True)
    return summary


# --------------------------------------------------------------------------------------------
# The run table
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of runs.csv."""

    run: RunSpec
    status: str = "pending"
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
    tail = store.slug("-".join(parts)) if parts else "run"
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
        return store.fmt(v) if isinstance(v, float) else str(v)

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
    store.write_csv(sweep_dir / RUNS_FILE, header, lines)


def row_from_summary(row: Row, summary: dict, sweep_dir: Path, run_dir: Path) -> None:
    row.summary = summary
    row.status = summary.get("status", "failed")
    row.exit_code = summary.get("exit_code")
    row.converged = summary.get("converged")
    row.epochs = summary.get("epochs_run")
    row.final_loss = summary.get("final_loss")
    row.params = dict(summary.get("params") or {})
    row.time_s = summary.get("elapsed_s")
    row.reason = summary.get("reason")
    row.run_dir = os.path.relpath(run_dir, sweep_dir)


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
        return sum(r.status == "completed" for r in self.rows)

    @property
    def failed(self) -> int:
        return sum(r.status not in ("completed", "pending") for r in self.rows)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return int(exit_code_for("interrupted", self.signal))
        if not all(r.status == "completed" for r in self.rows):
            return int(ExitCode.FAILED)
        converged = all(r.converged is not False for r in self.rows)
        return strict_exit_code(int(ExitCode.COMPLETED), converged, self.strict)

    def to_json(self) -> dict:
        from fitcli.config import load_yaml

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


def create_sweep(plan: Plan, out: Path, command: list[str]) -> Path:
    """A new sweep directory with sweep.yaml and a runs.csv of pending runs."""
    from fitcli.config import dump_yaml

    name = plan.base.get("name", "sweep") if isinstance(plan.base, dict) else "sweep"
    sweep_dir = store.create_run_dir(out, f"{name}-sweep")
    doc = plan.to_doc()
    head = (
        "# A fitcli sweep: `fitcli sweep --resume DIR` runs what is missing or unfinished.\n"
        + store.command_comment(command)
    )
    store.atomic_write(sweep_dir / SWEEP_FILE, head + dump_yaml(doc))
    write_table(sweep_dir, plan, [Row(r) for r in plan.runs])
    return sweep_dir


def load_sweep(sweep_dir: Path) -> tuple[Plan, list[Row]]:
    """Plan and rows of an existing sweep directory (rows filled from the run directories; a run
    whose summary is unreadable or garbled is failed, so that it runs again)."""
    from fitcli.config import load_yaml
    from fitcli.runs import summary_problem

    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise SweepError(f"{sweep_dir} is not a sweep directory (no {SWEEP_FILE})")
    text = store.read_run_text(sweep_dir, SWEEP_FILE)
    plan = Plan.from_doc(load_yaml(text, str(path)), str(path))
    rows = [Row(r) for r in plan.runs]
    for row in rows:
        d = sweep_dir / run_dir_name(plan, row.run)
        if os.path.lexists(d / store.SUMMARY):
            try:
                summary = store.read_summary(d)
                problem = summary_problem(summary)
            except RunFileError as exc:
                problem = str(exc).removeprefix(f"{d}: ")
            if problem is None:
                row_from_summary(row, summary, sweep_dir, d)
            else:
                row.status, row.reason = "failed", problem
    return plan, rows


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
    from fitcli import console

    todo = [r for r in rows if r.status not in FINISHED]
    cfgs = {r.run.index: plan.cfg(r.run) for r in todo}
    stop = _Stop(stop_flag, options.fail_fast)
    outcome = Outcome(sweep_dir, plan, rows, strict=options.strict)
    by_index = {r.run.index: r for r in rows}
    done = [sum(r.status in FINISHED for r in rows), sum(r.status == "diverged" for r in rows)]
    if progress is not None:
        progress.update(done[0], done[1])

    def target_of(trace: Trace) -> Path:
        return sweep_dir / run_dir_name(plan, by_index[trace.index].run)

    def record(trace: Trace, summary: dict | None) -> None:
        """A run computed (and written, with its summary): its row and the progress bar."""
        row = by_index[trace.index]
        if trace.error is not None:
            row.status, row.exit_code, row.reason = "failed", trace.exit_code, trace.error
            if trace.exit_code == int(ExitCode.INVALID_INPUT):
                row.status = "invalid"
            console.warn(f"run {row.run.index} failed: {trace.error}")
        else:
            assert summary is not None
            row_from_summary(row, summary, sweep_dir, target_of(trace))
            if trace.batched > 1 and row.time_s is not None:
                row.time_s = trace.wall + row.time_s
        done[0] += 1
        if row.status != "completed":
            done[1] += 1
            if row.status != "interrupted":
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
            if r.status == "running":
                r.status = "interrupted"
        if outcome.interrupted:
            where = "Dask" if options.scheduler else "its worker process"
            for i in unfinished:
                if by_index[i].status == "pending":
                    by_index[i].status = "interrupted"
                    by_index[i].reason = f"interrupted before its result came back from {where}"
                    by_index[i].exit_code = outcome.exit_code
        write_table(sweep_dir, plan, rows)
    return outcome


def _run_here(plan, cfgs, indices, accept, stop, accept_batch=None) -> None:
    for task in make_tasks(plan, cfgs, indices, 1):
        if stop():
            break
        # Imported after the check: torch takes seconds to import, and a Ctrl-C meanwhile must
        # still find the runs started, so that they are written and marked interrupted.
        from fitcli.experiment import prepare

        preps = {}
        for i in task.indices:
            with contextlib.suppress(Exception):  # run_task reports it
                preps[i] = prepare(cfgs[i])
        traces = run_task(task, stop, preps)
        # A batch leaves its runs' prepared state untouched: the writer reuses it.
        pairs = [(t, preps.pop(t.index, None) if t.batched > 1 else None) for t in traces]
        if accept_batch is not None and _forking_pays([p for _, p in pairs]):
            accept_batch(pairs)
            continue
        for trace, prep in pairs:
            accept(trace, prep)


def writer_processes() -> int:
    """How many processes write a batch's run directories: FITCLI_SWEEP_WRITERS, else one per
    CPU this process may use, at most MAX_WRITERS."""
    env = os.environ.get("FITCLI_SWEEP_WRITERS", "").strip()
    if env.isdigit():
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WRITERS))


def _forking_pays(preps: Sequence[Any]) -> bool:
    """Fork writers for a batch of at least 2 runs per writer, on Linux (fork is safe there for a
    process that uses torch on one thread), with every run below ROW_EXACT_LIMIT points: a
    writer then never enters a parallel region (OpenMP does not survive fork)."""
    from fitcli.model import ROW_EXACT_LIMIT

    n = writer_processes()
    if n < 2 or len(preps) < 2 * n or not sys.platform.startswith("linux"):
        return False
    return all(p is not None and p.dataset.n < ROW_EXACT_LIMIT for p in preps)


# What forked writers write: set by `_write_forked` just before it forks, read by the children.
_FORKED_JOBS: list[tuple] = []
# Set (shared memory, read without a lock) by the parent just before it ends the writers with
# Pool.terminate's SIGTERM; a SIGTERM without it came from outside (a scheduler signalling the
# whole process group) and is the parent's to act on.
_WRITERS_STOP: Any = None


def _stopped_by_parent(signum: int, frame: Any) -> None:
    if _WRITERS_STOP is not None and not _WRITERS_STOP.value:
        return  # not from the parent: the writer goes on, its run comes back
    raise KeyboardInterrupt  # the run being written is marked interrupted, then the writer ends


def _writer_init() -> None:
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C does
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # and a closed terminal
    signal.signal(signal.SIGTERM, _stopped_by_parent)  # Pool.terminate: a second Ctrl-C, a fault
    torch.set_num_threads(1)
    # The parent's progress thread may have held stderr's lock when it forked: never touch it.
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the process's life


def _write_job(k: int) -> tuple[int, dict | None, Exception | None]:
    try:
        return k, claim_and_write(*_FORKED_JOBS[k]), None
    except Exception as exc:  # re-raised by the parent; KeyboardInterrupt ends this process
        return k, None, exc


def _write_forked(jobs: list[tuple], done: Callable[[int, dict], None]) -> None:
    """`claim_and_write(*job)` for every job in forked processes; `done(k, summary)` here."""
    global _FORKED_JOBS, _WRITERS_STOP
    import multiprocessing

    if not jobs:
        return
    _FORKED_JOBS = jobs
    try:
        ctx = multiprocessing.get_context("fork")
        _WRITERS_STOP = ctx.RawValue("b", 0)
        n = min(writer_processes(), len(jobs))
        pool = ctx.Pool(n, initializer=_writer_init)
        finished = False
        try:
            for k, summary, exc in pool.imap_unordered(_write_job, range(len(jobs))):
                if exc is not None:
                    raise exc
                done(k, summary)
            finished = True
        finally:
            if finished:
                # Every job is written: the writers end on their own. Pool.terminate (what
                # `with Pool` does) would take the task queue's lock for good and signal them,
                # and a writer the signal reaches just before it waits on that lock never ends
                # (a sweep hung so, one in about twenty, on a busy machine).
                pool.close()
                pool.join()
            else:
                _WRITERS_STOP.value = 1
                pool.terminate()  # a fault or Ctrl-C: stop the writers now
    finally:
        _FORKED_JOBS, _WRITERS_STOP = [], None


# In a worker process of `--workers N`: the parent's stop event and its pid (`_pool_init`).
_WORKER_STOP: Any = None
_WORKER_PARENT: int | None = None


def _pool_init(halt: Any = None, parent: int | None = None) -> None:
    global _WORKER_STOP, _WORKER_PARENT
    import signal

    # The parent decides what a stop signal does (a scheduler's SIGTERM reaches the whole
    # process group): it sets `halt`, and the worker's runs stop at the end of their epoch.
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    _WORKER_STOP, _WORKER_PARENT = halt, parent


def _worker_stop() -> bool:
    """Stop when the parent says so, or has died (SIGKILL): an orphan computes for no one."""
    halted = _WORKER_STOP is not None and _WORKER_STOP.is_set()
    return halted or (_WORKER_PARENT is not None and os.getppid() != _WORKER_PARENT)


def _worker_task(task: Task) -> list[Trace]:
    """`run_task` in a worker process, stopped by the parent's stop event."""
    traces = run_task(task, _worker_stop)
    if _WORKER_PARENT is not None and os.getppid() != _WORKER_PARENT:
        os._exit(1)  # orphaned: no one reads the result, nor ends this process
    return traces


class _Worker:
    """One worker process of `--workers N` (an executor of one), one task at a time: when it
    dies, the task it held is the one lost, and a new one takes its place."""

    def __init__(self, ctx: Any, halt: Any) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(
            1, mp_context=ctx, initializer=_pool_init, initargs=(halt, os.getpid())
        )
        self.process: Any = None

    def submit(self, task: Task) -> Any:
        fut = self.pool.submit(_worker_task, task)
        if self.process is None:  # started by the first submit
            procs = getattr(self.pool, "_processes", None) or {}
            self.process = next(iter(procs.values()), None)
        return fut

    def death(self) -> str:
        code = getattr(self.process, "exitcode", None)
        if code is None:
            return "its worker process died"
        if code < 0:
            import signal

            with contextlib.suppress(ValueError):
                return f"its worker process was killed by {signal.Signals(-code).name}"
        return f"its worker process died (exit code {code})"

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.kill()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _run_processes(plan, cfgs, indices, options, accept, stop, unfinished) -> None:
    """Tasks computed by worker processes, written here. A stop sets `halt`: tasks not begun
    stay pending, running ones stop at the end of the epoch and come back to be written as
    interrupted. A worker that dies fails its task's runs (with the reason) and is replaced;
    the others go on. A second signal ends the workers at once; `unfinished` receives the
    runs that did not come back."""
    import multiprocessing
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, wait
    from concurrent.futures.process import BrokenProcessPool

    queue = deque(make_tasks(plan, cfgs, indices, options.workers))
    ctx = multiprocessing.get_context("spawn")
    halt = ctx.Event()
    workers: list[_Worker | None] = [None] * min(options.workers, len(queue))
    busy: dict[Any, tuple[int, Task]] = {}  # future -> (worker, task)
    clean = False
    try:
        while queue or busy:
            if stop() and not halt.is_set():
                halt.set()
                queue.clear()  # not begun: their runs stay pending
            held = {k for k, _ in busy.values()}
            for k in range(len(workers)):
                if queue and k not in held:
                    if workers[k] is None:
                        workers[k] = _Worker(ctx, halt)
                    task = queue.popleft()
                    busy[workers[k].submit(task)] = (k, task)
            if not busy:
                break
            finished, _ = wait(list(busy), timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in sorted(finished, key=lambda f: busy[f][1].indices[0]):
                k, task = busy.pop(fut)
                if isinstance(fut.exception(), BrokenProcessPool):
                    dead, workers[k] = workers[k], None
                    reason = dead.death()
                    dead.close()
                    for i in task.indices:
                        accept(Trace(i, error=reason, exit_code=int(ExitCode.FAILED)))
                    continue
                for trace in fut.result():
                    accept(trace)
        clean = True
    finally:
        unfinished += [i for _, task in busy.values() for i in task.indices]
        if not clean:  # a second signal or a fault: end the workers now
            halt.set()
            for w in workers:
                if w is not None:
                    w.kill()
        for w in workers:
            if w is not None:
                w.close()


DASK_HINT = (
    "--scheduler needs Dask distributed, an optional extra: pip install 'fitcli[dask]' "
    "(or pip install 'dask[distributed]')"
)


CONNECT_TIMEOUT_S = 10.0  # to reach a scheduler and hear its handshake


async def _handshake(address: str) -> None:
    """Connect to `address` and read its Dask handshake. Dask's `connect` gives up connecting
    after CONNECT_TIMEOUT_S (OSError); the second more are for the handshake (TimeoutError)."""
    import asyncio

    from distributed.comm import connect as comm_connect

    comm = await asyncio.wait_for(
        comm_connect(address, timeout=CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S + 1
    )
    await comm.close()


def probe_scheduler(address: str) -> None:
    """A SweepError (exit 2) unless a Dask scheduler answers at a tcp:// `address` in time.

    Dask's own client waits for the handshake without a time limit and decodes whatever comes
    as frame lengths: a port that is silent hangs it for ever, one that sends anything else
    makes it allocate exabytes. So the handshake is heard here first, bounded in time, and any
    failure is a message. (tls:// and other protocols go to the client directly.)
    """
    import asyncio

    from distributed.comm.addressing import parse_address

    if parse_address(address)[0] != "tcp":
        return
    try:
        asyncio.run(_handshake(address))
    except TimeoutError:  # before OSError, its base class
        raise SweepError(
            f"{address} is not a Dask scheduler: it accepted the connection but sent no Dask "
            f"handshake within {CONNECT_TIMEOUT_S + 1:g} s"
        ) from None
    except OSError as exc:
        raise SweepError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever garbage did to the decoder
        raise SweepError(
            f"{address} is not a Dask scheduler: what it sent is not a Dask handshake "
            f"({type(exc).__name__})"
        ) from None


def connect(address: str) -> Any:
    """A Dask client for `address` (`local` starts a two-worker LocalCluster). The command line
    connects before it creates the sweep directory, so an unreachable scheduler leaves nothing."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise SweepError(DASK_HINT) from None
    if address == "local":
        # The workers run `dask_setup` below as they start (Dask's preload).
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, preload=["fitcli.sweep"]
        )
        client = Client(cluster)
        client._fitcli_cluster = cluster  # closed with the client below
        return client
    probe_scheduler(address)
    try:
        return Client(address, timeout=f"{CONNECT_TIMEOUT_S}s")
    except OSError as exc:
        raise SweepError(f"cannot reach the Dask scheduler at {address}: {exc}") from None


def dask_setup(worker: Any) -> None:
    """Preload of the local cluster's worker processes (`connect("local")`).

    A Ctrl-C at the terminal reaches them too: they ignore it, and this process decides what it
    does (cancel, write the table, close the cluster). And they end at once when their work is
    done: a Python process that has imported torch takes about 0.4 s to tear its modules down,
    which closing the cluster waits for, at the end of every sweep.
    """
    import atexit
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    atexit.register(_exit_now)
    # torch now, as the cluster starts: both workers import it at once, and the first task on
    # each (the client's checks against torch, a batch) does not wait a second for it.
    import fitcli.experiment  # noqa: F401


def _exit_now() -> None:
    # Runs as the worker process exits, after the worker has closed (its directory removed) and
    # multiprocessing has run its own exit function; it skips the teardown of modules and the
    # exit handlers registered before it (Dask's, for clients and clusters a worker has none of).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def dask_available() -> bool:
    try:
        import dask.distributed  # noqa: F401
    except ImportError:
        return False
    return True


# Runs per Dask render task: a worker computes its share of a batch as one tensor program
# (`run_task`), then renders it in parts of this many runs (`render_traces`), each sent back as
# soon as it is written, so the client writes while the workers still work.
DASK_RENDER_RUNS = 10


def _submit_dask(
    client: Any, plan: Plan, cfgs: dict, indices: Sequence[int], plotlyjs: str
) -> dict[Any, list[int]]:
    """Submit the sweep: {future: the runs it hands back}. A batch's computed traces are held
    by the cluster for its render tasks only: released once they are done or cancelled."""
    n = max(1, len(client.scheduler_info().get("workers", {})))
    parts: dict[Any, list[int]] = {}
    for task in make_tasks(plan, cfgs, indices, n):
        if not task.batch:
            parts[client.submit(render_task, task, plotlyjs, pure=False)] = task.indices
            continue
        traces = client.submit(run_task, task, pure=False)
        for lo in range(0, len(task.indices), DASK_RENDER_RUNS):
            part = task.indices[lo : lo + DASK_RENDER_RUNS]
            fut = client.submit(render_traces, task.plan, traces, part, plotlyjs, pure=False)
            parts[fut] = part
    return parts


def _run_dask(plan, cfgs, indices, options, accept, stop, unfinished) -> None:
    """Runs computed and written on the workers; `accept` puts each one in place here.
    `unfinished` receives the runs that did not come back."""
    client = options.client or connect(options.scheduler)
    try:
        from dask.distributed import wait

        pending = _submit_dask(client, plan, cfgs, indices, options.plotlyjs)
        try:
            while pending and not stop():
                try:
                    # A timeout, so that a Ctrl-C is seen while every task is still running.
                    done = wait(list(pending), timeout=0.2, return_when="FIRST_COMPLETED").done
                except TimeoutError:
                    continue
                for fut in sorted(done, key=lambda f: pending[f][0]):
                    for rendered in fut.result():
                        accept(rendered)
                    del pending[fut]  # released: the worker frees the files
                    if stop():
                        break
        finally:
            unfinished += [i for part in pending.values() for i in part]
            client.cancel(list(pending))
    finally:
        disconnect(client)


def disconnect(client: Any) -> None:
    """Close a client from `connect`, and the local cluster it started, if any."""
    cluster = getattr(client, "_fitcli_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def dry_run_lines(plan: Plan) -> Iterable[str]:
    """Each run's `fitcli train` command, quoted for the shell: a line runs as it is."""
    for run in plan.runs:
        yield shlex.join(plan.command(run))


__all__ = [
    "Axis",
    "Options",
    "Outcome",
    "Plan",
    "SweepError",
    "Trace",
    "compute_batch",
    "compute_single",
    "create_sweep",
    "expand",
    "load_sweep",
    "make_plan",
    "parse_assignments",
    "run_sweep",
    "split_values",
]
