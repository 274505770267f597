"""Reading a run directory back: `read_run` reads and validates every file of it into a `Run`
(its summary, config, data, `Snapshot`s and metrics); any fault becomes a `RunFileError` naming
the file (exit 2). `summary_problem` says why a summary.json cannot be listed (`fitcli runs`,
a sweep's finished runs); `check_plotly_js` checks an existing plotly.min.js. Torch-free.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fitcli import liveness
from fitcli.errors import RunFileError, RunStatus
from fitcli.rundir import files

STATUSES = (  # what a summary.json may say (the others are shown, never written)
    RunStatus.RUNNING,
    RunStatus.COMPLETED,
    RunStatus.DIVERGED,
    RunStatus.INTERRUPTED,
    RunStatus.FAILED,
)
_PAGE = re.compile(r"^epoch-([0-9]+)\.html$")
_FIT = re.compile(r"^epoch-([0-9]+)\.csv$")
# Snapshots a report draws at most: a run's schedule has at most 1001 (snapshots <= 1000), each
# resume with more epochs adds its own; more than this is not a list fitcli wrote.
MAX_SNAPSHOTS = 10_000


@dataclass
class Snapshot:
    """One stored snapshot: its epoch, loss and parameters, and the fitted curve on the grid."""

    epoch: int
    loss: float
    params: dict[str, float]
    file: str
    fit_file: str
    x_fit: np.ndarray
    y_fit: np.ndarray
    note: str | None = None  # e.g. "stopped at epoch 37" on snapshots LM filled in
    components: list[np.ndarray] = field(default_factory=list)  # each component on x_fit


@dataclass
class Run:
    """Everything `fitcli plot` reads from one run directory, validated."""

    path: Path
    summary: dict
    config_text: str
    cfg: Any
    data: dict[str, np.ndarray]
    names: list[str]
    snapshots: list[Snapshot]
    metrics: dict[str, np.ndarray] | None
    notes: list[str] = field(default_factory=list)
    # The final fit's bands (`fitcli.bands.band_set`, read from bands.csv and bands_data.csv),
    # None when the run has none (summary.json's `bands` says why).
    bands: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.summary["name"])

    @property
    def status(self) -> str:
        """The recorded status, or `stale` for a run whose writer is gone (`liveness`)."""
        return liveness.status_of(self.summary)

    @property
    def variables(self) -> tuple[str, ...]:
        """The independent variables' names: ("x",), or several (summary.json's `variables`)."""
        names = self.summary.get("variables")
        return tuple(names) if isinstance(names, list) and len(names) > 1 else ("x",)

    @property
    def plot_extras(self) -> dict[str, Any]:
        """What the snapshot pages draw beyond one x (`rundir.writer.plot_extras`)."""
        extras: dict[str, Any] = {}
        if len(self.variables) > 1:
            extras["variables"] = self.variables
        if self.left_out is not None:
            extras["left_out"] = self.left_out
        return extras

    left_out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def components(self) -> list[str]:
        """The model's components' texts (summary.json's `components`; [] for none)."""
        return list(self.summary.get("components") or [])

    @property
    def columns(self) -> dict[str, str]:
        """The data file's column names by role (summary.json's `columns`; {} for none)."""
        return dict(self.summary.get("columns") or {})

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)

    @property
    def final_params(self) -> tuple[int, dict[str, float]]:
        """Epoch and parameters of the final fit: the summary's once the run has ended and its
        values are finite, else the last snapshot's (a run still going)."""
        s = self.summary
        params = s.get("params") or {}
        finished = s["status"] != RunStatus.RUNNING
        if finished and all(_finite(params.get(n)) for n in self.names):
            return int(s.get("epochs_run") or 0), {n: float(params[n]) for n in self.names}
        if self.snapshots:
            last = self.snapshots[-1]
            return last.epoch, last.params
        return 0, {n: _num(params.get(n)) for n in self.names}


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: Any) -> float:
    """A stored number; JSON null (how NaN and infinity are stored) reads as NaN."""
    return float("nan") if v is None else float(v)


# -- reading -------------------------------------------------------------------------------------


def _read_text(run_dir: Path, rel: str, limit: int | None = None) -> str:
    return files.read_run_text(run_dir, rel, limit=limit)


def _read_json(run_dir: Path, rel: str) -> Any:
    return files.read_run_json(run_dir, rel)


def _read_csv(
    run_dir: Path, rel: str, *, header: list[str] | None = None, limit: int | None = None
) -> dict[str, np.ndarray]:
    """A numeric CSV with a header row, as columns. Every row must be complete and the file
    must end with a newline (the writers always end one), which catches truncation."""
    path = run_dir / rel
    text = _read_text(run_dir, rel, limit)
    if not text:
        raise RunFileError(f"{path}: empty (truncated?)")
    if not text.endswith("\n"):
        raise RunFileError(f"{path}: truncated (its last line is incomplete)")
    head, _, body = text.partition("\n")
    columns = head.split(",")
    if header is not None and columns != header:
        raise RunFileError(f"{path}: garbled header {_short(head)}; expected {','.join(header)}")
    if not body:
        raise RunFileError(f"{path}: has a header but no rows (truncated?)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            table = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, UserWarning) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunFileError(f"{path}: garbled or truncated rows ({reason})") from None
    if table.shape[1] != len(columns):
        raise RunFileError(
            f"{path}: rows have {table.shape[1]} values but the header names {len(columns)}"
        )
    return {c: table[:, k] for k, c in enumerate(columns)}


def _short(s: str, limit: int = 60) -> str:
    return repr(s if len(s) <= limit else s[:limit] + "...")


def _check_summary(run_dir: Path, s: Any) -> dict:
    path = run_dir / files.SUMMARY
    if not isinstance(s, dict):
        raise RunFileError(f"{path}: garbled (expected a JSON object)")
    problems = []
    for key, kind in (
        ("name", str),
        ("status", str),
        ("epochs", int),
        ("epochs_run", int),
        ("params", dict),
    ):
        if key not in s:
            problems.append(f"no {key!r}")
        elif not isinstance(s[key], kind) or isinstance(s[key], bool):
            problems.append(f"{key!r} is {_short(str(s[key]))}, not {kind.__name__}")
    if not problems and s["status"] not in STATUSES:
        problems.append(f"status {_short(s['status'])} is not one of {', '.join(STATUSES)}")
    if not problems:
        for k, v in s["params"].items():
            if v is not None and not _finite(v) and not isinstance(v, float):
                problems.append(f"parameter {k!r} is {_short(str(v))}, not a number")
        err = s.get("stderr")
        if err is not None and not isinstance(err, dict):
            problems.append("'stderr' is not an object")
        parts = s.get("components")
        if parts is not None and (
            not isinstance(parts, list) or not all(isinstance(c, str) for c in parts)
        ):
            problems.append("'components' is not a list of texts")
        cols = s.get("columns")
        if cols is not None and (
            not isinstance(cols, dict) or not all(isinstance(c, str) for c in cols.values())
        ):
            problems.append("'columns' is not an object of texts")
    if problems:
        raise RunFileError(f"{path}: garbled ({'; '.join(problems)})")
    return s


def _check_config(run_dir: Path, summary: dict) -> tuple[str, Any]:
    from fitcli.config import load_config
    from fitcli.errors import ConfigError

    path = run_dir / files.CONFIG
    text = _read_text(run_dir, files.CONFIG)  # missing / unreadable / not UTF-8
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        first = exc.problems[0] if exc.problems else str(exc)
        more = f" (and {len(exc.problems) - 1} more problems)" if len(exc.problems) > 1 else ""
        raise RunFileError(
            f"{path}: not a valid fitcli config (truncated or garbled?): {first}{more}"
        ) from None
    for key in ("name", "epochs", "seed", "loss", "dtype"):
        if key in summary and getattr(cfg, key) != summary[key]:
            raise RunFileError(
                f"{path}: {key} is {getattr(cfg, key)!r} but {files.SUMMARY} says "
                f"{summary[key]!r} (truncated, garbled or from another run?)"
            )
    return text, cfg


def _check_snapshots(
    run_dir: Path, raw: Any, names: list[str], run_epochs: int
) -> tuple[list[str], list[dict]]:
    """The snapshot list, each entry naming its own epoch's page and curve (epoch-N, N its
    epoch, at most the run's `run_epochs`), at most MAX_SNAPSHOTS of them: what it makes the report
    draw is bounded by what the run could have written."""
    path = run_dir / files.SNAPSHOT_PARAMS
    bad = f"{path}: garbled"
    if not isinstance(raw, dict) or not isinstance(raw.get("names"), list):
        raise RunFileError(f"{bad} (expected an object with 'names' and 'snapshots')")
    if not isinstance(raw.get("snapshots"), list):
        raise RunFileError(f"{bad} (no 'snapshots' list)")
    if len(raw["snapshots"]) > MAX_SNAPSHOTS:
        raise RunFileError(
            f"{bad} ({len(raw['snapshots'])} snapshots, more than the {MAX_SNAPSHOTS} a fitcli "
            "run writes)"
        )
    got = raw["names"]
    if got != names:
        raise RunFileError(
            f"{bad}: parameter names {got!r} do not match {files.SUMMARY}'s {names!r}"
        )
    entries = []
    for k, e in enumerate(raw["snapshots"]):
        where = f"{bad} (snapshot #{k}"
        if not isinstance(e, dict):
            raise RunFileError(f"{where} is not an object)")
        epoch, loss, params, file = e.get("epoch"), e.get("loss"), e.get("params"), e.get("file")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise RunFileError(f"{where}: epoch {epoch!r} is not a whole number)")
        if epoch > run_epochs:
            raise RunFileError(f"{where}: epoch {epoch} is past the run's {run_epochs} epochs)")
        if loss is not None and not isinstance(loss, int | float):
            raise RunFileError(f"{where}: loss {_short(str(loss))} is not a number)")
        if not isinstance(params, dict) or list(params) != names:
            raise RunFileError(f"{where}: params do not name {', '.join(names)})")
        if any(v is not None and not isinstance(v, int | float) for v in params.values()):
            raise RunFileError(f"{where}: a parameter value is not a number)")
        # File names go into paths we write: only epoch-N.html / epoch-N.csv, never a path.
        page = _PAGE.match(file) if isinstance(file, str) else None
        if page is None or not isinstance(file, str):
            raise RunFileError(f"{where}: file {_short(str(file))} is not epoch-N.html)")
        if int(page.group(1)) != epoch:
            raise RunFileError(f"{where}: file {_short(file)} is not the page of epoch {epoch})")
        fit = e.get("fit", file.removesuffix(".html") + ".csv")
        curve = _FIT.match(fit) if isinstance(fit, str) else None
        if curve is None:
            raise RunFileError(f"{where}: fit {_short(str(fit))} is not epoch-N.csv)")
        if int(curve.group(1)) != epoch:
            raise RunFileError(f"{where}: fit {_short(fit)} is not the curve of epoch {epoch})")
        entries.append({**e, "fit": fit})
    epochs = [e["epoch"] for e in entries]
    if epochs != sorted(set(epochs)):
        raise RunFileError(f"{bad} (snapshot epochs {epochs} are not increasing)")
    return got, entries


def _x_columns(summary: dict) -> list[str]:
    """The x columns of a run's data: the variables' names (several), else x."""
    variables = summary.get("variables")
    return list(variables) if isinstance(variables, list) and len(variables) > 1 else ["x"]


def read_data(run_dir: Path, summary: dict, cfg: Any = None) -> dict[str, np.ndarray]:
    """The observations of a run directory, whichever way it holds them: data.npz, data.csv,
    or (a large data file not copied) the file its summary.json's `data_file` names, checked
    against the size and digest recorded there and read with the run's `cfg` (its config.yaml
    when None). Columns x, y, then y_true and sigma where the run has them, float64, as many
    rows as the summary's `n_points`; any fault is a RunFileError naming the file (exit 2)."""
    run_dir = Path(run_dir)
    n = summary.get("n_points")
    rows = n if isinstance(n, int) and 0 <= n <= 10**8 else 10**8
    if os.path.lexists(run_dir / files.DATA_NPZ):
        where = run_dir / files.DATA_NPZ
        data = _read_npz(run_dir, rows)
    elif summary.get("data_file") is not None and not os.path.lexists(run_dir / files.DATA):
        if cfg is None:
            cfg = _check_config(run_dir, summary)[1]
        where, data = _read_data_file(run_dir, summary, cfg)
    else:
        where = run_dir / files.DATA
        x_cols = _x_columns(summary)
        data = _read_csv(run_dir, files.DATA, limit=files.csv_limit(rows, 3 + len(x_cols)))
    x_cols = _x_columns(summary)
    k = len(x_cols)
    cols = list(data)
    if cols[: k + 1] != [*x_cols, "y"] or any(c not in ("y_true", "sigma") for c in cols[k + 1 :]):
        expected = ",".join([*x_cols, "y"])
        raise RunFileError(f"{where}: garbled header {','.join(cols)!r}; expected {expected},...")
    if k > 1:  # several variables: x is their n x k table
        data["x"] = np.column_stack([data[c] for c in x_cols])
    if isinstance(n, int) and len(data["x"]) != n:
        raise RunFileError(
            f"{where}: has {len(data['x'])} rows but {files.SUMMARY} says {n} points (truncated?)"
        )
    return data


def _read_npz(run_dir: Path, rows: int) -> dict[str, np.ndarray]:
    """data.npz: 1-D float64 arrays named by `files.DATA_COLUMNS`, in that order, never pickles."""
    import zipfile

    path = run_dir / files.DATA_NPZ
    cols = len(files.DATA_COLUMNS)
    raw = files.read_run_file(run_dir, files.DATA_NPZ, limit=65536 + rows * cols * 8)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            names = list(archive.files)
            data = {k: archive[k] for k in names if k in files.DATA_COLUMNS}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunFileError(f"{path}: garbled or truncated ({reason})") from None
    order = [c for c in files.DATA_COLUMNS if c in names]
    if names != order or len(set(len(v) for v in data.values() if v.ndim == 1)) != 1:
        raise RunFileError(
            f"{path}: garbled (holds {', '.join(names) or 'nothing'}; expected columns x, y "
            "and optionally y_true, sigma, of one length)"
        )
    for k, v in data.items():
        if v.ndim != 1 or v.dtype != np.float64:
            raise RunFileError(f"{path}: garbled (column {k} is {v.dtype} of shape {v.shape})")
    return data


def _read_data_file(run_dir: Path, summary: dict, cfg: Any) -> tuple[Path, dict]:
    """The data file a run read and did not copy, if it is still the one it read."""
    from fitcli.data import load_table
    from fitcli.errors import DataError

    path, what = _referenced_file(run_dir, summary)
    digest = summary["data_digest"]
    changed = f"{what}: changed since the run read it"
    try:
        ds = load_table(path, cfg.data.columns)
    except DataError as exc:
        raise RunFileError(f"{changed}: {exc}") from None
    if ds.digest != digest:
        raise RunFileError(f"{changed} (its digest is not the {digest} recorded)")
    return path, files.data_columns(ds.x, ds.y, None, ds.sigma)


def read_run(run_dir: Path) -> Run:
    """Read and validate a run directory; a fault names its file (RunFileError, exit 2).

    What a run still going has not written yet (metrics.csv, snapshots) is allowed to be absent.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a directory"
        raise RunFileError(f"{run_dir}: {what}; expected a fitcli run directory")
    summary = _check_summary(run_dir, files.read_summary(run_dir))
    if "groups" in summary:
        raise RunFileError(
            f"{run_dir}: a grouped run ({summary['groups']} groups); predict, ci, comparison "
            f"pages and --format figures take single runs (`fitcli plot {run_dir}` rebuilds "
            "its report; each group's values and errors are in its groups.csv)"
        )
    status = summary["status"]
    names = list(summary["params"])
    config_text, cfg = _check_config(run_dir, summary)
    notes: list[str] = []

    data = read_data(run_dir, summary, cfg)
    x_cols = _x_columns(summary)
    k = len(x_cols)

    snapshots: list[Snapshot] = []
    # A run stopped (or failed) before its first snapshot has none, like one still starting.
    if (run_dir / files.SNAPSHOT_PARAMS).exists() or status in (
        RunStatus.COMPLETED,
        RunStatus.DIVERGED,
    ):
        raw = _read_json(run_dir, files.SNAPSHOT_PARAMS)
        _, entries = _check_snapshots(run_dir, raw, names, summary["epochs"])
        parts = summary.get("components") or []
        fit_header = [*x_cols, "y_fit", *(files.component_column(k) for k in range(len(parts)))]
        # Several variables: the fit at the data points, as many rows as data.csv.
        fit_rows = files.FIT_GRID if k == 1 else len(data["y"])
        for e in entries:
            rel = f"{files.SNAPSHOTS}/{e['fit']}"
            if not (run_dir / rel).exists():
                raise RunFileError(
                    f"{run_dir / rel}: missing (the fitted curve of snapshot epoch {e['epoch']}; "
                    "runs trained before fitcli stored fitted curves cannot be rebuilt)"
                )
            # A model of many terms has as many columns: the bound grows with them (never below
            # other snapshot files', so that a curve of too many points is named as such).
            limit = max(files.SNAPSHOT_LIMIT, files.csv_limit(fit_rows, len(fit_header)))
            fit = _read_csv(run_dir, rel, header=fit_header, limit=limit)
            if k > 1:
                fit["x"] = np.column_stack([fit[c] for c in x_cols])
            if len(fit["x"]) > fit_rows:
                raise RunFileError(
                    f"{run_dir / rel}: {len(fit['x'])} points, more than the {files.FIT_GRID} of "
                    "a fitted curve fitcli draws"
                )
            snapshots.append(
                Snapshot(
                    epoch=e["epoch"],
                    loss=_num(e["loss"]),
                    params={k: _num(v) for k, v in e["params"].items()},
                    file=e["file"],
                    fit_file=e["fit"],
                    x_fit=fit["x"],
                    y_fit=fit["y_fit"],
                    note=e["note"] if isinstance(e.get("note"), str) else None,
                    components=[fit[c] for c in fit_header[k + 1 :]],
                )
            )
    else:
        notes.append(
            "no snapshot yet: the run is still starting"
            if status == RunStatus.RUNNING
            else f"no snapshot was written (status {status})"
        )

    metrics = None
    if (run_dir / files.METRICS).exists() or status in (RunStatus.COMPLETED, RunStatus.DIVERGED):
        header = ["epoch", "loss", "lr", "elapsed_s", *names]
        limit = files.csv_limit(max(summary["epochs"], summary["epochs_run"]), len(header))
        metrics = _read_csv(run_dir, files.METRICS, header=header, limit=limit)
        m_path = run_dir / files.METRICS
        ep = metrics["epoch"]
        if np.any(np.diff(ep) <= 0) or np.any(ep != np.round(ep)):
            raise RunFileError(f"{m_path}: garbled (epochs are not increasing whole numbers)")
        last = int(ep[-1])
        runs_to = summary["epochs_run"]
        if (
            status in (RunStatus.COMPLETED, RunStatus.DIVERGED)
            or (status == RunStatus.INTERRUPTED and runs_to)
        ) and (last != runs_to):
            raise RunFileError(
                f"{m_path}: ends at epoch {last} but {files.SUMMARY} says {runs_to} epochs ran "
                "(truncated?)"
            )
    else:
        notes.append(
            f"{files.METRICS} is not written yet (status {status}): no loss curve or parameter "
            "trajectories"
        )
    left_out = _read_left_out(run_dir, x_cols)[:3] if (run_dir / files.LEFT_OUT).exists() else None
    bands = _read_bands(run_dir, summary, data["x"])
    return Run(
        run_dir,
        summary,
        config_text,
        cfg,
        data,
        names,
        snapshots,
        metrics,
        notes,
        bands=bands,
        left_out=left_out,
    )


def _read_left_out(
    run_dir: Path, x_cols: list[str], grouped: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """left_out.csv (`files.write_left_out_csv`): x (n x k for several variables), y, reason,
    and with `grouped` each row's group (else None)."""
    import csv

    path = run_dir / files.LEFT_OUT
    lines = _read_text(run_dir, files.LEFT_OUT, None).splitlines()
    header = [*x_cols, "y", "reason", *(["group"] if grouped else [])]
    if not lines or lines[0].split(",") != header:
        raise RunFileError(f"{path}: garbled header; expected {','.join(header)}")
    width = len(x_cols) + 1
    values, reasons, groups = [], [], []
    for lineno, cells in enumerate(csv.reader(lines[1:]), start=2):
        try:
            if len(cells) != len(header) or cells[width] not in ("nan", "range"):
                raise ValueError
            values.append([float(c) for c in cells[:width]])
        except ValueError:
            raise RunFileError(f"{path} line {lineno}: garbled row") from None
        reasons.append(cells[width])
        groups.append(cells[-1])
    table = np.array(values, dtype=np.float64).reshape(-1, width)
    k = len(x_cols)
    x = table[:, 0] if k == 1 else table[:, :k]
    group = np.array(groups, dtype=object) if grouped else None
    return x, table[:, k], np.array(reasons), group


def _read_bands(run_dir: Path, summary: dict, x: np.ndarray) -> dict[str, Any] | None:
    """bands.csv (and bands_data.csv) as summary.json's `bands` describes them, checked: the
    columns its levels name, at most FIT_GRID rows (bands_data.csv, and bands.csv of a model of
    several variables: one per data point, the data's `x`)."""
    n = len(x)
    from fitcli import bands

    record = summary.get("bands")
    if not isinstance(record, dict) or record.get("file") != files.BANDS:
        return None
    where = f"{run_dir / files.SUMMARY}: garbled (bands"
    levels = record.get("levels")
    if (
        not isinstance(levels, list)
        or not 0 < len(levels) <= bands.MAX_LEVELS
        or not all(_finite(v) and 0 < v < 1 for v in levels)
    ):
        raise RunFileError(f"{where}.levels is not a list of levels between 0 and 1)")
    prediction = record.get("prediction")
    if prediction not in (files.BANDS, files.BANDS_DATA, None):
        raise RunFileError(f"{where}.prediction {_short(str(prediction))} is not a bands file)")
    variables = summary.get("variables")
    if isinstance(variables, list) and len(variables) > 1:
        return _read_point_bands(run_dir, record, levels, [str(v) for v in variables], x)
    header = ["x", "fit", *bands.column_names(levels, prediction=prediction == files.BANDS)]
    limit = files.csv_limit(files.FIT_GRID, len(header))
    grid = _read_csv(run_dir, files.BANDS, header=header, limit=limit)
    if len(grid["x"]) > files.FIT_GRID:
        raise RunFileError(
            f"{run_dir / files.BANDS}: {len(grid['x'])} rows, more than the {files.FIT_GRID} "
            "of the grid fitcli writes the bands on"
        )
    points = None
    if prediction == files.BANDS_DATA:
        header = ["x", "fit", *bands.column_names(levels)]
        limit = files.csv_limit(n, len(header))
        points = _read_csv(run_dir, files.BANDS_DATA, header=header, limit=limit)
        if len(points["x"]) != n:
            raise RunFileError(
                f"{run_dir / files.BANDS_DATA}: has {len(points['x'])} rows but "
                f"{files.DATA} has {n} (truncated?)"
            )
    return bands.band_set(grid, levels, points)


def _read_point_bands(
    run_dir: Path, record: dict, levels: list, variables: list[str], x: np.ndarray
) -> dict[str, Any]:
    """bands.csv of a model of several variables: the variables' columns, fit and the bands at
    the data points, one row per row of the data (the same points, checked)."""
    from fitcli import bands

    path = run_dir / files.BANDS
    if record.get("prediction") != files.BANDS:
        raise RunFileError(
            f"{run_dir / files.SUMMARY}: garbled (bands.prediction of a model of several "
            f"variables is {files.BANDS})"
        )
    header = bands.file_header(variables, levels)
    table = _read_csv(
        run_dir, files.BANDS, header=header, limit=files.csv_limit(len(x), len(header))
    )
    at = np.column_stack([table[v] for v in variables])
    if at.shape != x.shape or not np.array_equal(at, x):
        raise RunFileError(
            f"{path}: its points are not those of {files.DATA} ({len(at)} rows for "
            f"{len(x)}; from another run?)"
        )
    return bands.band_set(table, levels)


def check_plotly_js(path: Path) -> None:
    """An existing plotly.min.js must be a whole plotly.js (a damaged one breaks every page)."""
    src = files.plotly_js_source()
    got = files.read_run_file(path.parent, path.name)
    want = src.read_bytes()
    if got == want:
        return
    version = re.match(rb"/\*\*?\s*\n?\*?\s*plotly\.js v([0-9][0-9.]*)", got[:200])
    mine = re.match(rb"/\*\*?\s*\n?\*?\s*plotly\.js v([0-9][0-9.]*)", want[:200])
    if version is None or (mine is not None and version.group(1) == mine.group(1)):
        raise RunFileError(
            f"{path}: truncated or garbled (it is not the plotly.js it claims to be); delete it "
            "and run fitcli plot again to restore it"
        )
    # Another plotly.js version, whole: keep it (written by another fitcli install).


def summary_problem(summary: Any) -> str | None:
    """Why a summary.json cannot be listed (or trusted as a finished sweep run), or None: the
    fields a listing shows must have the types fitcli writes (numbers finite or null)."""
    if not isinstance(summary, dict):
        return f"{files.SUMMARY} is not a JSON object"

    def number(v: Any) -> bool:
        return type(v) in (int, float) and math.isfinite(v)

    checks = {
        "name": lambda v: isinstance(v, str),
        "status": lambda v: isinstance(v, str),
        "reason": lambda v: isinstance(v, str),
        "epochs_run": lambda v: type(v) is int and v >= 0,
        "exit_code": lambda v: type(v) is int,
        "final_loss": number,
        "elapsed_s": lambda v: number(v) and v >= 0,
        "params": lambda v: isinstance(v, dict),
    }
    for key, ok in checks.items():
        value = summary.get(key)
        if value is not None and not ok(value):
            return f"{files.SUMMARY}: {key} is {_short_json(value)}, not what fitcli writes"
    for name, value in (summary.get("params") or {}).items():
        if value is not None and not number(value):
            return f"{files.SUMMARY}: params.{name} is {_short_json(value)}, not a finite number"
    return None


def _short_json(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# -- grouped runs --------------------------------------------------------------------------------


@dataclass
class GroupedRun:
    """What `fitcli plot` reads back of a grouped run: its summary, config, observations (with
    each row's group) and groups.csv's rows (typed as the run wrote them)."""

    path: Path
    summary: dict
    cfg: Any
    dataset: Any  # fitcli.data.Dataset, group and group_labels set
    rows: list[dict]
    config_text: str = ""  # config.yaml as the run wrote it


def is_grouped(run_dir: Path) -> bool:
    """Whether a run directory holds a grouped run (its summary.json counts groups)."""
    summary = files.read_summary(Path(run_dir))
    return isinstance(summary, dict) and "groups" in summary


def read_grouped(run_dir: Path) -> GroupedRun:
    """A grouped run's data (data.csv: its variables, y, sigma and group columns; or the large
    data file summary.json's `data_file` names, not copied), groups.csv and config; a missing,
    truncated, garbled or changed file is a RunFileError naming it (exit 2)."""
    run_dir = Path(run_dir)
    summary = files.read_summary(run_dir)
    config_text, cfg = _check_config(run_dir, summary)
    x_cols = _x_columns(summary)
    referenced = summary.get("data_file") is not None and not os.path.lexists(run_dir / files.DATA)
    groups = _read_frame(run_dir, "groups.csv")
    per = summary.get("per_group_params")
    if not isinstance(per, list):
        raise RunFileError(f"{run_dir / files.SUMMARY}: no per_group_params list")
    columns = ["group", "status", "reason", "iterations", "n_points", "loss", "rss"]
    _need_columns(
        run_dir / "groups.csv", groups, columns + [c for n in per for c in (n, f"{n}_stderr")]
    )
    labels = tuple(groups["group"].tolist())
    if len(set(labels)) != len(labels):
        raise RunFileError(f"{run_dir / 'groups.csv'}: a group appears twice (garbled?)")
    try:
        rows = [
            {
                **{c: str(r[c]) for c in ("group", "status", "reason")},
                "iterations": int(r["iterations"]),
                "n_points": int(r["n_points"]),
                **{c: float(r[c]) for c in groups.columns if c not in columns[:5]},
            }
            for r in groups.to_dict("records")
        ]
    except (TypeError, ValueError) as exc:
        raise RunFileError(f"{run_dir / 'groups.csv'}: holds a non-number ({exc})") from None
    if referenced:
        dataset = _read_grouped_file(run_dir, summary, cfg, labels)  # its left_out as read
    else:
        dataset = _read_grouped_csv(run_dir, x_cols, labels)
        if (run_dir / files.LEFT_OUT).exists():
            from fitcli.data import LeftOut

            dataset.left_out = LeftOut(*_read_left_out(run_dir, x_cols, grouped=True))
    return GroupedRun(run_dir, summary, cfg, dataset, rows, config_text)


def _read_frame(run_dir: Path, rel: str) -> Any:
    """A CSV file of the run directory as a pandas frame, its label columns as text."""
    import pandas as pd

    path = run_dir / rel
    text = _read_text(run_dir, rel)
    if not text.endswith("\n"):
        raise RunFileError(f"{path}: truncated (its last line is incomplete)")
    try:
        text_cols = ["group", "status", "reason"]
        return pd.read_csv(
            io.StringIO(text), dtype={c: str for c in text_cols}, keep_default_na=False
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise RunFileError(f"{path}: garbled ({exc})") from None


def _need_columns(path: Path, frame: Any, cols: list[str]) -> None:
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise RunFileError(f"{path}: no column {missing[0]!r} (garbled?)")


def _read_grouped_csv(run_dir: Path, x_cols: list[str], labels: tuple[str, ...]) -> Any:
    """data.csv of a grouped run as its `Dataset`, each row's group checked against groups.csv."""
    from fitcli.data import Dataset

    data = _read_frame(run_dir, files.DATA)
    _need_columns(run_dir / files.DATA, data, [*x_cols, "y", "group"])
    index = {label: k for k, label in enumerate(labels)}
    codes = data["group"].map(index)
    if codes.isna().any():
        raise RunFileError(
            f"{run_dir / files.DATA}: its group labels are not groups.csv's (garbled?)"
        )
    try:
        numbers = {c: data[c].to_numpy(dtype=np.float64) for c in [*x_cols, "y"]}
        sigma = data["sigma"].to_numpy(dtype=np.float64) if "sigma" in data.columns else None
    except (TypeError, ValueError) as exc:
        raise RunFileError(f"{run_dir / files.DATA}: holds a non-number ({exc})") from None
    x = numbers[x_cols[0]] if len(x_cols) == 1 else np.column_stack([numbers[c] for c in x_cols])
    return Dataset(
        x,
        numbers["y"],
        sigma=sigma,
        source=str(run_dir / files.DATA),
        variables=tuple(x_cols) if len(x_cols) > 1 else ("x",),
        group=codes.to_numpy(dtype=np.int64),
        group_labels=labels,
    )


def _read_grouped_file(run_dir: Path, summary: dict, cfg: Any, labels: tuple[str, ...]) -> Any:
    """The large data file a grouped run read and did not copy, read again as the run read it
    (its config's data section), if it is still the one it read and its groups are
    groups.csv's."""
    from fitcli.data import make_dataset
    from fitcli.errors import ConfigError, DataError

    path, what = _referenced_file(run_dir, summary)
    try:
        ds = make_dataset(cfg)
    except (DataError, ConfigError) as exc:
        raise RunFileError(f"{what}: changed since the run read it: {exc}") from None
    if ds.digest != summary.get("data_digest"):
        raise RunFileError(
            f"{what}: changed since the run read it (its digest is not the "
            f"{summary.get('data_digest')} recorded)"
        )
    if ds.group_labels is None or tuple(str(g) for g in ds.group_labels) != labels:
        raise RunFileError(f"{run_dir / 'groups.csv'}: its groups are not {path}'s (garbled?)")
    return ds


def _referenced_file(run_dir: Path, summary: dict) -> tuple[Path, str]:
    """The path summary.json's `data_file` names, present and of the size recorded, and the
    words that name it in messages."""
    ref, digest = summary.get("data_file"), summary.get("data_digest")
    if (
        not isinstance(ref, dict)
        or not isinstance(ref.get("path"), str)
        or type(ref.get("size")) is not int
        or not isinstance(digest, str)
    ):
        raise RunFileError(
            f"{run_dir / files.SUMMARY}: garbled (data_file and data_digest do not name a file, "
            "its size and digest)"
        )
    path = Path(ref["path"])
    what = f"{path}, the data file of {run_dir} (not copied into it; {files.SUMMARY} names it)"
    if not path.is_file():
        raise RunFileError(f"{what}: missing; put it back where it was to read this run")
    size = path.stat().st_size
    if size != ref["size"]:
        raise RunFileError(
            f"{what}: changed since the run read it ({size} bytes, the run read {ref['size']})"
        )
    return path, what
