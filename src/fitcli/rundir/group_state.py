"""state.json of a grouped run: where its fit stands, saved at each checkpoint, as JSON that
cannot run code (the tagged values of `fitcli.rundir.state`).

A grouped run (`fitcli.grouped_run`) saves, per group, its internal per-group values, its LM
damping (and for independent fits the rest of its LM state: nu, the scaling, the polishing),
its iterations and whether its fit has ended (with its status and reason), the shared
values, and for a gradient optimizer the optimizer's and scheduler's state; with the config
that produced it and, for `data.files`, each file's path and digest (resume names the file
that changed). Resuming from it is `fitcli.resume`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitcli.errors import GroupStatus, ResumeError
from fitcli.rundir.state import (
    DECODE_ERRORS,
    INT_LIMIT,
    _bad,
    _short,
    decode,
    encode,
    read_state_doc,
    write_state_doc,
)

FORMAT = "fitcli-group-state"
VERSION = 1
# How the groups are fitted: every group its own LM, one LM over all (shared parameters), or
# a gradient optimizer on the summed loss.
KINDS = ("independent", "global", "gradient")


@dataclass
class GroupState:
    """A grouped fit after `epoch` iterations (the most any group ran): per group [G] its
    internal values theta [G, q], damping, iterations, whether it is done, status and reason;
    the shared values [s]; a gradient optimizer's `optimizer` state (state_dict)."""

    kind: str
    epoch: int
    theta: Any  # torch.Tensor [G, q]
    shared: Any  # torch.Tensor [s]
    damping: Any  # np.ndarray [G] float64
    iterations: Any  # np.ndarray [G] int64
    done: Any  # np.ndarray [G] bool
    status: list[str]
    reason: list[str]
    optimizer: dict | None = None
    config: dict = field(default_factory=dict)
    data_files: list[list[str]] | None = None  # [[path, digest], ...] of data.files
    # An independent LM fit's other per-group state (`fitcli.lm_batch.Carry`): nu [G], scale2
    # [G, q] and polish [G] float64; None: every group's start (a state saved before these).
    nu: Any = None
    scale2: Any = None
    polish: Any = None
    # Each independent group's sum(r**2) at its values as its fit computed it [G] float64 (NaN:
    # not fitted yet); None in a state saved before it (computed again at the end).
    rss: Any = None


def save_group_state(run_dir: Path, state: GroupState) -> None:
    """Write state.json atomically (one write per checkpoint)."""
    import torch

    doc = {
        "format": FORMAT,
        "version": VERSION,
        "kind": state.kind,
        "epoch": int(state.epoch),
        "theta": encode(state.theta.detach()),
        "shared": encode(state.shared.detach()),
        "damping": encode(torch.as_tensor(state.damping, dtype=torch.float64)),
        "iterations": encode(torch.as_tensor(state.iterations, dtype=torch.int64)),
        "done": encode(torch.as_tensor(state.done, dtype=torch.bool)),
        "status": list(state.status),
        "reason": list(state.reason),
        "optimizer": None if state.optimizer is None else encode(state.optimizer),
        "config": encode(state.config),
        "data_files": state.data_files,
    }
    for key in ("nu", "scale2", "polish", "rss"):
        value = getattr(state, key)
        if value is not None:
            doc[key] = encode(torch.as_tensor(value, dtype=torch.float64))
    write_state_doc(run_dir, doc)


def load_group_state(run_dir: Path) -> GroupState:
    """Read a grouped run's state.json back and check every field of it (shapes, types and
    statuses); anything unexpected is a ResumeError naming the field."""
    import numpy as np
    import torch

    keys = ("kind", "epoch", "theta", "shared", "damping", "iterations", "done", "status")
    path, doc = read_state_doc(
        run_dir,
        fmt=FORMAT,
        version=VERSION,
        keys=(*keys, "reason", "optimizer", "config"),
        absent="stopped before its fit began, so it cannot be resumed",
        foreign="not the state of a grouped fitcli run",
    )
    try:
        if doc["kind"] not in KINDS:
            raise ValueError(_bad("kind", f"{_short(doc['kind'])} is not one of {KINDS}"))
        epoch = doc["epoch"]
        if type(epoch) is not int or not 0 <= epoch < INT_LIMIT:
            raise ValueError(_bad("epoch", f"{_short(epoch)} is not a number of iterations"))
        theta = decode(doc["theta"], "theta")
        if not (isinstance(theta, torch.Tensor) and theta.is_floating_point() and theta.dim() == 2):
            raise ValueError(_bad("theta", "is not a [groups, parameters] table of values"))
        g = theta.shape[0]
        shared = decode(doc["shared"], "shared")
        if not (isinstance(shared, torch.Tensor) and shared.dtype == theta.dtype):
            raise ValueError(_bad("shared", f"is not a vector of {theta.dtype} values"))
        if shared.dim() != 1:
            raise ValueError(_bad("shared", "is not a vector of values"))
        per_group = {}
        for key, dtype in (("damping", torch.float64), ("iterations", torch.int64)):
            t = decode(doc[key], key)
            if not (isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == (g,)):
                raise ValueError(_bad(key, f"is not a {dtype} vector of {g} groups"))
            per_group[key] = t.numpy()
        done = decode(doc["done"], "done")
        if not (isinstance(done, torch.Tensor) and done.dtype == torch.bool and done.shape == (g,)):
            raise ValueError(_bad("done", f"is not a vector of {g} flags"))
        if (per_group["iterations"] < 0).any() or (per_group["iterations"] > epoch).any():
            raise ValueError(_bad("iterations", f"holds counts outside 0..{epoch}"))
        texts = {}
        for key in ("status", "reason"):
            v = doc[key]
            if not (isinstance(v, list) and len(v) == g and all(isinstance(s, str) for s in v)):
                raise ValueError(_bad(key, f"is not a list of {g} texts"))
            texts[key] = v
        statuses = {s.value for s in GroupStatus}
        bad = [s for s in texts["status"] if s not in statuses]
        if bad:
            raise ValueError(_bad("status", f"{_short(bad[0])} is not a group status"))
        optimizer = None if doc["optimizer"] is None else decode(doc["optimizer"], "optimizer")
        if optimizer is not None and not isinstance(optimizer, dict):
            raise ValueError(_bad("optimizer", "is not a mapping"))
        config = decode(doc["config"], "config")
        if not isinstance(config, dict):
            raise ValueError(_bad("config", "is not a mapping"))
        carry = {}
        shapes = (("nu", (g,)), ("scale2", (g, theta.shape[1])), ("polish", (g,)), ("rss", (g,)))
        for key, shape in shapes:
            if doc.get(key) is None:
                continue
            t = decode(doc[key], key)
            if not (
                isinstance(t, torch.Tensor) and t.dtype == torch.float64 and tuple(t.shape) == shape
            ):
                raise ValueError(_bad(key, f"is not a float64 table of shape {shape}"))
            carry[key] = t.numpy().copy()
        data_files = doc.get("data_files")
        if data_files is not None and not (
            isinstance(data_files, list)
            and all(
                isinstance(f, list) and len(f) == 2 and all(isinstance(c, str) for c in f)
                for f in data_files
            )
        ):
            raise ValueError(_bad("data_files", "is not a list of [path, digest] pairs"))
    except DECODE_ERRORS as exc:
        raise ResumeError(f"cannot read the saved state {path}: {exc}") from None
    return GroupState(
        kind=doc["kind"],
        epoch=epoch,
        theta=theta,
        shared=shared,
        damping=np.array(per_group["damping"]),
        iterations=np.array(per_group["iterations"]),
        done=done.numpy().copy(),
        status=texts["status"],
        reason=texts["reason"],
        optimizer=optimizer,
        config=config,
        data_files=data_files,
        **carry,
    )


__all__ = ["FORMAT", "GroupState", "load_group_state", "save_group_state"]
