"""The batched engine: runs that share a basis model, data grid, loss and epochs, and use an
elementwise torch.optim optimizer without a scheduler or mini-batches, train together as one
tensor program (a leading run dimension on the parameters, one optimizer per distinct optimizer
section); and tasks, the picklable unit an executor runs.

torch (and the fitcli modules that import it) is imported inside functions: `fitcli.sweep`
re-exports this module, and its Dask client and `fitcli --help` must not import torch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fitcli import optim
from fitcli.errors import (
    FitcliError,
    RunStatus,
    exit_code_for,
)
from fitcli.sweep.plan import SWEEP_FILE, Plan
from fitcli.sweep.replay import Trace, compute_single

# Optimizers whose update is elementwise, checked bit for bit against single runs in the tests.
BATCHABLE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad")
MAX_BATCH = 1024


# --------------------------------------------------------------------------------------------
# The batched engine
# --------------------------------------------------------------------------------------------


def batch_key(cfg: Any) -> tuple | None:
    """Runs with equal keys can train as one batch (checked again on the prepared data)."""
    name, kwargs = optim.split_spec(cfg.optimizer)
    if cfg.model.basis is None or cfg.scheduler is not None or cfg.batch_size is not None:
        return None
    if cfg.starts > 1:  # each run searches its own starts (`fitcli.starts`)
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
    import torch  # lazy: torch-free Dask client, fast CLI start-up

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
    import torch  # lazy: torch-free Dask client, fast CLI start-up

    from fitcli.model import ROW_EXACT_LIMIT, BasisModel  # lazy: imports torch

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
    import torch  # lazy: torch-free Dask client, fast CLI start-up

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
    import torch  # lazy: torch-free Dask client, fast CLI start-up

    from fitcli.losses import resolve
    from fitcli.model import rows_dot  # lazy: imports torch
    from fitcli.train import snapshot_epochs  # lazy: imports torch

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
    leaves: list[torch.Tensor] = []
    opts: list[Any] = []
    lrs: list[Any] = []
    row_of: dict[int, tuple[int, int]] = {}
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
    base = resolve(cfg0.loss).torch_function()
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
    code = (
        int(exc.exit_code) if isinstance(exc, FitcliError) else int(exit_code_for(RunStatus.FAILED))
    )
    msg = str(exc) if isinstance(exc, FitcliError) else f"{type(exc).__name__}: {exc}"
    return Trace(index, error=msg or type(exc).__name__, exit_code=code)


def run_task(
    task: Task, stop: Callable[[], bool] | None = None, preps: dict | None = None
) -> list[Trace]:
    """Compute a task's runs: one batch when they qualify, else one after another.

    This is what local worker processes and Dask workers execute; it writes nothing.
    """
    from fitcli.prepare import prepare  # lazy: imports torch

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
