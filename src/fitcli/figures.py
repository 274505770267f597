"""A run's figures for papers: RUN_DIR/figures/fit.<format> and loss.<format> (PNG, SVG, PDF).

Built from what the run directory holds (`read_run`, as `fitcli plot` builds its pages): the
final fit (observations with their sigma error bars, the fitted curve, its components, the bands
of bands.csv when the run has one, the residuals beneath) and the loss curve
(`plots.paper_fit_figure`, `plots.paper_loss_figure`). `export.render` draws every image in one
browser session; nothing is written until every image is drawn, then each file atomically.

Ownership: figures/ belongs to the run directory. fit.<format> and loss.<format> in it are
fitcli's own derived files, rewritten each time (as report.html is); anything else there is the
user's and never touched (and, like any file fitcli did not write, it stops --overwrite from
replacing the run directory). A fit.png that is a link, a folder or another non-regular file is
refused (exit 2), never replaced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitcli import export, plots
from fitcli.errors import InputError, RunDirError, RunFileError
from fitcli.losses import name_of
from fitcli.rundir import files
from fitcli.rundir.reader import Run, read_run

FIGURES = files.FIGURES


def bands_of(run: Run) -> list[dict]:
    """The run's bands as `plots.paper_fit_figure` takes them, one entry per level and kind,
    sorted by x: from bands.csv (and bands_data.csv, the prediction band at the data points of a
    fit with sigma) as `rundir.reader` read and checked them; [] for a run without bands."""
    from fitcli.bands import level_tag

    if run.bands is None or len(run.variables) > 1:  # several variables: at the data points
        return []
    grid, points = run.bands["grid"], run.bands["points"]
    out = []
    for kind, cols in (("conf", grid), ("pred", grid if points is None else points)):
        order = np.argsort(cols["x"], kind="stable")
        for level in run.bands["levels"]:
            tag = level_tag(level)
            lower, upper = cols.get(f"{kind}_lower_{tag}"), cols.get(f"{kind}_upper_{tag}")
            if lower is None or upper is None:
                continue
            out.append(
                {
                    "kind": "confidence" if kind == "conf" else "prediction",
                    "level": level,
                    "x": cols["x"][order],
                    "lower": lower[order],
                    "upper": upper[order],
                }
            )
    return out


def figures_of(run: Run) -> dict[str, dict]:
    """The run's static figures by name: "fit" once it has a snapshot, "loss" once metrics.csv
    is written."""
    from fitcli.report import labels, residuals

    d, out, axes = run.data, {}, labels(run)
    if run.snapshots and len(run.variables) > 1:
        last = run.snapshots[-1]
        # The bands of several variables are at the data points: the final fit's own values.
        fit = last.y_fit if run.bands is None else run.bands["grid"]["fit"]
        out["fit"] = plots.paper_variables_figure(
            variables=run.variables, x=d["x"], y=d["y"], y_fit=fit, bands=run.bands
        )
    elif run.snapshots:
        last = run.snapshots[-1]
        res = residuals(run)
        out["fit"] = plots.paper_fit_figure(
            x=d["x"],
            y=d["y"],
            sigma=d.get("sigma"),
            y_true=d.get("y_true"),
            x_fit=last.x_fit,
            y_fit=last.y_fit,
            components=list(zip(run.components, last.components, strict=True)) or None,
            bands=bands_of(run),
            residuals=None if res is None else res[1],
            x_label=axes.x,
            y_label=axes.y,
        )
        layout = out["fit"]["layout"]  # the config's log axes: x on both panels, y on the fit
        for key in ("xaxis", "xaxis2") if axes.log_x else ():
            if key in layout:
                layout[key]["type"] = "log"
        if axes.log_y:
            layout["yaxis"]["type"] = "log"
    if run.metrics is not None:
        m = run.metrics
        out["loss"] = plots.paper_loss_figure(
            epoch=m["epoch"], loss=m["loss"], loss_name=name_of(run.cfg.loss)
        )
    return out


@dataclass
class Written:
    """What `write_figures` wrote, and how long the browser took to start and each image."""

    paths: list[Path]
    start_s: float
    each_s: list[float]


def _target(folder: Path, name: str) -> Path:
    path = folder / name
    if os.path.lexists(path) and (path.is_symlink() or not path.is_file()):
        raise InputError(
            f"{path} is not a file fitcli wrote (a link, a folder or a special file); refusing "
            "to replace it: move it away"
        )
    return path


def write_figures(
    run_dir: Path,
    formats: list[str],
    *,
    width: int = export.WIDTH,
    height: int = export.HEIGHT,
    dpi: int = export.DPI,
) -> Written:
    """Draw the run's figures (`figures_of`) in each format and write them to RUN_DIR/figures/.

    Everything is read, checked and drawn before the first file is written.
    """
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in export.FORMATS]
    if bad or not formats:
        raise InputError(
            f"figure formats must be some of {', '.join(export.FORMATS)} (got {formats})"
        )
    run = read_run(Path(run_dir))
    figs = figures_of(run)
    if not figs:
        raise RunFileError(
            f"{run.path}: nothing to draw yet (no snapshot and no {files.METRICS}; status "
            f"{run.status})"
        )
    folder = run.path / FIGURES
    if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
        raise InputError(f"{folder} is not a folder fitcli made; refusing to write figures into it")
    names = [f"{name}.{fmt}" for fmt in formats for name in figs]
    targets = [_target(folder, n) for n in names]
    images = [export.Image(figs[name], fmt, width, height, dpi) for fmt in formats for name in figs]
    drawn = export.render(images)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create {folder}: {exc.strerror or exc}") from None
    for path, data in zip(targets, drawn.images, strict=True):
        files.atomic_write(path, data)
    return Written(targets, drawn.start_s, drawn.each_s)
