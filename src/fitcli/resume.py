"""How a run begins (`start`: a new run directory, or resuming one), and resuming a run directory:
check it can be resumed, and build its run with the state loaded.

`start` lives here, not in `experiment`, because `experiment` imports torch: a bad config or a run
directory that cannot be resumed is refused before torch is imported, as the command promises.

Above `prepare` and the state codec (`state`): the run's summary says it may be resumed (not
completed, its writer gone), its config.yaml plus the overrides changes no frozen key, its data
are the ones it trained on, and the saved stepper state is shaped like the run's own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitcli.errors import ResumeError, RunFileError, RunStatus
from fitcli.rundir import files
from fitcli.rundir.state import STATE_FILE, SavedState, _at, _bad, _short, load_state

# What a resumed run may not change: the saved parameters and history belong to these.
FROZEN_KEYS = ("data", "model", "seed", "dtype", "starts")
# Frozen keys that runs saved before they existed had at these values.
_FROZEN_DEFAULTS = {"starts": 1}


@dataclass
class Start:
    """A run ready for `experiment.execute`: prepared, its run directory, where it resumes."""

    prep: Any  # prepare.Prepared
    run_dir: Path
    point: ResumePoint | None  # None: a new run

    @property
    def notes(self) -> list[str]:
        """What resuming changed or could not check, for the user."""
        return [] if self.point is None else self.point.notes

    def execute(
        self,
        *,
        plotlyjs: str,
        command: list[str],
        stop: Any,
        progress: Any = None,
        copy_data: bool = False,
    ) -> dict:
        """Train it (`experiment.execute`) until done or `stop` is requested; `progress(epoch,
        loss)` sees every epoch; `copy_data` copies a large data file (`--copy-data`). Returns
        the run's summary."""
        from fitcli.experiment import execute

        def on_epoch(epoch: int, loss: float) -> bool:
            if progress is not None:
                progress(epoch, loss)
            return stop.requested

        return execute(
            self.prep,
            self.run_dir,
            plotlyjs=plotlyjs,
            command=command,
            on_epoch=on_epoch,
            resume=self.point,
            stopped_by=lambda: stop.signal,
            copy_data=copy_data,
        )


def start(
    config: Path | None,
    overrides: list[str],
    *,
    resume: Path | None,
    out: Path,
    run_dir: Path | None,
    overwrite: bool,
    stop: Any,
) -> Start:
    """Prepare a new run and make its run directory, or prepare resuming the run directory
    `resume` (then every argument, `config` included, is an override). `stop` (the command's
    stop flag) ends the command before anything is written when a signal came meanwhile."""
    from fitcli.config import load_config
    from fitcli.errors import InputError

    if resume is not None:
        if run_dir is not None or overwrite:
            raise InputError("--resume continues RUN_DIR in place; drop --run-dir/--overwrite")
        # With --resume every argument is an override (the run has its own config).
        given = ([str(config)] if config is not None else []) + overrides
        prep, point = prepare_resume(resume, given)
        if stop.requested:
            raise stop.interrupt()
        return Start(prep, resume, point)
    if config is None:
        raise InputError("missing the config file: fitcli train CONFIG [key=value ...]")
    cfg = load_config(config, overrides)  # before torch: bad input fails fast
    from fitcli.experiment import make_run_dir  # lazy: imports torch
    from fitcli.prepare import prepare

    prep = prepare(cfg)
    if cfg.starts > 1:  # before the run directory exists: a stop meanwhile leaves nothing
        from fitcli.starts import search

        search(prep, stop=lambda: stop.interrupt() if stop.requested else None)
    if stop.requested:
        raise stop.interrupt()
    return Start(prep, make_run_dir(cfg, out, run_dir, overwrite), None)


@dataclass
class ResumePoint:
    """Where a resumed run starts: the saved state, the run's previous summary and its overrides."""

    run_dir: Path
    saved: Any  # SavedState; a grouped run's: rundir.group_state.GroupState
    summary: dict
    overrides: list[str]
    notes: list[str]
    snapshots: list[dict]  # params.json's entries up to the saved epoch

    @property
    def epoch(self) -> int:
        return self.saved.epoch

    @property
    def history(self) -> Any:
        return self.saved.history

    def continued_summary(self, summary: dict) -> dict:
        """A fresh run summary that keeps the run's start and lists every resume."""
        import time

        prev = self.summary
        resumes = list(prev.get("resumes") or [])
        resumes.append(
            {
                "from_epoch": self.epoch,
                "status_before": prev.get("status"),
                "overrides": self.overrides,
                "notes": self.notes,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        # The start was chosen once, by the search the run began with: it is not searched again.
        starts = {"starts": prev["starts"]} if isinstance(prev.get("starts"), dict) else {}
        return {**summary, **starts, "started_at": prev.get("started_at"), "resumes": resumes}


def prepare_resume(run_dir: Path, overrides: list[str]) -> tuple[Any, ResumePoint]:
    """Validate a run directory for resuming and build its run with the saved state loaded.

    The run's own config.yaml plus `overrides` is the config; data, model, seed and dtype may not
    change. Optimizer and scheduler state are restored only when their config is unchanged and
    finite (a diverged run resumed with a new learning rate starts those afresh).
    """
    from fitcli.config import config_to_dict, load_config
    from fitcli.prepare import prepare  # lazy: torch, once the run directory has passed

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a fitcli run directory"
        raise ResumeError(f"cannot resume {run_dir}: it {what}")
    try:
        summary = files.read_summary(run_dir)
    except RunFileError as exc:
        raise ResumeError(f"cannot resume {run_dir}: {exc}") from None
    status = summary.get("status") if isinstance(summary, dict) else None
    writer_note = _check_writer_gone(run_dir, summary) if status == RunStatus.RUNNING else None
    grouped = isinstance(summary, dict) and "groups" in summary  # a grouped run's summary
    if status == RunStatus.COMPLETED or (
        grouped and status == RunStatus.FAILED and "groups_failed" in summary
    ):  # a grouped run whose fit ended with failed groups has ended as well
        raise ResumeError(
            f"{run_dir} has already completed ({summary.get('epochs_run')} epochs); "
            "nothing to resume. Start a new run, e.g. fitcli train "
            f"{run_dir / files.CONFIG} epochs=N"
        )
    if grouped:
        from fitcli.rundir.group_state import load_group_state

        saved: Any = load_group_state(run_dir)
    else:
        saved = load_state(run_dir)
    files.read_run_file(run_dir, files.CONFIG)  # a regular file of the run (load_config reads it)
    cfg = load_config(run_dir / files.CONFIG, overrides)
    new = config_to_dict(cfg)
    old = {**_FROZEN_DEFAULTS, **saved.config}
    changed = [k for k in FROZEN_KEYS if not _same(new, old, k)]
    if changed:
        raise ResumeError(
            f"cannot resume {run_dir} with a different {', '.join(changed)}: the saved "
            "parameters belong to the run's own; start a new run instead"
        )
    if saved.epoch > cfg.epochs:
        raise ResumeError(
            f"{run_dir} is saved at epoch {saved.epoch}, beyond epochs={cfg.epochs}; "
            f"give epochs={saved.epoch} or more"
        )
    if grouped:
        _check_group_files(run_dir, saved)
        prep = prepare(cfg)
        notes = _restore_grouped(run_dir, prep, summary, saved, _same_optimizer(new, saved.config))
        if writer_note is not None:
            notes.insert(0, writer_note)
        return prep, ResumePoint(run_dir, saved, summary, list(overrides), notes, [])
    prep = prepare(cfg)
    _check_data(run_dir, prep, summary)
    snapshots = snapshot_entries(run_dir, saved.epoch)
    try:
        notes = _restore(prep, saved, same_optimizer=_same_optimizer(new, saved.config))
    except ValueError as exc:
        raise ResumeError(f"cannot read the saved state {run_dir / STATE_FILE}: {exc}") from None
    if writer_note is not None:
        notes.insert(0, writer_note)
    return prep, ResumePoint(run_dir, saved, summary, list(overrides), notes, snapshots)


def _check_writer_gone(run_dir: Path, summary: dict) -> str | None:
    """A running run is resumed only once the process that writes it is gone (stale): two
    processes writing one directory would interleave their snapshots and states. One written
    on another host cannot be checked from here: resumed, with a note saying so (as is one
    from before fitcli recorded its writer, without a note)."""
    from fitcli import liveness

    record = summary.get("process")
    state = liveness.liveness(record)
    if state == liveness.UNKNOWN and isinstance(record, dict):
        return (
            f"{files.SUMMARY} says {liveness.describe(record)} is writing this run, which "
            "cannot be checked from here; make sure it has stopped"
        )
    if state == liveness.ALIVE:
        raise ResumeError(
            f"cannot resume {run_dir}: it is still running ({liveness.describe(record)}); "
            "stop that process first (SIGTERM or Ctrl-C stops it after the current epoch), "
            "then resume"
        )
    return None


def _same(new: dict, old: dict, key: str) -> bool:
    return json.dumps(new.get(key), sort_keys=True, default=str) == json.dumps(
        old.get(key), sort_keys=True, default=str
    )


def _same_optimizer(new: dict, old: dict) -> bool:
    return _same(new, old, "optimizer") and _same(new, old, "scheduler")


def _check_group_files(run_dir: Path, saved: Any) -> None:
    """The files of `data.files` must be those the grouped run fitted, unchanged: the list or
    glob matching the same paths, each with its recorded digest. Names the file at fault."""
    if saved.data_files is None:
        return
    from fitcli.data import file_digest
    from fitcli.errors import DataError
    from fitcli.groups_data import expand_files

    spec = saved.config.get("data", {}).get("files")
    try:
        now = [str(p) for p in expand_files(spec)]
    except DataError as exc:
        raise ResumeError(f"cannot resume {run_dir}: {exc}") from None
    before = dict(saved.data_files)
    new = [p for p in now if p not in before]
    gone = [p for p in before if p not in now]
    if new or gone:
        what = "; ".join([*(f"{p} is new" for p in new[:3]), *(f"{p} is gone" for p in gone[:3])])
        raise ResumeError(
            f"cannot resume {run_dir}: data.files {spec!r} no longer gives the files the run "
            f"fitted ({what}); start a new run"
        )
    for path in now:
        try:
            digest = file_digest(Path(path))
        except OSError as exc:
            raise ResumeError(f"cannot resume {run_dir}: cannot read {path}: {exc}") from None
        if digest != before[path]:
            raise ResumeError(
                f"cannot resume {run_dir}: the data file {path} changed since the run started "
                f"(its digest is not the {before[path]} recorded in {STATE_FILE}); start a "
                "new run"
            )


def _check_digest(run_dir: Path, prep: Any, summary: dict) -> str | None:
    """Refuse a data file whose digest is not the one the run recorded; the recorded digest
    (None: the run recorded none)."""
    ds = prep.dataset
    recorded = summary.get("data_digest")
    if recorded is not None and ds.digest is not None and recorded != ds.digest:
        raise ResumeError(
            f"cannot resume {run_dir}: the data file {ds.source} changed since the run started "
            f"(its digest is not the {recorded} recorded in {files.SUMMARY}); start a new run"
        )
    return recorded


def _restore_grouped(
    run_dir: Path, prep: Any, summary: dict, saved: Any, same_optimizer: bool
) -> list[str]:
    """Check a grouped run's saved state against its freshly prepared run (the data's digest,
    how the groups are fitted, the shapes of the values); the notes for the user. A gradient
    optimizer's state is kept only when its config is unchanged and finite."""
    from fitcli.grouped_run import kind_of

    _check_digest(run_dir, prep, summary)
    kind = kind_of(prep)
    if saved.kind != kind:
        raise ResumeError(
            f"cannot resume {run_dir}: its state is of a {saved.kind} fit and this config makes "
            f"a {kind} one (optimizer changed); resume with the run's optimizer or start a new run"
        )
    want = (prep.packed.groups, len(prep.per_group))
    if tuple(saved.theta.shape) != want or saved.shared.numel() != len(prep.shared):
        raise ResumeError(
            f"cannot resume {run_dir}: the saved state holds {tuple(saved.theta.shape)} "
            f"per-group and {saved.shared.numel()} shared values, the run {want} and "
            f"{len(prep.shared)}; start a new run"
        )
    saved.theta = saved.theta.to(dtype=prep.dtype, device=prep.device)
    saved.shared = saved.shared.to(dtype=prep.dtype, device=prep.device)
    notes: list[str] = []
    if saved.optimizer is not None:
        if not same_optimizer:
            notes.append("the optimizer or scheduler changed: their state starts afresh")
        elif not _all_finite(saved.optimizer):
            notes.append("the saved optimizer state is not finite: it starts afresh")
        if notes:
            saved.optimizer = None
    if saved.optimizer is not None:
        import torch

        from fitcli import optim

        params: list[torch.Tensor] = [
            torch.nn.Parameter(saved.theta.clone()),
            torch.nn.Parameter(saved.shared.clone()),
        ]
        opt = optim.build_optimizer(prep.cfg.optimizer, params)
        sched = optim.build_scheduler(prep.cfg.scheduler, opt)
        try:
            opt.load_state_dict(saved.optimizer.get("optimizer"))
            if sched is not None and saved.optimizer.get("scheduler") is not None:
                sched.load_state_dict(saved.optimizer["scheduler"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as exc:
            raise ResumeError(f"the saved optimizer state does not fit this run: {exc}") from None
    return notes


def _check_data(run_dir: Path, prep: Any, summary: dict) -> None:
    """The data must be what the run trained on (a data file may have been edited since): the
    file's digest when the run recorded one, and every column the fit uses (x, y, sigma, and
    y_true for synthetic data) against the run's own data.csv or data.npz; a large data file
    the run did not copy is its data, and its digest is what is compared."""
    import numpy as np

    ds = prep.dataset
    recorded = _check_digest(run_dir, prep, summary)
    if summary.get("data_file") is not None and recorded is not None:
        return  # the data file is the run's data (not copied), and its digest is the same
    from fitcli.rundir.reader import read_data

    try:
        table = read_data(run_dir, summary, prep.cfg)
    except RunFileError as exc:
        raise ResumeError(f"cannot resume {run_dir}: {exc}") from None
    columns = {"x": ds.x, "y": ds.y, "y_true": ds.y_true, "sigma": ds.sigma}
    used = {k: v for k, v in columns.items() if v is not None}
    same = sorted(table) == sorted(used) and all(
        np.array_equal(table[name], used[name]) for name in used
    )
    if not same:
        stored = "data.npz" if (run_dir / files.DATA_NPZ).exists() else files.DATA
        raise ResumeError(
            f"cannot resume: the data differ from the run's {run_dir / stored} (was the data "
            "file edited?); start a new run"
        )


def _restore(prep: Any, saved: SavedState, *, same_optimizer: bool) -> list[str]:
    """Load the saved parameters and stepper state into a freshly prepared run; a stepper state
    that is not shaped like this run's own (`_conform`) is a ValueError naming the field."""
    import torch

    raw = prep.model.raw
    if not isinstance(saved.raw, torch.Tensor) or tuple(saved.raw.shape) != tuple(raw.shape):
        raise ResumeError("the saved parameters do not match the model")
    notes: list[str] = []
    state = dict(saved.stepper)
    fresh = prep.stepper.state_dict() if hasattr(prep.stepper, "state_dict") else {}
    if not same_optimizer:
        notes.append("the optimizer or scheduler changed: their state starts afresh")
    elif not _all_finite(state):
        notes.append("the saved optimizer state is not finite: it starts afresh")
    if notes:
        state = {k: v for k, v in state.items() if k == "generator"}
        fresh = {k: v for k, v in fresh.items() if k in state}
    if state:
        _conform(state, fresh, "stepper", tuple(raw.shape))
    with torch.no_grad():
        raw.copy_(saved.raw.to(dtype=raw.dtype, device=raw.device))
    if state and hasattr(prep.stepper, "load_state_dict"):
        try:
            prep.stepper.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise ResumeError(f"the saved optimizer state does not fit this run: {exc}") from None
    return notes


def _conform(saved: Any, fresh: Any, where: str, shape: tuple) -> None:
    """`saved` is shaped like `fresh`, the state_dict of this run's freshly built stepper: the
    same keys, and values of the same kind (numbers, flags, text, tensors of the same type and
    size). A value None when fresh may since hold any value or list of values (an LM stop
    reason, its scales). The optimizer's per-parameter state, empty when fresh, is checked by
    `_param_state`."""
    import torch

    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            raise ValueError(_bad(where, f"{_short(saved)} is not a mapping"))
        missing = [str(k) for k in fresh if k not in saved]
        unknown = [str(k) for k in saved if k not in fresh]
        if missing or unknown:
            what = "missing " + ", ".join(missing) if missing else "unknown " + ", ".join(unknown)
            raise ValueError(_bad(where, what if len(what) <= 80 else what[:77] + "..."))
        for k, v in fresh.items():
            if k == "state" and where.endswith("optimizer") and isinstance(v, dict):
                _param_state(saved[k], fresh, _at(where, k), shape)
            else:
                _conform(saved[k], v, _at(where, k), shape)
    elif isinstance(fresh, list | tuple):
        if not isinstance(saved, list | tuple):
            raise ValueError(_bad(where, f"{_short(saved)} is not a list"))
        for i, v in enumerate(saved):
            if fresh:
                _conform(v, fresh[min(i, len(fresh) - 1)], f"{where}[{i}]", shape)
            elif not _is_leaf(v):
                raise ValueError(_bad(f"{where}[{i}]", f"{_short(v)} is not a single value"))
    elif isinstance(fresh, torch.Tensor):
        if not (
            isinstance(saved, torch.Tensor)
            and saved.dtype == fresh.dtype
            and saved.shape == fresh.shape
        ):
            got = _describe(saved)
            raise ValueError(_bad(where, f"{got}, expected {_describe(fresh)}"))
    elif fresh is None:
        if not _is_plain(saved):
            raise ValueError(_bad(where, f"{_short(saved)} is not a value or list of values"))
    elif type(saved) is not type(fresh) and not (_is_number(saved) and _is_number(fresh)):
        raise ValueError(_bad(where, f"{_short(saved)} is not {_kind(fresh)}"))


def _param_state(saved: Any, fresh: dict, where: str, shape: tuple) -> None:
    """torch.optim's per-parameter state: for each parameter index of the groups, a mapping of
    names to numbers, flags or float tensors of the parameter's size (or scalars), or lists of
    them (LBFGS's history)."""
    import torch

    if not isinstance(saved, dict):
        raise ValueError(_bad(where, f"{_short(saved)} is not a mapping"))
    indices = {i for g in fresh.get("param_groups", []) for i in g.get("params", [])}
    for index, entry in saved.items():
        at = _at(where, index)
        if index not in indices:
            raise ValueError(_bad(at, "is not a parameter of the optimizer"))
        if not isinstance(entry, dict):
            raise ValueError(_bad(at, f"{_short(entry)} is not a mapping"))
        for name, value in entry.items():
            for i, v in enumerate(value if isinstance(value, list | tuple) else [value]):
                here = _at(at, name) if not isinstance(value, list | tuple) else f"{at}.{name}[{i}]"
                if isinstance(v, torch.Tensor):
                    if not v.is_floating_point() or tuple(v.shape) not in ((), shape):
                        raise ValueError(
                            _bad(here, f"{_describe(v)}, expected a float scalar or {list(shape)}")
                        )
                elif v is not None and not _is_number(v) and type(v) is not bool:
                    raise ValueError(_bad(here, f"{_short(v)} is not a number"))


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


def _is_leaf(v: Any) -> bool:
    return v is None or type(v) in (int, float, bool, str)


def _is_plain(v: Any) -> bool:
    return _is_leaf(v) or (isinstance(v, list | tuple) and all(map(_is_plain, v)))


def _kind(v: Any) -> str:
    return {bool: "true or false", str: "text"}.get(type(v), "a number")


def _describe(v: Any) -> str:
    import torch

    if isinstance(v, torch.Tensor):
        return f"a {str(v.dtype).removeprefix('torch.')} tensor of shape {list(v.shape)}"
    return _short(v)


def _all_finite(obj: Any) -> bool:
    import torch

    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return math.isfinite(obj) or math.isinf(obj)  # inf is a legitimate bound (plateau)
    if isinstance(obj, dict):
        return all(_all_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(_all_finite(v) for v in obj)
    return True


def snapshot_entries(run_dir: Path, epoch: int) -> list[dict]:
    """params.json's snapshot entries up to `epoch`. The pages and fitted curves it lists are
    the only copies of the snapshots, so a missing, truncated or garbled list is a ResumeError
    (nothing is deleted), never an empty list."""
    path = run_dir / files.SNAPSHOT_PARAMS
    try:
        doc = files.read_run_json(run_dir, files.SNAPSHOT_PARAMS)
        if not isinstance(doc, dict) or not isinstance(doc.get("snapshots"), list):
            raise ValueError("it holds no list of snapshots")
        for i, s in enumerate(doc["snapshots"]):
            if not (
                isinstance(s, dict)
                and type(s.get("epoch")) is int
                and isinstance(s.get("file"), str)
                and isinstance(s.get("fit"), str)
            ):
                raise ValueError(f"snapshots[{i}] is not an entry with epoch, file and fit")
    except (RunFileError, ValueError) as exc:
        raise ResumeError(
            f"cannot resume {run_dir}: {path} is unreadable ({exc}); it lists the snapshot "
            "pages, which are the only copies, so nothing was changed. Restore the file or "
            "start a new run"
        ) from None
    return [s for s in doc["snapshots"] if s["epoch"] <= epoch]


__all__ = ["FROZEN_KEYS", "ResumePoint", "Start", "prepare_resume", "snapshot_entries", "start"]
