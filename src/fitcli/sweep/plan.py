"""A sweep's plan: axes (`key=a,b,c`, `key=range(...)`), grid expansion, the base config with
its overrides, sweep.yaml, and the plan's validation. Torch-free at import: the Dask client
and `fitcli --help` load it."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitcli import optim
from fitcli.config import (
    apply_overrides,
    config_from_dict,
    load_config,
    load_yaml,
    read_config_text,
)
from fitcli.config.overrides import KEY as _KEY
from fitcli.errors import (
    ConfigError,
    InputError,
)

SWEEP_FILE = "sweep.yaml"
FORMAT = "fitcli-sweep"


class SweepError(InputError):
    """A sweep's axes, options or sweep directory are invalid (exit 2)."""


# --------------------------------------------------------------------------------------------
# Grid expansion
# --------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*range\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*(?:,\s*([^,()]+?)\s*)?\)\s*$")
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
    fixed, axes = parse_assignments(assignments)
    base = load_yaml(read_config_text(config), str(config))
    if not isinstance(base, dict):
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


def dry_run_lines(plan: Plan) -> Iterable[str]:
    """Each run's `fitcli train` command, quoted for the shell: a line runs as it is."""
    for run in plan.runs:
        yield shlex.join(plan.command(run))
