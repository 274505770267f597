"""Start values from the data: `params: {a1: guess}` and `model.guess: true`.

The model expression's top-level terms (its additive parts, in order) are read from its Python
syntax tree; a term that calls one lineshape with ``x`` first is a shape term, and each of the
call's arguments that is a bare name is a parameter with that argument's role (`fitcli.shapes`).
Peaks (shapes with a center and an area or height) are located in the data as scipy.signal
finds them: on the data less the background, lightly smoothed, the N most prominent maxima
(N = the number of peak terms), each with its height and full width at half maximum
(`scipy.signal.peak_widths`); the peaks are assigned by increasing center to the peak terms in
the expression's order, left to right. A straight background comes from the edges of the data:
the line through the medians of the first and last tenth of the points.

Pure: numpy and scipy on the data's x and y; no torch, no files.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fitcli import shapes as _shapes
from fitcli.errors import ConfigError

if TYPE_CHECKING:
    from fitcli.config.schema import Config

GUESS = "guess"
"""The value that asks for a guess: `params: {a1: guess}`."""

# Curves with a center and a height that are not peaks: edges, not maxima.
_EDGES = ("step_", "rectangle_", "logistic", "sigmoid_step", "dose_response", "hill", "richards")
EDGE_FRACTION = 0.1  # the share of the points at each end that the background is read from


@dataclass(frozen=True)
class ShapeCall:
    """A lineshape called in a top-level term: the shape and its parameters by argument."""

    term: int  # which top-level term (0-based, the expression's order)
    shape: _shapes.Shape
    params: dict[str, str]  # shape argument -> parameter name (bare-name arguments only)

    @property
    def is_peak(self) -> bool:
        kinds = {r.kind for r in self.shape.roles.values()}
        return (
            "center" in kinds
            and bool(kinds & {"area", "height"})
            and not self.shape.name.startswith(_EDGES)
        )


def _terms(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        return [*_terms(node.left), *_terms(node.right)]
    return [node]


def shape_calls(source: str) -> list[ShapeCall]:
    """The lineshape calls of an expression's top-level terms, in order (one per term at most:
    a term with several shape calls is not read)."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError:
        return []  # the expression parser reports it
    out = []
    for k, term in enumerate(_terms(tree.body)):
        calls = [
            n
            for n in ast.walk(term)
            if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name)
            and n.func.id in _shapes.SHAPES
        ]
        if len(calls) != 1:
            continue
        call = calls[0]
        shape = _shapes.SHAPES[call.func.id]  # type: ignore[attr-defined]  # checked above
        if not call.args or not (isinstance(call.args[0], ast.Name) and call.args[0].id == "x"):
            continue
        params = {
            arg: node.id
            for arg, node in zip(shape.args[1:], call.args[1:], strict=False)
            if isinstance(node, ast.Name) and node.id != "x"
        }
        out.append(ShapeCall(k, shape, params))
    return out


@dataclass(frozen=True)
class Peak:
    """A peak found in the data: center, height above the background, FWHM."""

    center: float
    height: float
    fwhm: float


def noise_level(y: np.ndarray) -> float:
    """The noise's standard deviation from successive differences (robust: a median)."""
    d = np.diff(y)
    if d.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))


def smooth(y: np.ndarray) -> np.ndarray:
    """A light Savitzky-Golay smoothing (window about 1% of the points, at least 5)."""
    from scipy.signal import savgol_filter

    n = y.size
    window = max(5, (n // 100) | 1)
    if n <= window:
        return y.copy()
    return savgol_filter(y, window, 2)


def find_peaks(x: np.ndarray, y: np.ndarray, count: int) -> list[Peak]:
    """The `count` most prominent maxima of y (background already removed), by prominence.

    Fewer maxima than asked for: the remaining peaks are looked for again in what is left once
    the found ones (as Gaussians of their height and width) are taken away.
    """
    from scipy import signal

    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    ys = smooth(y)
    found: list[Peak] = []
    rest = ys.copy()
    index = np.arange(x.size, dtype=float)
    while len(found) < count:
        idx, props = signal.find_peaks(rest, prominence=0.0)
        if idx.size == 0:
            idx = np.array([int(np.argmax(rest))])
            prom = np.array([float(rest[idx[0]] - rest.min())])
        else:
            prom = props["prominences"]
        chosen = idx[np.argsort(-prom, kind="stable")][: count - len(found)]
        widths = signal.peak_widths(rest, chosen, rel_height=0.5)
        new = []
        for j, i in enumerate(chosen):
            left = float(np.interp(widths[2][j], index, x))
            right = float(np.interp(widths[3][j], index, x))
            fwhm = max(right - left, float(np.median(np.diff(x))) if x.size > 1 else 1.0)
            new.append(Peak(float(x[i]), float(rest[i]), fwhm))
        found += new
        for p in new:  # what is left for peaks the maxima did not show
            s = p.fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
            rest = rest - p.height * np.exp(-0.5 * ((x - p.center) / s) ** 2)
        if not new:
            break
    return found


def edges_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, intercept) of the line through the medians of both ends of the data."""
    order = np.argsort(x, kind="stable")
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    k = max(3, int(EDGE_FRACTION * x.size))
    xl, yl = float(np.median(x[:k])), float(np.median(y[:k]))
    xr, yr = float(np.median(x[-k:])), float(np.median(y[-k:]))
    slope = (yr - yl) / (xr - xl) if xr > xl else 0.0
    return slope, yl - slope * xl


def _width_value(call: ShapeCall, fwhm: float) -> tuple[dict[str, float], float | None]:
    values: dict[str, float] = {}
    first = None
    for arg, role in call.shape.roles.items():
        if role.kind == "width":
            v = fwhm / role.factor
            values[arg] = v
            first = v if first is None else first
    return values, first


def _peak_values(call: ShapeCall, peak: Peak, span: float) -> dict[str, float]:
    """A peak term's arguments by name for one found peak."""
    values, width = _width_value(call, peak.fwhm)
    for arg, role in call.shape.roles.items():
        if role.kind == "center":
            values[arg] = peak.center
        elif role.kind == "height":
            values[arg] = peak.height / role.factor
        elif role.kind == "area":
            values[arg] = peak.height * (width if width is not None else peak.fwhm) / role.factor
        elif role.kind == "scale":
            values[arg] = peak.fwhm
        elif role.kind == "rate":
            values[arg] = 1.0 / peak.fwhm
    return values


def _other_values(call: ShapeCall, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Arguments of a term that is not a peak, from the data's range (a start, not a fit)."""
    span = float(np.ptp(x)) or 1.0
    values: dict[str, float] = {}
    for arg, role in call.shape.roles.items():
        if role.kind == "center":
            values[arg] = float(np.median(x))
        elif role.kind == "height":
            values[arg] = float(np.ptp(y)) / role.factor or 1.0
        elif role.kind == "width":
            values[arg] = span / 10.0 / role.factor
        elif role.kind == "scale":
            values[arg] = span / 10.0
        elif role.kind == "rate":
            values[arg] = 10.0 / span
    return values


def guess_values(
    source: str, x: np.ndarray, y: np.ndarray, names: Iterable[str]
) -> dict[str, float]:
    """Start values of parameters `names` of expression `source` from data (x, y).

    A name that is no shape argument is a ConfigError naming it.
    """
    wanted = list(names)
    calls = shape_calls(source)
    roles: dict[str, tuple[ShapeCall, str]] = {}
    for call in calls:
        for arg, name in call.params.items():
            if arg in call.shape.roles:
                roles.setdefault(name, (call, arg))
    missing = [n for n in wanted if n not in roles]
    if missing:
        raise ConfigError(
            [
                f"model.params.{n}: guess needs a shape argument ({n} is no argument of a "
                "lineshape such as gaussian(x, amplitude, center, sigma) in model.expr); "
                "give it a number"
                for n in missing
            ]
        )
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    slope = level = 0.0
    backgrounds = [c for c in calls if not c.is_peak and _is_background(c)]
    if backgrounds:
        has_slope = any(
            r.kind == "background_slope" for c in backgrounds for r in c.shape.roles.values()
        )
        if has_slope:
            slope, level = edges_line(x, y)
        else:
            level = _edge_level(x, y)
    residual = y - (slope * x + level)
    peaks_terms = [c for c in calls if c.is_peak]
    values: dict[str, float] = {}
    if peaks_terms:
        peaks = sorted(find_peaks(x, residual, len(peaks_terms)), key=lambda p: p.center)
        span = float(np.ptp(x)) or 1.0
        for call, peak in zip(peaks_terms, peaks, strict=False):
            for arg, v in _peak_values(call, peak, span).items():
                if arg in call.params:
                    values.setdefault(call.params[arg], v)
    for call in calls:
        computed = _other_values(call, x, y) if not call.is_peak else {}
        for arg, name in call.params.items():
            role = call.shape.roles.get(arg)
            if role is None or name in values:
                continue
            if role.kind == "background_slope":
                values[name] = slope
            elif role.kind == "background_level":
                values[name] = level
            elif role.start is not None:
                values[name] = float(role.start)
            elif arg in computed:
                values[name] = computed[arg]
    out = {}
    for n in wanted:
        call, arg = roles[n]
        default = call.shape.defaults.get(arg, 1.0)
        fallback = float(default) if isinstance(default, float | int) else 1.0
        v = values.get(n, fallback)
        out[n] = v if math.isfinite(v) else fallback
    return out


def _is_background(call: ShapeCall) -> bool:
    kinds = {r.kind for r in call.shape.roles.values()}
    return bool(kinds & {"background_slope", "background_level"}) and "center" not in kinds


def _edge_level(x: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(x, kind="stable")
    y = np.asarray(y, float)[order]
    k = max(3, int(EDGE_FRACTION * y.size))
    return float(min(np.median(y[:k]), np.median(y[-k:])))


def inside(value: float, lo: float | None, hi: float | None) -> float:
    """A guess moved strictly inside its parameter's bounds (1% of the way in from a bound)."""
    if lo is not None and hi is not None:
        return min(max(value, lo + 0.01 * (hi - lo)), hi - 0.01 * (hi - lo))
    if lo is not None and value <= lo:
        return lo + max(abs(lo), 1.0) * 0.01
    if hi is not None and value >= hi:
        return hi - max(abs(hi), 1.0) * 0.01
    return value


def resolve(cfg: Config, x: np.ndarray, y: np.ndarray) -> Config:
    """The config with every `guess` (and `model.guess: true`) replaced by its value: what the
    run's config.yaml records, so that it reruns with the same start."""
    from fitcli.config.schema import ParamSpec

    model = cfg.model
    params: Mapping[str, ParamSpec] = model.params or {}
    if model.expr is None:
        return cfg
    wanted = [n for n, spec in params.items() if spec.value == GUESS]
    if model.guess:
        calls = shape_calls(model.expr)
        shaped = {n for c in calls for a, n in c.params.items() if a in c.shape.roles}
        wanted += [
            n
            for n, spec in params.items()
            if n in shaped
            and spec.vary
            and "value" not in spec.model_fields_set
            and n not in wanted
        ]
    if not wanted and not model.guess:
        return cfg
    guessed = guess_values(model.expr, x, y, wanted) if wanted else {}
    new = dict(params)
    for n, v in guessed.items():
        spec = params[n]
        new[n] = ParamSpec(
            value=inside(v, spec.min, spec.max), min=spec.min, max=spec.max, vary=spec.vary
        )
    spec_model = model.model_copy(update={"params": new, "guess": None})
    return cfg.model_copy(update={"model": spec_model})
