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

from fitcli import store
from fitcli.errors import ResumeError, RunDirError, RunFileError

STATE_FILE = "state.json"
FORMAT = "fitcli-state"
VERSION = 1
# What a resumed run may not change: the saved parameters and history belong to these.
FROZEN_KEYS = ("data", "model", "seed", "dtype")

_TAGS = ("__tensor__", "__float__", "__tuple__", "__dict__")
_FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# --------------------------------------------------------------------------------------------
# Encoding: tensors and Python values <-> plain JSON
# --------------------------------------------------------------------------------------------


def _float_out(v: float) -> float | str:
    return v if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))


def _float_in(v: Any) -> float:
    if isinstance(v, str):
        if v not in _NONFINITE:
            raise ValueError(f"{v!r} is not a number")
        return _NONFINITE[v]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{v!r} is not a number")
    return float(v)


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


def decode(obj: Any) -> Any:
    """The inverse of `encode`; builds tensors from data only (allowlisted dtypes)."""
    import torch

    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__float__" in obj:
        return _float_in(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(decode(v) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_key(decode(k)): decode(v) for k, v in obj["__dict__"]}
    if "__tensor__" in obj:
        dtype, shape = obj["__tensor__"], obj.get("shape")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError(f"bad tensor shape {shape!r}")
        if dtype == "uint8":
            values: list = list(bytes.fromhex(obj["hex"]))
        elif dtype in _FLOAT_DTYPES:
            values = [_float_in(v) for v in obj["data"]]
        elif dtype in _INT_DTYPES or dtype == "bool":
            values = obj["data"]
            kind = bool if dtype == "bool" else int
            if not all(type(v) is kind for v in values):
                raise ValueError(f"a {dtype} tensor holds values of another type")
        else:
            raise ValueError(f"tensor type {dtype!r} is not allowed")
        if math.prod(shape) != len(values):
            raise ValueError(f"tensor of shape {shape} holds {len(values)} values")
        if dtype in _FLOAT_DTYPES:
            t = torch.tensor(values, dtype=torch.float64).to(getattr(torch, dtype))
        else:
            t = torch.tensor(values, dtype=getattr(torch, dtype))
        return t.reshape(shape)
    return {k: decode(v) for k, v in obj.items()}


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
    store.atomic_write(run_dir / STATE_FILE, json.dumps(doc, allow_nan=False) + "\n")


def load_state(run_dir: Path) -> SavedState:
    """Read state.json back; anything unexpected in it is a ResumeError, never code run."""
    from fitcli.train import History

    path = run_dir / STATE_FILE
    if not os.path.lexists(path):
        raise ResumeError(
            f"{run_dir} has no saved state ({STATE_FILE}); it stopped before its first snapshot "
            "or was made by an older fitcli, so it cannot be resumed"
        )
    raw_doc = store.read_run_file(run_dir, STATE_FILE)
    try:
        doc = json.loads(raw_doc)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a fitcli state file")
        if doc.get("version") != VERSION:
            raise ValueError(f"state format version {doc.get('version')!r} is not {VERSION}")
        epoch = doc["epoch"]
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"bad epoch {epoch!r}")
        h = doc["history"]
        history = History(
            losses=[_float_in(v) for v in decode(h["losses"])],
            lrs=[_float_in(v) for v in decode(h["lrs"])],
            elapsed=[_float_in(v) for v in decode(h["elapsed"])],
            params=[[_float_in(v) for v in row] for row in decode(h["params"])],
        )
        if {len(history.losses), len(history.lrs), len(history.elapsed)} != {epoch} or len(
            history.params
        ) != epoch:
            raise ValueError(f"the history does not hold {epoch} rows")
        raw = decode(doc["raw"])
        stepper = decode(doc["stepper"]) if doc["stepper"] is not None else {}
        config = decode(doc["config"])
        if not isinstance(config, dict) or not isinstance(stepper, dict):
            raise ValueError("bad config or stepper section")
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
        summary = store.read_summary(run_dir)
    except RunFileError as exc:
        raise ResumeError(f"cannot resume {run_dir}: {exc}") from None
    status = summary.get("status") if isinstance(summary, dict) else None
    if status == "completed":
        raise ResumeError(
            f"{run_dir} has already completed ({summary.get('epochs_run')} epochs); "
            "nothing to resume. Start a new run, e.g. fitcli train "
            f"{run_dir / store.CONFIG} epochs=N"
        )
    saved = load_state(run_dir)
    store.read_run_file(run_dir, store.CONFIG)  # a regular file of the run (load_config reads it)
    if os.path.lexists(run_dir / store.SNAPSHOT_PARAMS):  # read again before anything is written
        store.read_run_file(run_dir, store.SNAPSHOT_PARAMS)
    cfg = load_config(run_dir / store.CONFIG, overrides)
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
    _check_data(run_dir, prep)
    notes = _restore(prep, saved, same_optimizer=_same_optimizer(new, saved.config))
    return prep, ResumePoint(run_dir, saved, summary, list(overrides), notes)


def _same(new: dict, old: dict, key: str) -> bool:
    return json.dumps(new.get(key), sort_keys=True, default=str) == json.dumps(
        old.get(key), sort_keys=True, default=str
    )


def _same_optimizer(new: dict, old: dict) -> bool:
    return _same(new, old, "optimizer") and _same(new, old, "scheduler")


def _check_data(run_dir: Path, prep: Any) -> None:
    """The data must be what the run trained on (a data file may have been edited since)."""
    import numpy as np

    path = run_dir / store.DATA
    raw = store.read_run_file(run_dir, store.DATA, limit=store.csv_limit(prep.dataset.n, 4))
    try:
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", skiprows=1, ndmin=2)
    except (OSError, ValueError) as exc:
        raise ResumeError(f"cannot resume: {path} is unreadable: {exc}") from None
    ds = prep.dataset
    if table.shape[0] != ds.n or not (
        np.array_equal(table[:, 0], ds.x) and np.array_equal(table[:, 1], ds.y)
    ):
        raise ResumeError(
            f"cannot resume: the data differ from the run's {path} (was the data file edited?); "
            "start a new run"
        )


def _restore(prep: Any, saved: SavedState, *, same_optimizer: bool) -> list[str]:
    """Load the saved parameters and stepper state into a freshly prepared run."""
    import torch

    raw = prep.model.raw
    if not isinstance(saved.raw, torch.Tensor) or tuple(saved.raw.shape) != tuple(raw.shape):
        raise ResumeError("the saved parameters do not match the model")
    notes: list[str] = []
    with torch.no_grad():
        raw.copy_(saved.raw.to(dtype=raw.dtype, device=raw.device))
    state = dict(saved.stepper)
    if not same_optimizer:
        notes.append("the optimizer or scheduler changed: their state starts afresh")
        state = {k: v for k, v in state.items() if k == "generator"}
    elif not _all_finite(state):
        notes.append("the saved optimizer state is not finite: it starts afresh")
        state = {k: v for k, v in state.items() if k == "generator"}
    if state and hasattr(prep.stepper, "load_state_dict"):
        try:
            prep.stepper.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise ResumeError(f"the saved optimizer state does not fit this run: {exc}") from None
    return notes


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


def tidy_snapshots(run_dir: Path, epoch: int) -> list[dict]:
    """Snapshot entries up to `epoch` from params.json; stale pages and temporary files removed.

    A run killed between a snapshot page and its state leaves pages past the saved epoch: they are
    written again, identically, when the resumed run reaches them.
    """
    try:
        doc = store.read_run_json(run_dir, store.SNAPSHOT_PARAMS)
        entries = [s for s in doc["snapshots"] if s["epoch"] <= epoch]
    except (RunFileError, KeyError, TypeError):
        entries = []
    keep = {s.get(k) for s in entries for k in ("file", "fit")}
    snap_dir = run_dir / store.SNAPSHOTS
    for path in [*run_dir.glob(".*.tmp-*"), *snap_dir.glob(".*.tmp-*")]:
        with contextlib.suppress(OSError):
            path.unlink()
    for page in [*snap_dir.glob("epoch-*.html"), *snap_dir.glob("epoch-*.csv")]:
        if page.name not in keep:
            try:
                page.unlink()
            except OSError as exc:
                raise RunDirError(f"cannot remove the stale snapshot {page}: {exc}") from None
    return entries


__all__ = [
    "STATE_FILE",
    "ResumePoint",
    "SavedState",
    "decode",
    "encode",
    "load_state",
    "prepare_resume",
    "save_state",
    "tidy_snapshots",
]
