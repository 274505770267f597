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
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitcli import export, plots
from fitcli.errors import InputError, RunDirError, RunFileError
from fitcli.losses import name_of
from fitcli.rundir import files
from fitcli.rundir.reader import Run, _read_csv, read_run

FIGURES = files.FIGURES
BANDS = "bands.csv"  # the bands of the final fit, written beside summary.json when computed
_BAND = re.compile(r"^(conf|pred)_lower_([0-9]+)$")


def bands_of(run: Run) -> list[dict]:
    """The bands in the run's bands.csv ([] without one, or without an x column): one entry per
    level and kind, as `plots.paper_fit_figure` takes them."""
    if not (run.path / BANDS).exists():
        return []
    table = _read_csv(run.path, BANDS)
    if "x" not in table:
        return []  # several variables: bands at the data points, not a curve over x
    out = []
    for column in table:
        m = _BAND.match(column)
        upper = column.replace("_lower_", "_upper_")
        if not m or upper not in table:
            continue
        keep = np.isfinite(table[column]) & np.isfinite(table[upper])
        if not keep.any():
            continue
        out.append(
            {
                "kind": "confidence" if m.group(1) == "conf" else "prediction",
                "level": int(m.group(2)) / 100,
                "x": table["x"][keep],
                "lower": table[column][keep],
                "upper": table[upper][keep],
            }
        )
    return out


def figures_of(run: Run) -> dict[str, dict]:
    """The run's static figures by name: "fit" once it has a snapshot, "loss" once metrics.csv
    is written."""
    from fitcli.report import residuals

    d, out = run.data, {}
    if run.snapshots:
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
        )
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
