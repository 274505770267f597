"""Confidence and prediction bands of a fitted curve, by the delta method: the one place they
are computed, for `FitResult.predict(x, band=...)`, a run directory's bands.csv, the snapshot and
report figures, and the coverage benchmark (benchmarks/band_coverage.py).

At a point x, with ``g(x) = d f(x; theta) / d theta`` the exact Jacobian of the model at the
fitted parameters (by autograd) and C the fit's covariance of the free parameters::

    confidence band:  f(x) ± q sqrt(g^T C g)          where the true curve lies
    prediction band:  f(x) ± q sqrt(g^T C g + s²)     where a new observation at x falls

``s² = RSS / (n - p)`` for a fit without sigma, whose C is scaled by the same s², and q is
Student's t quantile at ``1/2 + level/2`` with n - p degrees of freedom; for a fit weighted by
a sigma column (absolute sigma: C is known, not estimated) q is the normal quantile and a new
observation's variance is its own sigma², so the prediction band exists only where sigma is
known: at the data points. The bands are pointwise: at each x separately, the true curve is
inside the confidence band with probability `level` (for a model linear in its parameters
exactly, otherwise to first order); the whole curve at once less often (BENCHMARKS.md, Band
coverage).

A model of several independent variables has its bands at the data points (a curve on a grid of
several variables would mean nothing): bands.csv's first columns are then the variables' names,
in the config's order, and it holds the prediction band with or without sigma (the noise is
known at each data point), so there is no bands_data.csv.

Column names carry the level in percent (`level_tag`): 0.95 -> ``conf_lower_95``, 0.995 ->
``conf_lower_99_5`` (the decimal point written as ``_``); `level_of_tag` reads it back.

Torch is imported inside the functions that need it: the names and the quantiles are torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np

from fitcli.rundir import files

if TYPE_CHECKING:
    from fitcli.model import FitModel

DEFAULT_LEVELS = (0.68, 0.95)
MAX_LEVELS = 10  # levels in report.levels at most (each adds four columns to bands.csv)
# With a sigma column the prediction band is written at the data points (bands_data.csv): up to
# this many, beyond which a file of that many rows is more than a band is worth.
DATA_POINTS_LIMIT = 100_000


class NoBand(ValueError):
    """The fit has no usable covariance: its bands cannot be computed (the message says why)."""


def level_tag(level: float) -> str:
    """The level in percent as a column suffix: 0.95 -> "95", 0.68 -> "68", 0.995 -> "99_5".

    The shortest decimal of `level` (its repr) with the point moved two places, so the tag is
    exact (no rounding: 0.68 is "68", not "68.00000000000001") and `level_of_tag` gives back the
    same float; "." is written "_" so that a column name is one word."""
    text = format(Decimal(repr(float(level))).scaleb(2).normalize(), "f")
    return text.replace(".", "_")


def level_of_tag(tag: str) -> float:
    """The level of a column suffix (`level_tag`'s inverse): "99_5" -> 0.995."""
    return float(Decimal(tag.replace("_", ".")).scaleb(-2))


def column_names(levels: Sequence[float], *, prediction: bool = True) -> list[str]:
    """bands.csv's band columns: a conf_lower/conf_upper pair per level, then (with
    `prediction`) a pred_lower/pred_upper pair per level."""
    kinds = ("conf", "pred") if prediction else ("conf",)
    return [
        f"{kind}_{side}_{level_tag(level)}"
        for kind in kinds
        for level in levels
        for side in ("lower", "upper")
    ]


def point_columns(x: np.ndarray, variables: Sequence[str] = ("x",)) -> dict[str, np.ndarray]:
    """The columns that say where a band is: ``{"x": x}`` for one variable, else one column per
    variable of the n x k points `x`, by name (bands.csv's and `fitcli predict`'s first
    columns)."""
    arr = np.asarray(x, dtype=np.float64)
    if len(variables) == 1:
        return {variables[0]: arr.reshape(-1)}
    if arr.ndim != 2 or arr.shape[1] != len(variables):
        raise ValueError(f"x has shape {arr.shape}; expected n x {len(variables)} points")
    return {name: arr[:, k] for k, name in enumerate(variables)}


def file_header(
    variables: Sequence[str], levels: Sequence[float], *, prediction: bool = True
) -> list[str]:
    """The header of bands.csv: the variables' names (`x` for one), `fit`, the band columns."""
    return [*variables, "fit", *column_names(levels, prediction=prediction)]


def quantile(level: float, dof: int, absolute: bool) -> float:
    """The two-sided multiplier q of a band at `level`: Student's t with `dof` degrees of
    freedom at 1/2 + level/2, or, with absolute sigma, the normal quantile there."""
    # Without scipy: importing scipy.special cost a quarter of a second of every run.
    from fitcli.quantiles import norm_ppf, t_ppf

    if not 0 < level < 1:
        raise ValueError(f"a band's level must be between 0 and 1 (got {level})")
    p = 0.5 + level / 2
    return norm_ppf(p) if absolute else t_ppf(p, dof)


def delta_variance(jac: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``g^T C g`` at each point: `jac` [..., m, p] (rows g), `cov` [..., p, p]; leading
    dimensions (replicates) broadcast. Tiny negative values from rounding are 0."""
    var = np.einsum("...ij,...jk,...ik->...i", jac, cov, jac)
    return np.maximum(var, 0.0)


def band_columns(
    fit: np.ndarray,
    var: np.ndarray,
    levels: Sequence[float],
    *,
    dof: int,
    absolute: bool,
    noise_var: np.ndarray | float | None = None,
) -> dict[str, np.ndarray]:
    """The band columns (`column_names` order) around `fit` with delta-method variance `var`
    (same shape, any leading dimensions); the prediction band only with `noise_var` (s², or
    sigma² at each point)."""
    out: dict[str, np.ndarray] = {}
    qs = [quantile(level, dof, absolute) for level in levels]
    for level, q in zip(levels, qs, strict=True):
        half = q * np.sqrt(var)
        tag = level_tag(level)
        out[f"conf_lower_{tag}"] = fit - half
        out[f"conf_upper_{tag}"] = fit + half
    if noise_var is not None:
        total = var + noise_var
        for level, q in zip(levels, qs, strict=True):
            half = q * np.sqrt(total)
            tag = level_tag(level)
            out[f"pred_lower_{tag}"] = fit - half
            out[f"pred_upper_{tag}"] = fit + half
    return out


@dataclass(frozen=True)
class Covariance:
    """What a fit's bands are computed from: the covariance of its free parameters (`names`
    order; a parameter at a bound counts as fixed, variance 0), the degrees of freedom n - p,
    whether sigma is absolute, s² = RSS / (n - p) (None with absolute sigma), and whether the
    fit was weighted by a sigma column (with relative sigma, `data.absolute_sigma: false`, a
    new observation's variance is s² sigma²)."""

    names: tuple[str, ...]
    matrix: np.ndarray
    dof: int
    absolute: bool
    s2: float | None
    weighted: bool = False


def covariance_of(
    summary: Mapping[str, Any], *, absolute: bool, weighted: bool | None = None
) -> Covariance:
    """A fit's `Covariance` from its summary (summary.json's fields), or `NoBand` saying why
    there is none: no covariance, a singular status, an undetermined parameter, no degrees of
    freedom. `absolute`: the fit was weighted by a sigma column of absolute errors;
    `weighted` (default: `absolute`): by a sigma column at all, relative ones with
    `data.absolute_sigma: false` (whose covariance is scaled by s², as curve_fit's)."""
    unc = summary.get("uncertainty") or {}
    status, reason = unc.get("status"), unc.get("reason")
    cov = summary.get("covariance")
    free = list(summary.get("covariance_params") or [])
    if status == "singular":
        raise NoBand(f"the error bars are singular ({reason})")
    if cov is None or not free:
        raise NoBand(f"the fit has no covariance ({status}: {reason})")
    err = summary.get("stderr") or {}
    undefined = [n for n in free if err.get(n) is None]
    if undefined and status != "at_bound":
        raise NoBand(f"the covariance of {', '.join(undefined)} is undefined ({status}: {reason})")
    n, p = int(summary["n_points"]), int(summary["n_params"])
    dof = n - p
    if dof <= 0 and not absolute:
        raise NoBand(f"{n} points for {p} parameters leave no degrees of freedom")
    matrix = np.array([[math.nan if v is None else float(v) for v in row] for row in cov])
    # At a bound a parameter is treated as fixed, as its error bars are (`stats`).
    matrix = np.where(np.isnan(matrix), 0.0, matrix)
    s2 = None
    if not absolute:
        rss = summary.get("rss")
        if rss is None or not math.isfinite(float(rss)):
            raise NoBand("the residual sum of squares is not finite")
        s2 = float(rss) / dof
    return Covariance(tuple(free), matrix, dof, absolute, s2, absolute or bool(weighted))


def jacobian(model: FitModel, theta: Any, x: Any) -> Any:
    """d f(x) / d theta, [len(x), p], exact (reverse-mode autograd, one pass per parameter),
    of `model` at the free parameters' external values `theta` (`model.free_names` order)."""
    from fitcli.lm import _jacobian_columns
    from fitcli.model import model_function

    fn = model_function(model, external=True)
    jac, _ = _jacobian_columns(lambda t: fn(t, x), theta)
    return jac.expand(x.shape[0], theta.numel())  # a constant model has one row


def curve(
    model: FitModel,
    params: Mapping[str, float],
    x: np.ndarray,
    cov: Covariance,
    levels: Sequence[float],
    *,
    sigma: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """`fit` and the band columns of a fitted `model` (its parameters `params`, by name) at the
    points `x` (n values of one variable, or n x k points of a model of k variables): the
    prediction band too when it can be had (a fit without sigma; with a sigma column only given
    `sigma`, the noise at these points). `model` is evaluated in its dtype and
    on its device; the columns are float64 numpy arrays."""
    import torch

    if list(cov.names) != list(model.free_names):
        raise NoBand(
            f"the covariance is of {', '.join(cov.names)}, the model's free parameters are "
            f"{', '.join(model.free_names)}"
        )
    values = [float(params[k]) for k in model.names]
    if not all(math.isfinite(v) for v in values):
        raise NoBand("a fitted parameter is not finite")
    dtype, device = model.raw.dtype, model.raw.device
    xt = torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype).to(device)
    full = torch.tensor(values, dtype=dtype, device=device)
    theta = torch.tensor([float(params[k]) for k in model.free_names], dtype=dtype, device=device)
    with torch.no_grad():
        fit = model.predict_full(full, xt).reshape(-1).expand(xt.shape[0])
        fit_np = fit.double().cpu().numpy().copy()
    jac = jacobian(model, theta, xt).double().cpu().numpy()
    var = delta_variance(jac, cov.matrix)
    noise: np.ndarray | float | None = None
    if not cov.weighted:
        noise = cov.s2
    elif sigma is not None:
        sig = np.asarray(sigma, dtype=np.float64)
        if sig.shape != var.shape:
            raise ValueError(f"sigma has {sig.shape[0]} values but x has {var.shape[0]}")
        # Relative sigma: the noise is sigma scaled by s, as the covariance is.
        noise = sig * sig if cov.s2 is None else cov.s2 * sig * sig
    columns = band_columns(fit_np, var, levels, dof=cov.dof, absolute=cov.absolute, noise_var=noise)
    return {"fit": fit_np, **columns}


def band_set(
    grid: dict[str, np.ndarray],
    levels: Sequence[float],
    points: dict[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """What a figure draws (`plots.band_traces`): bands.csv's columns (`grid`: x, fit, conf_*,
    and pred_* without sigma), the levels, and bands_data.csv's (`points`: the prediction band
    at the data points of a fit with sigma) or None."""
    return {"grid": grid, "levels": [float(v) for v in levels], "points": points}


@dataclass
class RunBands:
    """A finished run's bands: `grid` (x, fit and the bands on the fitted curve's grid, for
    bands.csv; several variables: their columns, fit and the bands at the data points),
    `points` (the same at the data points, for bands_data.csv: a fit of one variable with a
    sigma column, whose prediction band exists only there; None otherwise) and `record`, what
    summary.json says of them (`bands`)."""

    grid: dict[str, np.ndarray] | None
    points: dict[str, np.ndarray] | None
    record: dict[str, Any]


def for_run(
    model: FitModel,
    summary: Mapping[str, Any],
    grid: np.ndarray,
    x: np.ndarray,
    sigma: np.ndarray | None,
    levels: Sequence[float],
    variables: Sequence[str] = ("x",),
    *,
    absolute_sigma: bool = True,
) -> RunBands:
    """The bands of a finished run (its float64 `model`, `summary` with the error bars, the
    fitted curve's `grid`, the data's `x` and `sigma`), or the reason there are none in
    `record["skipped"]`. Several `variables`: at the data points `x` (n x k; `grid` unused),
    in `grid` with the variables' columns and the prediction band. `absolute_sigma`: the
    config's `data.absolute_sigma` (false: sigma are relative weights). No I/O: the run
    writer writes what this returns."""
    levels = [float(v) for v in levels]
    record: dict[str, Any] = {"levels": levels}
    weighted = sigma is not None
    absolute = weighted and absolute_sigma
    if len(variables) > 1:
        return _at_data_points(model, summary, x, sigma, levels, variables, record, absolute)
    try:
        cov = covariance_of(summary, absolute=absolute, weighted=weighted)
        on_grid = curve(model, summary["params"], grid, cov, levels)
    except NoBand as exc:
        return RunBands(None, None, {**record, "skipped": str(exc)})
    record.update(
        quantile="normal" if cov.absolute else "student_t",
        dof=cov.dof,
        file=files.BANDS,
    )
    points = None
    if sigma is None:
        record["prediction"] = files.BANDS
    elif len(x) <= DATA_POINTS_LIMIT:
        at_data = curve(model, summary["params"], x, cov, levels, sigma=sigma)
        points = {"x": np.asarray(x, dtype=np.float64), **at_data}
        record["prediction"] = files.BANDS_DATA
    else:
        record["prediction"] = None
        record["prediction_skipped"] = (
            f"with a sigma column the prediction band is written at the data points, up to "
            f"{DATA_POINTS_LIMIT:,} of them; this run has {len(x):,}"
        )
    return RunBands({"x": np.asarray(grid, dtype=np.float64), **on_grid}, points, record)


def _at_data_points(
    model: FitModel,
    summary: Mapping[str, Any],
    x: np.ndarray,
    sigma: np.ndarray | None,
    levels: list[float],
    variables: Sequence[str],
    record: dict[str, Any],
    absolute: bool,
) -> RunBands:
    """`for_run` of a model of several variables: bands.csv at the data points, the prediction
    band in it (s², or each point's own sigma²)."""
    try:
        cov = covariance_of(summary, absolute=absolute, weighted=sigma is not None)
        if len(x) > DATA_POINTS_LIMIT:
            raise NoBand(
                f"the bands of a model of several variables are written at the data points, "
                f"up to {DATA_POINTS_LIMIT:,} of them; this run has {len(x):,}"
            )
        at_data = curve(model, summary["params"], x, cov, levels, sigma=sigma)
    except NoBand as exc:
        return RunBands(None, None, {**record, "skipped": str(exc)})
    record.update(
        quantile="normal" if cov.absolute else "student_t",
        dof=cov.dof,
        file=files.BANDS,
        prediction=files.BANDS,
    )
    return RunBands({**point_columns(x, variables), **at_data}, None, record)


__all__ = [
    "DEFAULT_LEVELS",
    "Covariance",
    "NoBand",
    "RunBands",
    "band_columns",
    "band_set",
    "column_names",
    "covariance_of",
    "curve",
    "delta_variance",
    "file_header",
    "for_run",
    "jacobian",
    "level_of_tag",
    "level_tag",
    "point_columns",
    "quantile",
]
