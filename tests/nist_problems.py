"""NIST StRD nonlinear regression problems: read the `.dat` files and score fits against them.

The `.dat` format (NIST's Statistical Reference Datasets, public domain) holds, per parameter,
a line ``b1 = start1 start2 certified certified_stddev``, a ``Residual Sum of Squares:`` line,
and after the line that begins ``Data:   y`` the data rows ``y x``. `models.yaml` beside the
files names each problem's model and difficulty. `MODELS` gives every model as a plain torch
function ``f(b, x)`` of a parameter vector ``b`` (b[0] is NIST's b1), a reference to cross-check
other model builders against. The tests and benchmarks use it; it is not part of the installed
package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fitcli.errors import DataError

_PARAM_LINE = re.compile(r"^\s*b(\d+)\s*=\s*(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
_RSS_LINE = re.compile(r"^\s*Residual Sum of Squares:\s*(\S+)")
_DATA_HEAD = re.compile(r"^\s*Data:\s+y\s+x\s*$")


@dataclass(frozen=True)
class NistProblem:
    """One NIST problem: start values, certified values and data (x, y as float lists)."""

    name: str
    start1: list[float]
    start2: list[float]
    certified: list[float]
    certified_stderr: list[float]
    certified_rss: float
    x: list[float]
    y: list[float]
    model: str | None = None
    difficulty: str | None = None

    @property
    def n_params(self) -> int:
        return len(self.certified)

    def start(self, which: int) -> list[float]:
        """Start values 1 (far from the solution) or 2 (closer)."""
        if which not in (1, 2):
            raise ValueError(f"NIST problems have starts 1 and 2, not {which}")
        return self.start1 if which == 1 else self.start2


def parse_dat(
    path: str | Path, *, model: str | None = None, difficulty: str | None = None
) -> NistProblem:
    """Read one NIST StRD `.dat` file into a `NistProblem`."""
    path = Path(path)
    params: dict[int, tuple[float, float, float, float]] = {}
    rss: float | None = None
    x: list[float] = []
    y: list[float] = []
    in_data = False
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if in_data:
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DataError(f"{path}:{lineno}: expected 'y x', got {line.strip()!r}")
            y.append(float(fields[0]))
            x.append(float(fields[1]))
        elif _DATA_HEAD.match(line):
            in_data = True
        elif m := _PARAM_LINE.match(line):
            params[int(m.group(1))] = tuple(float(v) for v in m.group(2, 3, 4, 5))
        elif m := _RSS_LINE.match(line):
            rss = float(m.group(1))
    if not params or rss is None or not x:
        raise DataError(f"{path}: not a NIST StRD file (parameters, RSS or data missing)")
    if sorted(params) != list(range(1, len(params) + 1)):
        raise DataError(f"{path}: parameters are not numbered b1..b{len(params)}")
    rows = [params[i] for i in range(1, len(params) + 1)]
    return NistProblem(
        name=path.stem,
        start1=[r[0] for r in rows],
        start2=[r[1] for r in rows],
        certified=[r[2] for r in rows],
        certified_stderr=[r[3] for r in rows],
        certified_rss=rss,
        x=x,
        y=y,
        model=model,
        difficulty=difficulty,
    )


def load_suite(folder: str | Path) -> dict[str, NistProblem]:
    """Every problem in `folder/models.yaml`, in file order, with its model and difficulty."""
    import yaml

    folder = Path(folder)
    spec = yaml.safe_load((folder / "models.yaml").read_text())
    return {
        name: parse_dat(
            folder / f"{name}.dat", model=entry["model"], difficulty=entry["difficulty"]
        )
        for name, entry in spec.items()
    }


def lre(found: float, certified: float, cap: float = 11.0) -> float:
    """Log relative error ``-log10(|found - certified| / |certified|)``, capped; 0 if non-finite."""
    if not math.isfinite(found):
        return 0.0
    if found == certified:
        return cap
    denom = abs(certified) if certified != 0 else 1.0
    return max(0.0, min(cap, -math.log10(abs(found - certified) / denom)))


def worst_lre(found, certified, cap: float = 11.0) -> float:
    """A fit's NIST score: the lowest LRE over its parameters."""
    return min(lre(float(f), float(c), cap) for f, c in zip(found, certified, strict=True))


_Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rational3(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    num = b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3
    return num / (1 + b[4] * x + b[5] * x**2 + b[6] * x**3)


def _lanczos(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x) + b[4] * torch.exp(-b[5] * x)


def _gauss(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (
        b[0] * torch.exp(-b[1] * x)
        + b[2] * torch.exp(-((x - b[3]) ** 2) / b[4] ** 2)
        + b[5] * torch.exp(-((x - b[6]) ** 2) / b[7] ** 2)
    )


def _chwirut(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-b[0] * x) / (b[1] + b[2] * x)


def _exp_rise(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return b[0] * (1 - torch.exp(-b[1] * x))


def _enso(b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = 2 * math.pi * x
    return (
        b[0]
        + b[1] * torch.cos(w / 12)
        + b[2] * torch.sin(w / 12)
        + b[4] * torch.cos(w / b[3])
        + b[5] * torch.sin(w / b[3])
        + b[7] * torch.cos(w / b[6])
        + b[8] * torch.sin(w / b[6])
    )


# The expressions of models.yaml as torch functions f(b, x); b[0] is NIST's b1.
MODELS: dict[str, _Model] = {
    "Misra1a": _exp_rise,
    "Chwirut2": _chwirut,
    "Chwirut1": _chwirut,
    "Lanczos3": _lanczos,
    "Gauss1": _gauss,
    "Gauss2": _gauss,
    "DanWood": lambda b, x: b[0] * x ** b[1],
    "Misra1b": lambda b, x: b[0] * (1 - (1 + b[1] * x / 2) ** (-2)),
    "Kirby2": lambda b, x: (b[0] + b[1] * x + b[2] * x**2) / (1 + b[3] * x + b[4] * x**2),
    "Hahn1": _rational3,
    "MGH17": lambda b, x: b[0] + b[1] * torch.exp(-x * b[3]) + b[2] * torch.exp(-x * b[4]),
    "Lanczos1": _lanczos,
    "Lanczos2": _lanczos,
    "Gauss3": _gauss,
    "Misra1c": lambda b, x: b[0] * (1 - (1 + 2 * b[1] * x) ** (-0.5)),
    "Misra1d": lambda b, x: b[0] * b[1] * x * ((1 + b[1] * x) ** (-1)),
    "Roszman1": lambda b, x: b[0] - b[1] * x - torch.arctan(b[2] / (x - b[3])) / math.pi,
    "ENSO": _enso,
    "MGH09": lambda b, x: b[0] * (x**2 + x * b[1]) / (x**2 + x * b[2] + b[3]),
    "Thurber": _rational3,
    "BoxBOD": _exp_rise,
    "Rat42": lambda b, x: b[0] / (1 + torch.exp(b[1] - b[2] * x)),
    "MGH10": lambda b, x: b[0] * torch.exp(b[1] / (x + b[2])),
    "Eckerle4": lambda b, x: (b[0] / b[1]) * torch.exp(-0.5 * ((x - b[2]) / b[1]) ** 2),
    "Rat43": lambda b, x: b[0] / ((1 + torch.exp(b[1] - b[2] * x)) ** (1 / b[3])),
    "Bennett5": lambda b, x: b[0] * (b[1] + x) ** (-1 / b[2]),
}
