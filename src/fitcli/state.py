"""Training state saved with every snapshot, as JSON that cannot run code, and resuming from it.

`state.json` holds what a run needs to continue bit for bit: the epoch, the model's internal
parameter vector, the stepper's `state_dict()` (optimizer, scheduler, mini-batch shuffle generator,
or a Levenberg-Marquardt stepper's own state), the per-epoch history so far and the config that
produced it. Run directories get shared, so loading must never run code: no pickle, no
`torch.load`. Tensors and the values JSON cannot hold are written as tagged objects:

    {"__tensor__": "float64", "shape": [3], "data": [0.1, "nan", ...]}   floats by repr (exact)
    {"__tensor__": "uint8", "shape": [5056], "hex": "..."}               bytes (generator state)
    {"__float__": "inf"} {"__tuple__": [...]} {"__dict__": [[key, value], ...]} (non-text keys)
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitcli.errors import ResumeError, RunDirError, RunFileError
from fitcli.rundir import files

STATE_FILE = "state.json"
FORMAT = "fitcli-state"
VERSION = 1
# What a resumed run may not change: the saved parameters and history belong to these.
FROZEN_KEYS = ("data", "model", "seed", "dtype")

_TAGS = ("__tensor__", "__float__", "__tuple__", "__dict__")
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
INT_LIMIT = 2**63  # every integer in a state is an int64
MAX_DIM = 2**31 - 1  # the largest tensor dimension a state may declare


# --------------------------------------------------------------------------------------------
# Encoding: tensors and Python values <-> plain JSON
# --------------------------------------------------------------------------------------------


def _float_out(v: float) -> float | str:
    return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def _float_in(v: Any, where: str = "") -> float:
    if isinstance(v, str):
        if v not in _NONFINITE:
            raise ValueError(_bad(where, f"{_short(v)} is not a number"))
        return _NONFINITE[v]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(_bad(where, f"{_short(v)} is not a number"))
    if type(v) is int and not -INT_LIMIT <= v < INT_LIMIT:
        raise ValueError(_bad(where, f"the integer {_short(v)} is out of range"))
    return float(v)


def _floats_in(values: list, where: str) -> list[float]:
    if all(type(v) is float for v in values):
        return values
    return [_float_in(v, f"{where}[{i}]") for i, v in enumerate(values)]


def _bad(where: str, what: str) -> str:
    """A problem with the field at path `where` (`history.losses[3]`), as one line."""
    return f"{where}: {what}" if where else what


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} characters)"


def _at(where: str, key: Any) -> str:
    if isinstance(key, str) and key.isidentifier():
        return f"{where}.{key}" if where else key
    return f"{where}[{_short(key)}]"


def encode(obj: Any) -> Any:
    """Plain JSON data for `obj`: tensors, floats (exact), tuples and dicts with any keys."""
    import torch

    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": _float_out(obj)}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        out: dict[str, Any] = {"__tensor__": dtype, "shape": list(t.shape)}
        if dtype == "uint8":
            out["hex"] = bytes(t.flatten().tolist()).hex()
        elif dtype in _FLOAT_DTYPES:
            # Every float32/16 value is a float64 exactly; repr round-trips a float64 exactly.
            out["data"] = [_float_out(v) for v in t.flatten().double().tolist()]
        elif dtype in _INT_DTYPES or dtype == "bool":
            out["data"] = t.flatten().tolist()
        else:
            raise TypeError(f"cannot save a tensor of type {dtype}")
        return out
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v) for v in obj]}
    if isinstance(obj, list):
        if all(type(v) is float for v in obj) and all(map(math.isfinite, obj)):
            return list(obj)  # the common case (history columns): already plain JSON, exactly
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: encode(v) for k, v in obj.items()}
        return {"__dict__": [[encode(k), encode(v)] for k, v in obj.items()]}
    raise TypeError(f"cannot save a value of type {type(obj).__name__}")


def decode(obj: Any, where: str = "") -> Any:
    """The inverse of `encode`; builds tensors from data only (allowlisted dtypes, int64
    integers, bounded shapes). A ValueError names the field at fault by its path, `where`."""
    import torch

    if isinstance(obj, list):
        if all(type(v) is float for v in obj):
            return list(obj)  # the common case (history columns), with no path to build
        return [decode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if type(obj) is int and not -INT_LIMIT <= obj < INT_LIMIT:
        raise ValueError(_bad(where, f"the integer {_short(obj)} is out of range"))
    if not isinstance(obj, dict):
        return obj
    if "__float__" in obj:
        return _float_in(obj["__float__"], where)
    if "__tuple__" in obj:
        return tuple(decode(_list(obj["__tuple__"], where), where))
    if "__dict__" in obj:
        out = {}
        for i, item in enumerate(_list(obj["__dict__"], where)):
            if not (isinstance(item, list) and len(item) == 2):
                raise ValueError(_bad(f"{where}[{i}]", "is not a [key, value] pair"))
            k = _key(decode(item[0], where))
            out[k] = decode(item[1], _at(where, k))
        return out
    if "__tensor__" in obj:
        return _tensor_in(obj, where, torch)
    return {k: decode(v, _at(where, k)) for k, v in obj.items()}


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise ValueError(_bad(where, f"{_short(v)} is not a list"))
    return v


def _tensor_in(obj: dict, where: str, torch: Any) -> Any:
    dtype, shape = obj["__tensor__"], obj.get("shape")
    if not (isinstance(shape, list) and all(type(n) is int and 0 <= n <= MAX_DIM for n in shape)):
        raise ValueError(_bad(f"{where}.shape", f"{_short(shape)} is not a list of sizes"))
    if dtype == "uint8":
        text = obj.get("hex")
        if not isinstance(text, str):
            raise ValueError(_bad(f"{where}.hex", "is not text"))
        values: list = list(bytes.fromhex(text))
    elif dtype in _FLOAT_DTYPES:
        data = _list(obj.get("data"), f"{where}.data")
        values = _floats_in(data, f"{where}.data")
    elif dtype in _INT_DTYPES or dtype == "bool":
        values = _list(obj.get("data"), f"{where}.data")
        kind = bool if dtype == "bool" else int
        if not all(
            type(v) is kind and (kind is bool or -INT_LIMIT <= v < INT_LIMIT) for v in values
        ):
            raise ValueError(_bad(where, f"a {dtype} tensor holds values of another type"))
    else:
        raise ValueError(_bad(where, f"tensor type {_short(dtype)} is not allowed"))
    if math.prod(shape) != len(values):
        raise ValueError(_bad(where, f"a tensor of shape {shape} holds {len(values)} values"))
    if dtype in _FLOAT_DTYPES:
        t = torch.tensor(values, dtype=torch.float64).to(getattr(torch, dtype))
    else:
        t = torch.tensor(values, dtype=getattr(torch, dtype))
    return t.reshape(shape)


def _key(k: Any) -> Any:
    if isinstance(k, list):  # a tuple key cannot come back as a list
        return tuple(k)
    return k


# --------------------------------------------------------------------------------------------
# state.json
# --------------------------------------------------------------------------------------------


@dataclass
class SavedState:
    """A run's training state after `epoch` epochs, as read back from state.json."""

    epoch: int
    raw: Any  # torch.Tensor: the model's internal parameter vector
    stepper: dict
    history: Any  # train.History with rows 0..epoch-1
    config: dict


def save_state(
    run_dir: Path, *, epoch: int, model: Any, stepper: Any, history: Any, config: dict
) -> None:
    """Write state.json atomically: the state after `epoch` epochs (history rows 0..epoch-1)."""
    rows = slice(0, epoch)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "epoch": epoch,
        "raw": encode(model.raw.detach()),
        "stepper": encode(stepper.state_dict()) if hasattr(stepper, "state_dict") else None,
        "history": {
            "losses": encode(history.losses[rows]),
            "lrs": encode(history.lrs[rows]),
            "elapsed": encode(history.elapsed[rows]),
            "params": encode(history.params[rows]),
        },
        "config": encode(config),
    }
    files.atomic_write(run_dir / STATE_FILE, json.dumps(doc, allow_nan=False) + "\n")


def load_state(run_dir: Path) -> SavedState:
    """Read state.json back and check every field of it; anything unexpected is a ResumeError
    naming the field, never code run and never a fault later in training. (The stepper's state
    is checked against the run's own stepper by `prepare_resume`.)"""
    import torch

    from fitcli.train import History

    path = run_dir / STATE_FILE
    if not os.path.lexists(path):
        raise ResumeError(
            f"{run_dir} has no saved state ({STATE_FILE}); it stopped before its first snapshot "
            "or was made by an older fitcli, so it cannot be resumed"
        )
    raw_doc = files.read_run_file(run_dir, STATE_FILE)
    try:
        doc = json.loads(raw_doc)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a fitcli state file")
        if doc.get("version") != VERSION:
            raise ValueError(f"state format version {doc.get('version')!r} is not {VERSION}")
        missing = [k for k in ("epoch", "raw", "stepper", "history", "config") if k not in doc]
        if missing:
            raise ValueError(f"{missing[0]}: missing")
        epoch = doc["epoch"]
        if type(epoch) is not int or not 0 <= epoch < INT_LIMIT:
            raise ValueError(_bad("epoch", f"{_short(epoch)} is not a number of epochs"))
        raw = decode(doc["raw"], "raw")
        if not (isinstance(raw, torch.Tensor) and raw.is_floating_point() and raw.dim() == 1):
            raise ValueError(_bad("raw", "is not a vector of parameters"))
        h = doc["history"]
        if not isinstance(h, dict):
            raise ValueError(_bad("history", "is not a mapping"))
        columns = {}
        for key in ("losses", "lrs", "elapsed", "params"):
            where = f"history.{key}"
            rows = decode(_list(h.get(key), where), where)
            if len(rows) != epoch:
                raise ValueError(_bad(where, f"does not hold {epoch} rows (it holds {len(rows)})"))
            if key != "params":
                columns[key] = _floats_in(rows, where)
                continue
            for i, row in enumerate(rows):
                if not isinstance(row, list) or len(row) != raw.numel():
                    width = len(row) if isinstance(row, list) else _short(row)
                    raise ValueError(
                        _bad(f"{where}[{i}]", f"holds {width} values, not {raw.numel()}")
                    )
            columns[key] = [_floats_in(row, f"{where}[{i}]") for i, row in enumerate(rows)]
        history = History(**columns)
        stepper = decode(doc["stepper"], "stepper") if doc["stepper"] is not None else {}
        if not isinstance(stepper, dict):
            raise ValueError(_bad("stepper", "is not a mapping"))
        config = decode(doc["config"], "config")
        if not isinstance(config, dict):
            raise ValueError(_bad("config", "is not a mapping"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        raise ResumeError(f"cannot read the saved state {path}: {exc}") from None
    return SavedState(epoch, raw, stepper, history, config)


# --------------------------------------------------------------------------------------------
# Resuming a run directory
# --------------------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    """Where a resumed run starts: the saved state, the run's previous summary and its overrides."""

    run_dir: Path
    saved: SavedState
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
        return {**summary, "started_at": prev.get("started_at"), "resumes": resumes}


def prepare_resume(run_dir: Path, overrides: list[str]) -> tuple[Any, ResumePoint]:
    """Validate a run directory for resuming and build its run with the saved state loaded.

    The run's own config.yaml plus `overrides` is the config; data, model, seed and dtype may not
    change. Optimizer and scheduler state are restored only when their config is unchanged and
    finite (a diverged run resumed with a new learning rate starts those afresh).
    """
    from fitcli.config import config_to_dict, load_config
    from fitcli.experiment import prepare

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a fitcli run directory"
        raise ResumeError(f"cannot resume {run_dir}: it {what}")
    try:
        summary = files.read_summary(run_dir)
    except RunFileError as exc:
        raise ResumeError(f"cannot resume {run_dir}: {exc}") from None
    status = summary.get("status") if isinstance(summary, dict) else None
    writer_note = _check_writer_gone(run_dir, summary) if status == "running" else None
    if status == "completed":
        raise ResumeError(
            f"{run_dir} has already completed ({summary.get('epochs_run')} epochs); "
            "nothing to resume. Start a new run, e.g. fitcli train "
            f"{run_dir / files.CONFIG} epochs=N"
        )
    saved = load_state(run_dir)
    files.read_run_file(run_dir, files.CONFIG)  # a regular file of the run (load_config reads it)
    cfg = load_config(run_dir / files.CONFIG, overrides)
    new = config_to_dict(cfg)
    changed = [k for k in FROZEN_KEYS if not _same(new, saved.config, k)]
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


def _check_data(run_dir: Path, prep: Any, summary: dict) -> None:
    """The data must be what the run trained on (a data file may have been edited since): the
    file's digest when the run recorded one, and every column the fit uses (x, y, sigma, and
    y_true for synthetic data) against the run's own data.csv."""
    import numpy as np

    ds = prep.dataset
    recorded = summary.get("data_digest")
    if recorded is not None and ds.digest is not None and recorded != ds.digest:
        raise ResumeError(
            f"cannot resume {run_dir}: the data file {ds.source} changed since the run started "
            f"(its digest is not the {recorded} recorded in {files.SUMMARY}); start a new run"
        )
    path = run_dir / files.DATA
    raw = files.read_run_file(run_dir, files.DATA, limit=files.csv_limit(prep.dataset.n, 4))
    try:
        head, _, body = raw.decode("ascii").partition("\n")
        header = head.strip().split(",")
        table = np.loadtxt(io.StringIO(body), delimiter=",", ndmin=2)
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot resume: {path} is unreadable: {exc}") from None
    columns = {"x": ds.x, "y": ds.y, "y_true": ds.y_true, "sigma": ds.sigma}
    used = {k: v for k, v in columns.items() if v is not None}
    same = (
        sorted(header) == sorted(used)
        and table.shape == (ds.n, len(header))
        and all(np.array_equal(table[:, j], used[name]) for j, name in enumerate(header))
    )
    if not same:
        raise ResumeError(
            f"cannot resume: the data differ from the run's {path} (was the data file edited?); "
            "start a new run"
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


def tidy_snapshots(run_dir: Path, epoch: int) -> None:
    """Remove snapshot pages and fitted curves past `epoch`, and temporary files.

    A run killed between a snapshot page and its state leaves pages past the saved epoch: they are
    written again, identically, when the resumed run reaches them. Nothing at or before the
    saved epoch is removed: it cannot be rebuilt.
    """
    snap_dir = run_dir / files.SNAPSHOTS
    for path in [*run_dir.glob(".*.tmp-*"), *snap_dir.glob(".*.tmp-*")]:
        with contextlib.suppress(OSError):
            path.unlink()
    for page in [*snap_dir.glob("epoch-*.html"), *snap_dir.glob("epoch-*.csv")]:
        number = page.stem.removeprefix("epoch-")
        if number.isdigit() and int(number) > epoch:
            try:
                page.unlink()
            except OSError as exc:
                raise RunDirError(f"cannot remove the stale snapshot {page}: {exc}") from None


__all__ = [
    "STATE_FILE",
    "ResumePoint",
    "SavedState",
    "decode",
    "encode",
    "load_state",
    "prepare_resume",
    "save_state",
    "snapshot_entries",
    "tidy_snapshots",
]
