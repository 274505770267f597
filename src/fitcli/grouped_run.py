"""A run over grouped data: prepare (memory estimate, packing), fit (`fitcli.groups`), decide
each group's status and the run's, and write the run directory (config.yaml, data.csv with a
group column, groups.csv, summary.json, report.html and two snapshot pages).

A grouped run is its own path beside `experiment.execute`: its parameters are a [G, q] block
plus shared ones, which the single-fit writer and snapshots do not hold.

Resume: the fit runs from checkpoint to checkpoint (the iterations of the snapshot schedule,
`train.snapshot_epochs`), and its state (`rundir.group_state.GroupState`: per group its values,
LM damping, iterations and whether it is done; for independent LM fits the rest of each
group's LM state, `lm_batch.Carry`) goes out through `on_checkpoint` after each stretch, and
when a stop signal ends the fit; `execute_grouped` writes it (state.json). Resumed
(`resume.prepare_resume`), the groups already done are not fitted again and the others continue
from their saved state, so the run ends with exactly the results of the run uninterrupted. The
exception: a global fit stopped by a signal between checkpoints restarts its LM's step scaling
there (it saves values and damping only), so its results agree to the fit's tolerances. A
gradient optimizer's state is saved whole: exact either way.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fitcli.data import Dataset
from fitcli.errors import (
    ConfigError,
    DataError,
    FitcliError,
    GroupStatus,
    RunStatus,
    exit_code_for,
    grouped_run_status,
)
from fitcli.groups import Layout, LMOptions, Packed, pack, packed_bytes
from fitcli.model import FitModel
from fitcli.rundir.group_state import GroupState

GROUPS_CSV = "groups.csv"  # = rundir.files.GROUPS
JSON_ROWS_LIMIT = 1000  # `--json` lists the groups' rows up to this many groups


def available_memory(device: torch.device) -> int:
    """Bytes this process can still allocate: free CUDA memory, or MemAvailable (Linux)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


@dataclass
class GroupedPrepared:
    """A grouped run, validated and packed on its device; nothing written yet."""

    cfg: Any
    dataset: Dataset
    model: FitModel
    device: torch.device
    dtype: torch.dtype
    packed: Packed
    layout: Layout
    lm: bool
    per_group: list[str]  # the free per-group parameters' names
    shared: list[str]  # the free shared ones
    starts: dict | None = None
    grouped: bool = True
    program: Any = None  # the compiled fit of independent groups (`fitcli.lm_jit`), or None

    @property
    def labels(self) -> tuple[str, ...]:
        assert self.dataset.group_labels is not None
        return self.dataset.group_labels


def prepare_grouped(
    cfg: Any, dataset: Dataset, model: FitModel, device: torch.device, dtype: torch.dtype
) -> GroupedPrepared:
    """Check what a grouped fit needs and pack the groups (refusing, with the figure, when the
    packed groups would not fit in the memory available)."""
    from fitcli import optim
    from fitcli.losses import resolve

    assert dataset.group is not None and dataset.group_labels is not None
    name, _ = optim.split_spec(cfg.optimizer)
    lm = optim.is_lm(name)
    if lm and resolve(cfg.loss).name != "mse":
        raise ConfigError(
            "loss: grouped fits with LevenbergMarquardt minimise least squares (loss: mse); "
            "for another loss use a gradient optimizer such as Adam"
        )
    specs = cfg.model.params or {}
    per = [n for n in model.free_names if getattr(specs.get(n), "per_group", None) is True]
    shared = [n for n in model.free_names if n not in per]
    if not per:
        raise ConfigError(
            "model.params: grouped data need at least one per-group parameter, e.g. "
            "params: {amp: {value: 1, per_group: true}}"
        )
    layout = Layout(
        [model.free_names.index(n) for n in per], [model.free_names.index(n) for n in shared]
    )
    n_groups = len(dataset.group_labels)
    counts = np.bincount(dataset.group, minlength=n_groups)
    k = 1 if dataset.x.ndim == 1 else dataset.x.shape[1]
    itemsize = 8 if dtype == torch.float64 else 4
    program = None
    if lm and not shared and device.type == "cpu":
        from fitcli import lm_jit

        if lm_jit.worth_it(n_groups * int(counts.max(initial=0))):
            # Compiled (or loaded from the cache) here, with the run's set-up: fit_s is fitting.
            program = lm_jit.compile_groups(model, dtype)
    need = packed_bytes(counts, k, len(model.free_names), itemsize, compiled=program is not None)
    have = available_memory(device)
    if need > have:
        raise DataError(
            f"data: {n_groups:,} groups of up to {int(counts.max()):,} points need about "
            f"{need / 2**30:.1f} GiB to fit, more than the {have / 2**30:.1f} GiB available "
            f"on {device}; fit the groups in several runs (split the data), or use float32"
        )
    most = int(counts.max(initial=0))
    length = lm_jit.padded_length(most) if program is not None else most
    packed = pack(
        dataset.x, dataset.y, dataset.sigma, dataset.group, n_groups, dtype, device, length
    )
    if program is not None:
        from fitcli.groups import verified

        # The translation's check against torch's autograd is part of compiling (its verdict
        # is kept for the fit): done here, at the start values, so that fit_s is fitting.
        raw = model.raw.detach()
        start = raw[layout.per_group].expand(n_groups, len(per)).clone()
        program = verified(program, model, layout, packed, start)
    return GroupedPrepared(
        cfg, dataset, model, device, dtype, packed, layout, lm, per, shared, program=program
    )


def _lm_options(cfg: Any) -> LMOptions:
    from fitcli import optim
    from fitcli.lm_optim import DEFAULTS

    _, kwargs = optim.split_spec(cfg.optimizer)
    o = {**DEFAULTS, **kwargs}
    return LMOptions(
        ftol=float(o["ftol"]),
        xtol=float(o["xtol"]),
        gtol=float(o["gtol"]),
        damping=float(o["damping"]),
        max_iter=int(cfg.epochs),
    )


def _start(prep: GroupedPrepared) -> tuple[torch.Tensor, torch.Tensor]:
    raw = prep.model.raw.detach()
    g = prep.packed.groups
    theta = raw[prep.layout.per_group].expand(g, len(prep.per_group)).clone()
    return theta, raw[prep.layout.shared].clone()


def kind_of(prep: GroupedPrepared) -> str:
    """How the groups are fitted (`rundir.group_state.KINDS`)."""
    if not prep.lm:
        return "gradient"
    return "global" if prep.shared else "independent"


def start_state(prep: GroupedPrepared) -> GroupState:
    """The state of a fit not begun: every group at the config's start values."""
    from fitcli.config import config_to_dict

    theta, shared = _start(prep)
    g = prep.packed.groups
    return GroupState(
        kind=kind_of(prep),
        epoch=0,
        theta=theta,
        shared=shared,
        damping=np.full(g, _lm_options(prep.cfg).damping if prep.lm else 0.0),
        iterations=np.zeros(g, dtype=np.int64),
        done=np.zeros(g, dtype=bool),
        status=[GroupStatus.COMPLETED.value] * g,
        reason=[""] * g,
        config=config_to_dict(prep.cfg),
    )


def fit(
    prep: GroupedPrepared,
    on_iter: Callable[[int], bool] | None = None,
    *,
    state: GroupState | None = None,
    on_checkpoint: Callable[[GroupState], None] | None = None,
) -> tuple[Any, bool]:
    """The grouped fit (`fitcli.groups`): LM, or a gradient optimizer on the summed loss, from
    `state` (None: the start). `on_iter(done)` is asked after each iteration (epoch) with the
    number done; True stops the fit there. `on_checkpoint(state)` receives the fit's state at
    each checkpoint and where it stops (module doc). Returns (the `groups.GroupFit`, whether
    it was stopped before it ended)."""
    state = start_state(prep) if state is None else state
    if prep.lm:
        return _fit_lm(prep, state, on_iter, on_checkpoint)
    return _fit_gradient(prep, state, on_iter, on_checkpoint)


def _checkpoints(cfg: Any) -> list[int]:
    """The iterations at which a fit's state is saved: the snapshot schedule's, to the last."""
    from fitcli.train import snapshot_epochs

    return [c for c in snapshot_epochs(cfg.epochs, cfg.snapshots) if c > 0]


def _fit_lm(
    prep: GroupedPrepared,
    state: GroupState,
    on_iter: Callable[[int], bool] | None,
    on_checkpoint: Callable[[GroupState], None] | None,
) -> tuple[Any, bool]:
    """LM from checkpoint to checkpoint: each stretch continues the groups not done, from
    their values and damping, for the iterations up to the next checkpoint (the groups of an
    independent fit grouped by the iterations they have run)."""
    from dataclasses import replace

    from fitcli.groups import fit_global, fit_independent

    opts = _lm_options(prep.cfg)
    epochs = prep.cfg.epochs
    marks = _checkpoints(prep.cfg)
    model, layout, packed = prep.model, prep.layout, prep.packed
    stopped = False
    # Each independent group's sum(r**2) at its values, from its fit (NaN: not fitted yet,
    # computed at the end), kept in the state so that a resumed run reports the same numbers. A
    # global fit's change with the shared values: they are all computed at the end.
    if not prep.shared and state.rss is None:
        state.rss = np.full(packed.groups, math.nan)
    while not stopped:
        left = np.flatnonzero(~state.done)
        if not left.size:
            break
        k = int(state.iterations[left].min())
        lanes = left[state.iterations[left] == k] if not prep.shared else left
        budget = next(c for c in marks if c > k) - k
        asked: dict[str, Any] = {"calls": 0, "stop": False}

        def should_stop(k: int = k, asked: dict[str, Any] = asked) -> bool:
            # Asked before each iteration of the stretch, with k + calls done; once True, it
            # stays True (the later chunks of an independent fit stop at once).
            if not asked["stop"] and on_iter is not None:
                asked["stop"] = bool(on_iter(k + asked["calls"]))
            asked["calls"] += 1
            return asked["stop"]

        idx = torch.as_tensor(lanes, device=state.theta.device)
        sub = packed.take(idx)
        stretch = replace(opts, max_iter=budget)
        if prep.shared:
            part = fit_global(
                model,
                layout,
                sub,
                state.theta[idx],
                state.shared,
                stretch,
                damping=float(state.damping[lanes[0]]),
                should_stop=should_stop,
            )
            state.shared = part.shared.clone()
        else:
            lam = torch.as_tensor(state.damping[lanes], dtype=torch.float64)
            part = fit_independent(
                model,
                layout,
                sub,
                state.theta[idx],
                stretch,
                damping=lam,
                should_stop=should_stop,
                program=prep.program,
                carry=_carry(state, lanes),
            )
            _keep_carry(state, lanes, part.carry)
            state.rss[lanes] = part.rss
        stopped = bool(asked["stop"])
        state.theta[idx] = part.theta
        assert part.damping is not None
        state.damping[lanes] = part.damping
        state.iterations[lanes] += part.iterations
        # Converged or failed groups are done, and completed ones at the run's iteration limit
        # (not this stretch's); the other completed ones were interrupted.
        words = np.array(part.status, dtype=object)
        completed = words == GroupStatus.COMPLETED.value
        done = state.iterations[lanes]
        at_limit = done >= epochs
        state.done[lanes[~completed | at_limit]] = True
        status = np.array(state.status, dtype=object)
        status[lanes] = words
        reason = np.array(state.reason, dtype=object)
        why = np.array(part.reason, dtype=object)
        why[completed & at_limit] = f"iteration limit: not converged in {epochs} iterations"
        cut = completed & ~at_limit
        why[cut] = [f"interrupted after {n} iterations" for n in done[cut].tolist()]
        reason[lanes] = why
        state.status, state.reason = status.tolist(), reason.tolist()
        state.epoch = int(state.iterations.max())
        if on_checkpoint is not None:
            on_checkpoint(state)
    return _group_fit(prep, state, known=None if prep.shared else state.rss), stopped


def _carry(state: GroupState, lanes: np.ndarray) -> Any:
    """The LM state of the groups `lanes` besides values and damping (`lm_batch.Carry`):
    saved, or the start's where the state holds none."""
    from fitcli.lm_batch import Carry

    if state.nu is None:
        return None
    return Carry(*(torch.as_tensor(getattr(state, k)[lanes]) for k in ("nu", "scale2", "polish")))


def _keep_carry(state: GroupState, lanes: np.ndarray, carry: Any) -> None:
    """Store the groups' LM state after a stretch, so the next one (or a resume) goes on."""
    if carry is None:
        return
    g, q = state.theta.shape
    if state.nu is None:
        state.nu = np.full(g, 2.0)
        state.scale2 = np.zeros((g, q))
        state.polish = np.full(g, math.nan)
    state.nu[lanes] = carry.nu.numpy()
    state.scale2[lanes] = carry.scale2.numpy()
    state.polish[lanes] = carry.polish.numpy()


def _group_fit(
    prep: GroupedPrepared,
    state: GroupState,
    history: list | None = None,
    known: np.ndarray | None = None,
) -> Any:
    """The `groups.GroupFit` of a fit's state; each group's ``sum(r**2)`` at its values (NaN
    for a group with too few points, left out of the fit): `known` where it is finite (the
    fit's own, from the same linearization), computed for the others."""
    from fitcli.groups import GroupFit, residual_ss, too_few

    data = prep.packed
    rss_np = np.full(data.groups, math.nan) if known is None else known.copy()
    todo = np.flatnonzero(~np.isfinite(rss_np))
    if todo.size:
        idx = torch.as_tensor(todo, device=state.theta.device)
        with torch.no_grad():
            part = residual_ss(
                prep.model,
                prep.layout,
                data.take(idx),
                state.theta[idx],
                state.shared,
                prep.program,
            )
        rss_np[todo] = part.cpu().numpy()
    rss_np[too_few(data.counts, len(prep.per_group))] = math.nan
    return GroupFit(
        state.theta,
        state.shared,
        list(state.status),
        list(state.reason),
        state.iterations.copy(),
        rss_np,
        history or [],
        damping=state.damping.copy(),
    )


def _fit_gradient(
    prep: GroupedPrepared,
    state: GroupState,
    on_iter: Callable[[int], bool] | None,
    on_checkpoint: Callable[[GroupState], None] | None,
) -> tuple[Any, bool]:
    """A torch optimizer on the loss of the stacked problem (the mean of the loss's point terms
    over every point of every group); the parameter vector holds per-group copies. Resumed
    from `state`, with its optimizer's and scheduler's state: as if never stopped."""
    from fitcli import optim
    from fitcli.groups import _model, too_few
    from fitcli.losses import resolve

    cfg, data = prep.cfg, prep.packed
    theta = torch.nn.Parameter(state.theta.clone())
    shared = torch.nn.Parameter(state.shared.clone())
    opt = optim.build_optimizer(cfg.optimizer, [theta, shared])
    sched = optim.build_scheduler(cfg.scheduler, opt)
    saved = state.optimizer or {}
    if saved.get("optimizer") is not None:
        opt.load_state_dict(saved["optimizer"])
    if saved.get("scheduler") is not None and sched is not None:
        sched.load_state_dict(saved["scheduler"])
    marks = set(_checkpoints(cfg))
    loss = resolve(cfg.loss)
    fn = _model(prep.model, prep.layout, data.x, False)
    mask = data.w > 0
    total = int(data.counts.sum())
    history: list[float] = []

    def objective() -> torch.Tensor:
        m = fn(theta, shared) * data.w
        point = torch.where(mask, loss.point(m, data.wy, torch), 0.0)
        return point.sum() / total

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = objective()
        value.backward()
        return value

    from fitcli.groups import residual_ss

    def save(epochs: int) -> None:
        state.theta, state.shared = theta.detach().clone(), shared.detach().clone()
        state.epoch = epochs
        state.iterations[:] = epochs
        state.optimizer = {
            "optimizer": opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
        }
        if on_checkpoint is not None:
            on_checkpoint(state)

    epochs, stopped, diverged = state.epoch, False, False
    for epoch in range(state.epoch, cfg.epochs):
        value: Any = opt.step(closure)  # type: ignore[arg-type]  # a closure may return a tensor
        if sched is not None:
            sched.step()
        history.append(float(value.detach()) if value is not None else math.nan)
        epochs = epoch + 1
        diverged = not math.isfinite(history[-1])
        asked = on_iter is not None and not diverged and bool(on_iter(epochs))
        stopped = asked and epochs < cfg.epochs
        if not diverged and (stopped or epochs in marks):
            save(epochs)
        if diverged or stopped:
            break
    with torch.no_grad():
        rss = residual_ss(prep.model, prep.layout, data, theta.detach(), shared.detach())
    rss_np = rss.cpu().numpy()
    q = theta.shape[1]
    few = too_few(data.counts, q)
    name = optim.split_spec(cfg.optimizer)[0]
    for j in range(data.groups):
        if few[j]:
            state.status[j] = GroupStatus.FAILED.value
            state.reason[j] = (
                f"too few points: {int(data.counts[j])} for {q} per-group parameter(s)"
            )
        elif not math.isfinite(float(rss_np[j])):
            state.status[j] = GroupStatus.FAILED.value
            state.reason[j] = "non-finite residuals at the end"
        elif stopped:
            state.status[j] = GroupStatus.COMPLETED.value
            state.reason[j] = f"interrupted after {epochs} epochs of {name}"
        else:
            state.status[j] = GroupStatus.COMPLETED.value
            state.reason[j] = f"ran {epochs} epochs of {name}"
    state.theta, state.shared = theta.detach(), shared.detach()
    state.iterations[:] = epochs
    state.done[:] = not stopped
    return _group_fit(prep, state, history), stopped


@dataclass
class ErrorBars:
    """A grouped fit's error bars, and the statuses they change (`error_bars`)."""

    status: list[str]
    reason: list[str]
    se: np.ndarray  # [G, per-group parameters]
    se_shared: np.ndarray  # [shared parameters]


def error_bars(prep: GroupedPrepared, result: Any) -> ErrorBars:
    """Each group's standard errors (and the shared ones). A group whose J^T J is singular
    fails with that reason (its errors are not determined)."""
    from fitcli.groups import stderr_global, stderr_independent

    data, layout, model = prep.packed, prep.layout, prep.model
    scale = not (prep.dataset.sigma is not None and prep.cfg.data.absolute_sigma is not False)
    status, reason = list(result.status), list(result.reason)
    ok = np.array(status, dtype=object) != GroupStatus.FAILED.value
    theta = result.theta
    if not prep.shared:
        se, singular = stderr_independent(model, layout, data, theta, scale, prep.program)
        se_shared: np.ndarray = np.zeros(0)
    else:
        se, se_shared, sing = stderr_global(model, layout, data, theta, result.shared, ok, scale)
        singular = np.full(data.groups, sing)
    for bad in np.flatnonzero(singular & ok).tolist():
        status[bad] = GroupStatus.FAILED.value
        reason[bad] = (
            f"{reason[bad]}; singular: J^T J has a null space, the group's data do not determine "
            "its parameters"
        )
    return ErrorBars(status, reason, se, se_shared)


def finish(prep: GroupedPrepared, result: Any, bars: ErrorBars) -> tuple[list[dict], dict, dict]:
    """Each group's row from the fit and its error bars: (rows, shared values, shared
    stderrs)."""
    from fitcli.groups import external_values
    from fitcli.losses import resolve

    data, layout, model = prep.packed, prep.layout, prep.model
    status, reason, se, se_shared = bars.status, bars.reason, bars.se, bars.se_shared
    theta = result.theta
    values = external_values(model, layout, theta, result.shared).cpu().numpy()
    loss = resolve(prep.cfg.loss)
    from fitcli.groups import _model

    counts = np.maximum(data.counts, 1)
    if loss.name == "mse" and bool(np.isfinite(result.rss).all()):
        group_loss = np.asarray(result.rss, dtype=np.float64) / counts  # the mean squared residual
    else:
        with torch.no_grad():
            m = _model(model, layout, data.x, False)(theta, result.shared) * data.w
            point = torch.where(data.w > 0, loss.point(m, data.wy, torch), 0.0)
            group_loss = point.to(torch.float64).sum(-1).cpu().numpy() / counts
    group_loss = np.where(data.counts > 0, group_loss, math.nan)
    # Columns as Python lists, then one dict per group (a per-cell numpy read is 10x slower).
    names = ["group", "status", "reason", "iterations", "n_points", "loss", "rss"]
    columns: list[list] = [
        list(prep.labels),
        status,
        reason,
        np.asarray(result.iterations, dtype=np.int64).tolist(),
        np.asarray(data.counts, dtype=np.int64).tolist(),
        group_loss.tolist(),
        np.asarray(result.rss, dtype=np.float64).tolist(),
    ]
    for k, name in enumerate(prep.per_group):
        names += [name, f"{name}_stderr"]
        columns += [values[:, layout.per_group[k]].tolist(), se[:, k].tolist()]
    rows = [dict(zip(names, cells, strict=True)) for cells in zip(*columns, strict=True)]
    shared_values = {
        n: float(values[0, layout.shared[k]]) if len(values) else math.nan
        for k, n in enumerate(prep.shared)
    }
    shared_se = {n: float(se_shared[k]) for k, n in enumerate(prep.shared)}
    return rows, shared_values, shared_se


def write_groups_csv(path: Path, rows: list[dict]) -> None:
    from fitcli.rundir import files

    header = list(rows[0]) if rows else ["group", "status", "reason"]
    # Column by column (a row per group: 10^5 and more): a float as `files.fmt` writes it.
    columns = []
    for key in header:
        cells = [row[key] for row in rows]
        columns.append([repr(float(v)) if isinstance(v, float) else v for v in cells])
    files.write_csv(path, header, zip(*columns, strict=True))


def execute_grouped(
    prep: GroupedPrepared,
    run_dir: Path,
    *,
    plotlyjs: str = "directory",
    command: list[str],
    on_epoch: Callable[[int, float], bool] | None = None,
    stopped_by: Callable[[], str | None] | None = None,
    resume: Any = None,
    copy_data: bool = False,
) -> dict:
    """Fit a grouped run into `run_dir` (already created) and return its summary; with
    `resume` (a `resume.ResumePoint` holding a `GroupState`), continue that run directory
    from its saved state. `on_epoch(done, nan)` after each iteration (epoch): True stops the
    run there (interrupted, by the signal `stopped_by` names), its state saved. The data are
    data.csv, or a large data file by reference (`grouped_data_form`; `copy_data` copies it
    into data.csv); a resumed run keeps the form it has."""
    from fitcli.experiment import resolved_config_text
    from fitcli.rundir import files
    from fitcli.rundir.group_state import save_group_state
    from fitcli.rundir.writer import (
        base_summary,
        failure_fields,
        interruption_fields,
        tidy_snapshots,
    )

    t0 = time.perf_counter()
    ds = prep.dataset
    if resume is not None:
        form = "file" if "data_file" in resume.summary else "csv"
    else:
        form = grouped_data_form(prep, copy_data)
    summary: dict[str, Any] = dict(
        base_summary(prep, run_dir, command, data_form=form)  # type: ignore[arg-type]
    )
    summary["groups"] = len(prep.labels)
    if resume is not None:
        summary = resume.continued_summary(summary)
        state: GroupState = resume.saved
        data_files = state.data_files
    else:
        state = start_state(prep)
        data_files = group_file_digests(prep.cfg)

    saving = [0.0]  # seconds spent writing state.json, not fitting (fit_s leaves it out)

    def on_checkpoint(st: GroupState) -> None:
        t = time.perf_counter()
        st.data_files = data_files
        save_group_state(run_dir, st)
        saving[0] += time.perf_counter() - t

    def on_iter(done: int) -> bool:
        return bool(on_epoch(done, math.nan)) if on_epoch is not None else False

    try:
        (run_dir / files.SNAPSHOTS).mkdir(exist_ok=True)
        if resume is None:
            cfg_text = resolved_config_text(prep.cfg, prep.device, command)
            files.atomic_write(run_dir / files.CONFIG, cfg_text)
            assert ds.group is not None
            if form == "csv":  # else the data file is the run's data (summary's data_file)
                files.write_data_csv(
                    run_dir / files.DATA,
                    ds.x,
                    ds.y,
                    ds.y_true,
                    ds.sigma,
                    ds.variables,
                    group=ds.group,
                    group_labels=prep.labels,
                )
            if ds.left_out is not None and len(ds.left_out.y):
                files.write_left_out_csv(run_dir / files.LEFT_OUT, ds.left_out, ds.variables)
        else:
            tidy_snapshots(run_dir, prep.cfg.epochs)  # temporary files a kill left
            if resume.overrides:  # resumed with overrides: config.yaml is the config now
                cfg_text = resolved_config_text(prep.cfg, prep.device, command)
                files.atomic_write(run_dir / files.CONFIG, cfg_text)
        if plotlyjs == "directory":
            files.copy_plotly_js(run_dir)
        files.write_json(run_dir / files.SUMMARY, summary)
        if resume is None:
            on_checkpoint(state)  # the start: a run killed from here on can be resumed
        t_fit = time.perf_counter()
        saving[0] = 0.0
        result, stopped = fit(prep, on_iter, state=state, on_checkpoint=on_checkpoint)
        bars = error_bars(prep, result)
        # The fit and its error bars (what a curve_fit call does), not the rows built from them.
        fit_s = time.perf_counter() - t_fit - saving[0]
        rows, shared_values, shared_se = finish(prep, result, bars)
        statuses = [r["status"] for r in rows]
        status = RunStatus.INTERRUPTED if stopped else grouped_run_status(statuses)
        failed = sum(s == GroupStatus.FAILED for s in statuses)
        converged = sum(s == GroupStatus.CONVERGED for s in statuses)
        write_groups_csv(run_dir / GROUPS_CSV, rows)
        total_rss = float(np.nansum(result.rss))
        n_total = int(prep.packed.counts.sum())
        summary.update(
            status=status,
            exit_code=int(exit_code_for(status)),
            epochs_run=int(max((r["iterations"] for r in rows), default=0)),
            final_loss=float(np.nansum([r["loss"] * r["n_points"] for r in rows])) / n_total,
            params=shared_values,
            stderr=shared_se,
            per_group_params=list(prep.per_group),
            groups_converged=converged,
            groups_failed=failed,
            groups_completed=len(rows) - converged - failed,
            rss=total_rss,
            n_params=len(rows) * len(prep.per_group) + len(prep.shared),
            converged=failed == 0 and converged == len(rows),
            reason=(
                f"{failed} of {len(rows)} groups failed (see {GROUPS_CSV})"
                if failed
                else f"every group {'converged' if converged == len(rows) else 'completed'}"
            ),
            fit_s=fit_s,
            fits_per_s=len(rows) / fit_s if fit_s > 0 else None,
            groups_file=GROUPS_CSV,
        )
        if stopped:
            by = stopped_by() if stopped_by is not None else None
            summary.update(interruption_fields(by, f"after epoch {state.epoch}"))
            summary["converged"] = False
        summary.pop("process", None)
        _write_pages(prep, run_dir, rows, result, plotlyjs, summary)
        summary["elapsed_s"] = time.perf_counter() - t0
        summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        files.write_json(run_dir / files.SUMMARY, summary)
    except BaseException as exc:
        # A second stop signal (KeyboardInterrupt): interrupted at once.
        summary.update(failure_fields(exc, time.perf_counter() - t0, stopped_by))
        summary.pop("process", None)
        with contextlib.suppress(FitcliError):
            files.write_json(run_dir / files.SUMMARY, summary)
        raise
    if len(rows) <= JSON_ROWS_LIMIT:
        summary = {**summary, "groups": rows}  # --json: the rows themselves
    return summary


def grouped_data_form(prep: GroupedPrepared, copy_data: bool = False) -> str:
    """How a grouped run directory holds its observations: "csv" (data.csv, the variables, y,
    sigma and group of every row the fit used), or "file" for one data file of more than
    `files.DATA_CSV_MAX_ROWS` rows, as single runs keep theirs: not copied, summary.json's
    `data_file` names it with its size and `data_digest` its content (10^7 rows: 2.5 s and
    some 400 MB less), unless `copy_data`. `fitcli plot` reads it again through the run's
    config, and refuses it changed."""
    from fitcli.rundir import files

    ds = prep.dataset
    if copy_data or prep.cfg.data.file is None or ds.digest is None or ds.size is None:
        return "csv"
    return "file" if ds.n > files.DATA_CSV_MAX_ROWS else "csv"


def group_file_digests(cfg: Any) -> list[list[str]] | None:
    """Each file of `data.files` with its digest, [[path, digest], ...] (None for one data
    file): what resume compares them with, to name a file changed, added or gone since."""
    if cfg.data.files is None:
        return None
    from fitcli.data import file_digest
    from fitcli.groups_data import expand_files

    return [[str(p), file_digest(p)] for p in expand_files(cfg.data.files)]


def rebuild_report(run_dir: Path, *, out: Path | None = None, plotlyjs: str = "directory") -> Any:
    """`fitcli plot` of a grouped run: its pages drawn again from what the run directory holds
    (config.yaml, data.csv, groups.csv, summary.json's shared values), as `execute_grouped`
    drew them; the report at `out` (default RUN_DIR/report.html). Everything is read and built
    before the first byte is written. Returns `report.Written`."""
    from types import SimpleNamespace

    from fitcli.model import build_model, to_internal
    from fitcli.report import Written
    from fitcli.rundir import files
    from fitcli.rundir.reader import read_grouped

    run = read_grouped(run_dir)
    cfg, ds, rows = run.cfg, run.dataset, run.rows
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    model = build_model(cfg.model, cfg.seed, dtype, ds.variables)
    per = [n for n in run.summary["per_group_params"] if n in model.free_names]
    shared = [n for n in model.free_names if n not in per]
    layout = Layout(
        [model.free_names.index(n) for n in per], [model.free_names.index(n) for n in shared]
    )
    assert ds.group is not None and ds.group_labels is not None
    n_groups = len(ds.group_labels)
    packed = pack(ds.x, ds.y, ds.sigma, ds.group, n_groups, dtype, torch.device("cpu"))
    prep = GroupedPrepared(
        cfg, ds, model, torch.device("cpu"), dtype, packed, layout, True, per, shared
    )
    infos = {i.name: i for i in model.infos}
    values = run.summary.get("params") or {}
    theta = torch.tensor(
        [[to_internal(infos[n], r[n]) for n in per] for r in rows], dtype=dtype
    ).reshape(n_groups, len(per))
    shared_t = torch.tensor([to_internal(infos[n], values[n]) for n in shared], dtype=dtype)
    page = Path(out) if out is not None else run.path / files.REPORT
    files.check_output_file(page, "--out")
    from fitcli.report import _href

    elsewhere = page.parent.resolve() != run.path.resolve()
    pages = _pages(
        prep,
        rows,
        SimpleNamespace(theta=theta, shared=shared_t),
        plotlyjs,
        run.summary,
        run.config_text,
        snapshot_href=(_href(run.path / files.SNAPSHOTS, page.parent) + "/")
        if elsewhere
        else "snapshots/",
    )
    if plotlyjs == "directory" and elsewhere:
        files.copy_plotly_js(page.parent)
    written = []
    for rel, text in pages.items():
        if rel != files.REPORT:
            files.atomic_write(run.path / rel, text)
            written.append(run.path / rel)
    files.atomic_write(page, pages[files.REPORT])
    return Written(page, written)


def _write_pages(
    prep: GroupedPrepared,
    run_dir: Path,
    rows: list[dict],
    result: Any,
    plotlyjs: str,
    summary: dict,
) -> None:
    """report.html (summary, small multiples and histograms) and the two snapshot pages: the
    start and the fit, both as small multiples."""
    from fitcli.rundir import files

    config_text = (run_dir / files.CONFIG).read_text(encoding="utf-8")
    pages = _pages(prep, rows, result, plotlyjs, summary, config_text)
    for rel, text in pages.items():
        files.atomic_write(run_dir / rel, text)


def _pages(
    prep: GroupedPrepared,
    rows: list[dict],
    result: Any,
    plotlyjs: str,
    summary: dict,
    config_text: str,
    snapshot_href: str = "snapshots/",
) -> dict[str, str]:
    """The grouped run's pages by their paths in the run directory: report.html and the two
    snapshots. `snapshot_href`: how report.html links to the snapshot pages (written elsewhere
    by `fitcli plot --out`, plotly.min.js is copied beside it)."""
    from fitcli.plots import axis_labels, group_histograms, group_small_multiples, groups_page
    from fitcli.report import grouped_report_page
    from fitcli.rundir import files

    columns = summary.get("columns")
    labels = axis_labels(prep.cfg.report, columns if isinstance(columns, dict) else None)
    several = prep.packed.x.dim() > 2  # then drawn as observed against fitted y
    theta0, shared0 = _start(prep)
    curves_fit = _curves(prep, result.theta, result.shared, rows, labels.log_x)
    curves_start = _curves(prep, theta0, shared0, rows, labels.log_x)
    name = prep.cfg.name

    def grid(curves: list, title: str) -> dict:
        return group_small_multiples(curves, title=title, labels=labels, versus_fitted=several)

    fig_fit = grid(curves_fit, f"{name}: fits by group")
    fig_start = grid(curves_start, f"{name}: start")
    hist = group_histograms(rows, prep.per_group)
    width = len(str(prep.cfg.epochs))
    last = int(max((r["iterations"] for r in rows), default=0))
    start_file, fit_file = (f"epoch-{k:0{width}d}.html" for k in (0, last))
    links = [("0 (start)", snapshot_href + start_file), (f"{last} (fit)", snapshot_href + fit_file)]
    report = grouped_report_page(
        summary=summary,
        rows=rows,
        config_text=config_text,
        fits=fig_fit,
        histograms=hist,
        shown=len(curves_fit),
        snapshots=links,
        plotlyjs_src=plotlyjs if plotlyjs in ("embed", "cdn") else files.PLOTLY_JS,
    )
    return {
        f"{files.SNAPSHOTS}/{start_file}": groups_page([fig_start], plotlyjs, 1, name),
        f"{files.SNAPSHOTS}/{fit_file}": groups_page([fig_fit], plotlyjs, 1, name),
        files.REPORT: report,
    }


def _curves(
    prep: GroupedPrepared,
    theta: torch.Tensor,
    shared: torch.Tensor,
    rows: list[dict],
    log_x: bool = False,
):
    """At most 36 groups, spread over the loss distribution with the worst first: each one's
    label, status, data (x, y), fitted curve (x grid, model) and its rows left out (x, y,
    reason; None if none). The grid spans the group's x, evenly in log x with `log_x` where
    its x are positive. Several variables: (label, status, the fit at the data points, y,
    None, None, None)."""
    from fitcli.groups import _model

    finite = [j for j, r in enumerate(rows) if math.isfinite(r["loss"])]
    order = sorted(finite, key=lambda j: -rows[j]["loss"])
    others = [j for j, r in enumerate(rows) if not math.isfinite(r["loss"])]
    order = others + order
    if len(order) > 36:
        picks = np.unique(np.linspace(0, len(order) - 1, 36).round().astype(int))
        order = [order[k] for k in picks]
    data = prep.packed
    idx = torch.as_tensor(order, dtype=torch.long)
    if not idx.numel():
        return []
    sub = data.take(idx)
    x = sub.x
    with torch.no_grad():
        if x.dim() == 2:
            # A group's pads (weight 0) lie inside its points' range: the padding repeats one.
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            t = torch.linspace(0, 1, 200, dtype=x.dtype, device=x.device)
            grid = lo + (hi - lo) * t
            if log_x:
                ratio = torch.where(lo > 0, hi / lo.clamp_min(torch.finfo(x.dtype).tiny), 1.0)
                grid = torch.where(lo > 0, lo * ratio**t, grid)
        else:
            grid = x  # several variables: the fit at the data points
        m = _model(prep.model, prep.layout, grid, False)(theta[idx], shared).cpu().numpy()
    left = prep.dataset.left_out
    left_groups = None if left is None or left.group is None else left.group.astype(str)
    out: list[tuple[Any, ...]] = []
    for k, j in enumerate(order):
        n = int(data.counts[j])
        w = sub.w[k, :n].cpu().numpy()
        ys = (sub.wy[k, :n].cpu().numpy() / np.where(w > 0, w, 1.0)) if n else np.zeros(0)
        label, status = rows[j]["group"], rows[j]["status"]
        if x.dim() == 2:
            xs = sub.x[k, :n].cpu().numpy()
            mine = None
            if left is not None and left_groups is not None:
                sel = left_groups == label
                if sel.any():
                    mine = (left.x[sel], left.y[sel], left.reason[sel])
            out.append((label, status, xs, ys, grid[k].cpu().numpy(), m[k], mine))
        else:
            out.append((label, status, m[k, :n], ys, None, None, None))
    return out
