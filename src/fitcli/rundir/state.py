"""state.json: the training state saved with every snapshot, as JSON that cannot run code.

`state.json` holds what a run needs to continue bit for bit: the epoch, the model's internal
parameter vector, the stepper's `state_dict()` (optimizer, scheduler, mini-batch shuffle generator,
or a Levenberg-Marquardt stepper's own state), the per-epoch history so far and the config that
produced it. Run directories get shared, so loading must never run code: no pickle, no
`torch.load`. Tensors and the values JSON cannot hold are written as tagged objects:

    {"__tensor__": "float64", "shape": [3], "data": [0.1, "nan", ...]}   floats by repr (exact)
    {"__tensor__": "uint8", "shape": [5056], "hex": "..."}               bytes (generator state)
    {"__float__": "inf"} {"__tuple__": [...]} {"__dict__": [[key, value], ...]} (non-text keys)

Resuming from it (`fitcli.resume.prepare_resume`) is the recipe's, not this codec's.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitcli.errors import ResumeError
from fitcli.rundir import files

STATE_FILE = "state.json"
FORMAT = "fitcli-state"
VERSION = 1

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
    import numpy as np
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
            # The non-finite ones are found by numpy: a grouped run's state holds 10^6 values.
            flat = t.flatten().double().numpy()
            data = flat.tolist()
            for i in np.flatnonzero(~np.isfinite(flat)).tolist():
                data[i] = _float_out(data[i])
            out["data"] = data
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


# What decoding a state document can raise on bad content: each becomes a ResumeError.
DECODE_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError)


def write_state_doc(run_dir: Path, doc: dict) -> None:
    """Write a state document as state.json, atomically."""
    files.atomic_write(run_dir / STATE_FILE, json.dumps(doc, allow_nan=False) + "\n")


def read_state_doc(
    run_dir: Path, *, fmt: str, version: int, keys: tuple[str, ...], absent: str, foreign: str
) -> tuple[Path, dict]:
    """state.json's path and document, checked for its `fmt`, `version` and `keys` (and a
    whole number of steps under "epoch"); a ResumeError when it is missing (`absent` says
    why, after "it"), foreign (`foreign`) or lacks a key. Its fields are the caller's."""
    path = run_dir / STATE_FILE
    if not os.path.lexists(path):
        raise ResumeError(f"{run_dir} has no saved state ({STATE_FILE}); it {absent}")
    raw = files.read_run_file(run_dir, STATE_FILE)
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != fmt:
            raise ValueError(foreign)
        if doc.get("version") != version:
            raise ValueError(f"state format version {doc.get('version')!r} is not {version}")
        missing = [k for k in keys if k not in doc]
        if missing:
            raise ValueError(f"{missing[0]}: missing")
    except DECODE_ERRORS as exc:
        raise ResumeError(f"cannot read the saved state {path}: {exc}") from None
    return path, doc


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
    write_state_doc(run_dir, doc)


def load_state(run_dir: Path) -> SavedState:
    """Read state.json back and check every field of it; anything unexpected is a ResumeError
    naming the field, never code run and never a fault later in training. (The stepper's state
    is checked against the run's own stepper by `resume.prepare_resume`.)"""
    import torch

    from fitcli.train import History

    path, doc = read_state_doc(
        run_dir,
        fmt=FORMAT,
        version=VERSION,
        keys=("epoch", "raw", "stepper", "history", "config"),
        absent="stopped before its first snapshot or was made by an older fitcli, so it cannot "
        "be resumed",
        foreign="not a fitcli state file",
    )
    try:
        epoch = doc["epoch"]
        if type(epoch) is not int or not 0 <= epoch < INT_LIMIT:
            raise ValueError(_bad("epoch", f"{_short(epoch)} is not a number of epochs"))
        raw = decode(doc["raw"], "raw")
        if not (isinstance(raw, torch.Tensor) and raw.is_floating_point() and raw.dim() == 1):
            raise ValueError(_bad("raw", "is not a vector of parameters"))
        h = doc["history"]
        if not isinstance(h, dict):
            raise ValueError(_bad("history", "is not a mapping"))
        columns: dict[str, Any] = {}  # the History's lists: floats, and rows of floats (params)
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
    except DECODE_ERRORS as exc:
        raise ResumeError(f"cannot read the saved state {path}: {exc}") from None
    return SavedState(epoch, raw, stepper, history, config)


__all__ = [
    "STATE_FILE",
    "SavedState",
    "decode",
    "encode",
    "load_state",
    "save_state",
]
