"""A run over grouped data: prepare (memory estimate, packing), fit (`fitcli.groups`), decide
each group's status and the run's, and write the run directory (config.yaml, data.csv with a
group column, groups.csv, summary.json, report.html and two snapshot pages).

A grouped run is its own path beside `experiment.execute`: its parameters are a [G, q] block
plus shared ones, which the single-fit writer, snapshots and resume do not hold. It cannot be
resumed (`resume.prepare_resume` refuses it); it is fast enough to run again.
"""

from __future__ import annotations

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
    GroupStatus,
    RunStatus,
    exit_code_for,
    grouped_run_status,
)
from fitcli.groups import Layout, LMOptions, Packed, pack, packed_bytes
from fitcli.model import FitModel

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
    need = packed_bytes(counts, k, len(model.free_names), itemsize)
    have = available_memory(device)
    if need > have:
        raise DataError(
            f"data: {n_groups:,} groups of up to {int(counts.max()):,} points need about "
            f"{need / 2**30:.1f} GiB to fit, more than the {have / 2**30:.1f} GiB available "
            f"on {device}; fit the groups in several runs (split the data), or use float32"
        )
    packed = pack(dataset.x, dataset.y, dataset.sigma, dataset.group, n_groups, dtype, device)
    return GroupedPrepared(cfg, dataset, model, device, dtype, packed, layout, lm, per, shared)


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


def fit(prep: GroupedPrepared, on_iter: Callable[[int], bool] | None = None) -> Any:
    """The grouped fit (`fitcli.groups`): LM, or a gradient optimizer on the summed loss."""
    from fitcli.groups import fit_global, fit_independent

    theta, shared = _start(prep)
    if prep.lm:
        opts = _lm_options(prep.cfg)
        if not prep.shared:
            return fit_independent(prep.model, prep.layout, prep.packed, theta, opts, on_iter)
        return fit_global(prep.model, prep.layout, prep.packed, theta, shared, opts, on_iter)
    return _fit_gradient(prep, theta, shared, on_iter)


def _fit_gradient(
    prep: GroupedPrepared,
    theta0: torch.Tensor,
    shared0: torch.Tensor,
    on_iter: Callable[[int], bool] | None,
) -> Any:
    """A torch optimizer on the loss of the stacked problem (the mean of the loss's point terms
    over every point of every group); the parameter vector holds per-group copies."""
    from fitcli import optim
    from fitcli.groups import GroupFit, _model, too_few
    from fitcli.losses import resolve

    cfg, data = prep.cfg, prep.packed
    theta = torch.nn.Parameter(theta0.clone())
    shared = torch.nn.Parameter(shared0.clone())
    opt = optim.build_optimizer(cfg.optimizer, [theta, shared])
    sched = optim.build_scheduler(cfg.scheduler, opt)
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

    epochs = 0
    for epoch in range(cfg.epochs):
        value: Any = opt.step(closure)  # type: ignore[arg-type]  # a closure may return a tensor
        if sched is not None:
            sched.step()
        history.append(float(value.detach()) if value is not None else math.nan)
        epochs = epoch + 1
        if not math.isfinite(history[-1]) or (on_iter is not None and on_iter(epoch)):
            break
    from fitcli.groups import residual_ss

    with torch.no_grad():
        rss = residual_ss(prep.model, prep.layout, data, theta.detach(), shared.detach())
    rss_np = rss.cpu().numpy()
    q = theta.shape[1]
    few = too_few(data.counts, q)
    status, reason = [], []
    for j in range(data.groups):
        if few[j]:
            status.append(GroupStatus.FAILED.value)
            reason.append(f"too few points: {int(data.counts[j])} for {q} per-group parameter(s)")
        elif not math.isfinite(float(rss_np[j])):
            status.append(GroupStatus.FAILED.value)
            reason.append("non-finite residuals at the end")
        else:
            status.append(GroupStatus.COMPLETED.value)
            reason.append(f"ran {epochs} epochs of {optim.split_spec(cfg.optimizer)[0]}")
    iters = np.full(data.groups, epochs)
    return GroupFit(theta.detach(), shared.detach(), status, reason, iters, rss_np, history)


def finish(prep: GroupedPrepared, result: Any) -> tuple[list[dict], dict, dict]:
    """Error bars and each group's row: (rows, shared values, shared stderrs). A group whose
    J^T J is singular fails with that reason (its errors are not determined)."""
    from fitcli.groups import external_values, stderr_global, stderr_independent
    from fitcli.losses import resolve

    data, layout, model = prep.packed, prep.layout, prep.model
    scale = not (prep.dataset.sigma is not None and prep.cfg.data.absolute_sigma is not False)
    status, reason = list(result.status), list(result.reason)
    ok = np.array([s != GroupStatus.FAILED for s in status])
    theta = result.theta
    if not prep.shared:
        se, singular = stderr_independent(model, layout, data, theta, scale)
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
    values = external_values(model, layout, theta, result.shared).cpu().numpy()
    loss = resolve(prep.cfg.loss)
    from fitcli.groups import _model

    with torch.no_grad():
        m = _model(model, layout, data.x, False)(theta, result.shared) * data.w
        point = torch.where(data.w > 0, loss.point(m, data.wy, torch), 0.0).to(torch.float64)
        group_loss = (point.sum(-1) / torch.as_tensor(data.counts).clamp_min(1)).cpu().numpy()
    rows = []
    for j, label in enumerate(prep.labels):
        row: dict[str, Any] = {
            "group": label,
            "status": status[j],
            "reason": reason[j],
            "iterations": int(result.iterations[j]),
            "n_points": int(data.counts[j]),
            "loss": float(group_loss[j]) if data.counts[j] else math.nan,
            "rss": float(result.rss[j]),
        }
        for k, name in enumerate(prep.per_group):
            row[name] = float(values[j, layout.per_group[k]])
            row[f"{name}_stderr"] = float(se[j, k])
        rows.append(row)
    shared_values = {
        n: float(values[0, layout.shared[k]]) if len(values) else math.nan
        for k, n in enumerate(prep.shared)
    }
    shared_se = {n: float(se_shared[k]) for k, n in enumerate(prep.shared)}
    return rows, shared_values, shared_se


def write_groups_csv(path: Path, rows: list[dict]) -> None:
    from fitcli.rundir import files

    header = list(rows[0]) if rows else ["group", "status", "reason"]
    out = []
    for row in rows:
        out.append([files.fmt(v) if isinstance(v, float) else v for v in row.values()])
    files.write_csv(path, header, out)


def execute_grouped(
    prep: GroupedPrepared,
    run_dir: Path,
    *,
    plotlyjs: str = "directory",
    command: list[str],
    on_epoch: Callable[[int, float], bool] | None = None,
    stopped_by: Callable[[], str | None] | None = None,
) -> dict:
    """Fit a grouped run into `run_dir` (already created) and return its summary."""
    from fitcli.experiment import resolved_config_text
    from fitcli.rundir import files
    from fitcli.rundir.writer import base_summary

    t0 = time.perf_counter()
    ds = prep.dataset
    summary: dict[str, Any] = dict(base_summary(prep, run_dir, command))  # type: ignore[arg-type]
    summary["groups"] = len(prep.labels)
    (run_dir / files.SNAPSHOTS).mkdir(exist_ok=True)
    files.atomic_write(run_dir / files.CONFIG, resolved_config_text(prep.cfg, prep.device, command))
    assert ds.group is not None
    files.write_data_csv(
        run_dir / files.DATA,
        ds.x,
        ds.y,
        ds.y_true,
        ds.sigma,
        ds.variables,
        group=np.asarray(prep.labels, dtype=object)[ds.group],
    )
    if plotlyjs == "directory":
        files.copy_plotly_js(run_dir)
    files.write_json(run_dir / files.SUMMARY, summary)

    def on_iter(it: int) -> bool:
        return bool(on_epoch(it + 1, math.nan)) if on_epoch is not None else False

    try:
        t_fit = time.perf_counter()
        result = fit(prep, on_iter)
        rows, shared_values, shared_se = finish(prep, result)
        fit_s = time.perf_counter() - t_fit
        statuses = [r["status"] for r in rows]
        status = grouped_run_status(statuses)
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
        summary.pop("process", None)
        _write_pages(prep, run_dir, rows, result, plotlyjs)
        summary["elapsed_s"] = time.perf_counter() - t0
        summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        files.write_json(run_dir / files.SUMMARY, summary)
    except BaseException as exc:
        summary.update(
            status=RunStatus.FAILED,
            exit_code=int(exit_code_for(RunStatus.FAILED)),
            converged=False,
            elapsed_s=time.perf_counter() - t0,
            reason=str(exc) or type(exc).__name__,
        )
        summary.pop("process", None)
        files.write_json(run_dir / files.SUMMARY, summary)
        raise
    if len(rows) <= JSON_ROWS_LIMIT:
        summary = {**summary, "groups": rows}  # --json: the rows themselves
    return summary


def _write_pages(
    prep: GroupedPrepared, run_dir: Path, rows: list[dict], result: Any, plotlyjs: str
) -> None:
    """report.html (small multiples and histograms) and the two snapshot pages: the start and
    the fit, both as small multiples."""
    from fitcli.plots import group_histograms, group_small_multiples, groups_page
    from fitcli.rundir import files

    theta0, shared0 = _start(prep)
    curves_fit = _curves(prep, result.theta, result.shared, rows)
    curves_start = _curves(prep, theta0, shared0, rows)
    fig_fit = group_small_multiples(curves_fit, title=f"{prep.cfg.name}: fits by group")
    fig_start = group_small_multiples(curves_start, title=f"{prep.cfg.name}: start")
    hist = group_histograms(rows, prep.per_group)
    width = len(str(prep.cfg.epochs))
    last = int(max((r["iterations"] for r in rows), default=0))
    snaps = run_dir / files.SNAPSHOTS
    js = plotlyjs
    files.atomic_write(
        snaps / f"epoch-{0:0{width}d}.html", groups_page([fig_start], js, 1, prep.cfg.name)
    )
    files.atomic_write(
        snaps / f"epoch-{last:0{width}d}.html", groups_page([fig_fit], js, 1, prep.cfg.name)
    )
    files.atomic_write(run_dir / files.REPORT, groups_page([fig_fit, hist], js, 0, prep.cfg.name))


def _curves(prep: GroupedPrepared, theta: torch.Tensor, shared: torch.Tensor, rows: list[dict]):
    """At most 36 groups, spread over the loss distribution with the worst first: each one's
    label, status, data (x, y) and fitted curve (x grid, model)."""
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
            lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
            t = torch.linspace(0, 1, 200, dtype=x.dtype, device=x.device)
            grid = lo + (hi - lo) * t
        else:
            grid = x  # several variables: the fit at the data points
        m = _model(prep.model, prep.layout, grid, False)(theta[idx], shared).cpu().numpy()
    out = []
    for k, j in enumerate(order):
        n = int(data.counts[j])
        w = sub.w[k, :n].cpu().numpy()
        xs = sub.x[k, :n].cpu().numpy()
        ys = (sub.wy[k, :n].cpu().numpy() / np.where(w > 0, w, 1.0)) if n else np.zeros(0)
        gx = grid[k].cpu().numpy()
        out.append((rows[j]["group"], rows[j]["status"], xs, ys, gx, m[k]))
    return out
