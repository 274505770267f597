"""`fitcli plot`: rebuild a run's snapshot pages and write its report, or compare several runs.

Three layers: `read_run` reads and validates every file of a run directory (any fault becomes a
`RunFileError` naming the file, exit 2); `snapshot_pages`, `report_page` and `compare_page` are
pure functions of what was read; `write_report` and `write_compare` write at the edge, only
report.html / the comparison page and snapshots/*.html (plus plotly.min.js when it is missing).

Snapshot pages are rebuilt from data.csv, snapshots/params.json and the fitted curve stored next
to each page (snapshots/epoch-N.csv): re-evaluating the model could not reproduce the curve bit
for bit on another device, in float32 or through the bounds' transforms, so the curve is stored.
"""

from __future__ import annotations

import html
import io
import math
import os
import re
import urllib.parse
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fitcli import liveness, plots
from fitcli.errors import RunFileError
from fitcli.rundir import files

STATUSES = ("running", "completed", "diverged", "interrupted", "failed")
REPORT = files.REPORT
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

    @property
    def name(self) -> str:
        return str(self.summary["name"])

    @property
    def status(self) -> str:
        """The recorded status, or `stale` for a run whose writer is gone (`liveness`)."""
        return liveness.status_of(self.summary)

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)

    @property
    def final_params(self) -> tuple[int, dict[str, float]]:
        """Epoch and parameters of the final fit: the summary's once the run has ended and its
        values are finite, else the last snapshot's (a run still going)."""
        s = self.summary
        params = s.get("params") or {}
        finished = s["status"] != "running"
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
        if page is None:
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


def read_run(run_dir: Path) -> Run:
    """Read and validate a run directory; a fault names its file (RunFileError, exit 2).

    What a run still going has not written yet (metrics.csv, snapshots) is allowed to be absent.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "does not exist" if not run_dir.exists() else "is not a directory"
        raise RunFileError(f"{run_dir}: {what}; expected a fitcli run directory")
    summary = _check_summary(run_dir, files.read_summary(run_dir))
    status = summary["status"]
    names = list(summary["params"])
    config_text, cfg = _check_config(run_dir, summary)
    notes: list[str] = []

    n = summary.get("n_points")
    rows = n if isinstance(n, int) and 0 <= n <= 10**8 else 10**8
    data = _read_csv(run_dir, files.DATA, limit=files.csv_limit(rows, 4))
    data_path = run_dir / files.DATA
    cols = list(data)
    if cols[:2] != ["x", "y"] or any(c not in ("y_true", "sigma") for c in cols[2:]):
        raise RunFileError(f"{data_path}: garbled header {','.join(cols)!r}; expected x,y,...")
    if isinstance(n, int) and len(data["x"]) != n:
        raise RunFileError(
            f"{data_path}: has {len(data['x'])} rows but {files.SUMMARY} says {n} points "
            "(truncated?)"
        )

    snapshots: list[Snapshot] = []
    # A run stopped (or failed) before its first snapshot has none, like one still starting.
    if (run_dir / files.SNAPSHOT_PARAMS).exists() or status in ("completed", "diverged"):
        raw = _read_json(run_dir, files.SNAPSHOT_PARAMS)
        _, entries = _check_snapshots(run_dir, raw, names, summary["epochs"])
        for e in entries:
            rel = f"{files.SNAPSHOTS}/{e['fit']}"
            if not (run_dir / rel).exists():
                raise RunFileError(
                    f"{run_dir / rel}: missing (the fitted curve of snapshot epoch {e['epoch']}; "
                    "runs trained before fitcli stored fitted curves cannot be rebuilt)"
                )
            fit = _read_csv(run_dir, rel, header=["x", "y_fit"])
            if len(fit["x"]) > files.FIT_GRID:
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
                )
            )
    else:
        notes.append(
            "no snapshot yet: the run is still starting"
            if status == "running"
            else f"no snapshot was written (status {status})"
        )

    metrics = None
    if (run_dir / files.METRICS).exists() or status in ("completed", "diverged"):
        header = ["epoch", "loss", "lr", "elapsed_s", *names]
        limit = files.csv_limit(max(summary["epochs"], summary["epochs_run"]), len(header))
        metrics = _read_csv(run_dir, files.METRICS, header=header, limit=limit)
        m_path = run_dir / files.METRICS
        ep = metrics["epoch"]
        if np.any(np.diff(ep) <= 0) or np.any(ep != np.round(ep)):
            raise RunFileError(f"{m_path}: garbled (epochs are not increasing whole numbers)")
        last = int(ep[-1])
        runs_to = summary["epochs_run"]
        if (status in ("completed", "diverged") or (status == "interrupted" and runs_to)) and (
            last != runs_to
        ):
            raise RunFileError(
                f"{m_path}: ends at epoch {last} but {files.SUMMARY} says {runs_to} epochs ran "
                "(truncated?)"
            )
    else:
        notes.append(
            f"{files.METRICS} is not written yet (status {status}): no loss curve or parameter "
            "trajectories"
        )
    return Run(run_dir, summary, config_text, cfg, data, names, snapshots, metrics, notes)


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


# -- pure page builders ------------------------------------------------------------------------


def snapshot_pages(run: Run, plotlyjs: str) -> dict[str, str]:
    """Every snapshot page by file name, exactly as training wrote them."""
    d, epochs, loss_name = run.data, int(run.summary["epochs"]), run.cfg.loss
    return {
        s.file: plots.snapshot_page(
            name=run.name if s.note is None else f"{run.name} ({s.note})",
            epoch=s.epoch,
            epochs=epochs,
            loss=s.loss,
            params=s.params,
            x=d["x"],
            y=d["y"],
            y_true=d.get("y_true"),
            x_fit=s.x_fit,
            y_fit=s.y_fit,
            loss_name=loss_name,
            plotlyjs=plotlyjs,
        )
        for s in run.snapshots
    }


def residuals(run: Run) -> tuple[int, np.ndarray] | None:
    """Epoch and y - fit of the final fit at every data point, the model rebuilt from
    config.yaml and evaluated in float64 (None when no parameter is known yet)."""
    epoch, params = run.final_params
    if not params or not all(math.isfinite(v) for v in params.values()):
        return None
    from fitcli.torchboot import import_torch

    torch = import_torch()
    from fitcli.model import build_model

    model = build_model(run.cfg.model, 0, torch.float64)
    if list(model.names) != run.names:
        raise RunFileError(
            f"{run.path / files.CONFIG}: its model has parameters {list(model.names)} but "
            f"{files.SUMMARY} has {run.names} (from another run?)"
        )
    full = torch.tensor([params[n] for n in run.names], dtype=torch.float64)
    x = torch.as_tensor(run.data["x"], dtype=torch.float64)
    with torch.no_grad():
        fit = model.predict_full(full, x).reshape(-1).expand(x.shape).numpy()
    return epoch, run.data["y"] - fit


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _g(value: Any, digits: int = 8) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:.{digits}g}"
    return _e(value)


def _summary_rows(run: Run) -> list[tuple[str, str]]:
    s = run.summary
    elapsed = s.get("elapsed_s")
    time_text = f"{elapsed:.2f} s" if isinstance(elapsed, int | float) else "-"
    if s.get("started_at"):
        time_text += f", started {_e(s['started_at'])}"
    if s.get("finished_at"):
        time_text += f", finished {_e(s['finished_at'])}"
    rows = [
        ("status", f'<span class="status {_e(run.status)}">{_e(run.status)}</span>'),
        ("epochs", f"{_g(s.get('epochs_run'))} of {_g(s.get('epochs'))}"),
        ("final loss", f"{_g(s.get('final_loss'))} ({_e(s.get('loss', run.cfg.loss))})"),
        ("optimizer", _e(s.get("optimizer", "-"))),
        ("device", _e(s.get("device", "-"))),
        ("dtype", _e(s.get("dtype", "-"))),
        ("seed", _e(s.get("seed", "-"))),
        ("points", _g(s.get("n_points"))),
        ("time", time_text),
    ]
    if s.get("reason"):
        rows.append(("stopped", _e(s["reason"])))
    elif run.status == liveness.STALE:
        rows.append(
            (
                "stopped",
                f"{_e(liveness.describe(s.get('process')))} is gone without finishing it; "
                "<code>fitcli train --resume</code> continues it",
            )
        )
    return rows


def _params_table(run: Run) -> str:
    s = run.summary
    err = s.get("stderr") or {}
    has_err = any(v is not None for v in err.values())
    head = "<tr><th>parameter</th><th>value</th>" + ("<th>± stderr</th>" if has_err else "")
    body = []
    for n in run.names:
        cells = f"<td>{_e(n)}</td><td class=num>{_g(s['params'].get(n))}</td>"
        if has_err:
            cells += f"<td class=num>{_g(err.get(n), 3)}</td>"
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="params">{head}</tr>{"".join(body)}</table>'


_CSS = """
body{font-family:sans-serif;margin:0;background:#fafafa;color:#222}
main{max-width:1200px;margin:auto;padding:1em 2em}
section{background:white;border:1px solid #e5e5e5;border-radius:6px;margin:1em 0;padding:.5em 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin:.4em 0}
table{border-collapse:collapse;margin:.5em 0}
td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f5f5f5;padding:.8em;overflow:auto;white-space:pre-wrap}
.status{font-weight:bold}.completed{color:#1a7f37}.diverged,.failed{color:#cf222e}
.interrupted,.running,.stale{color:#9a6700}.note{color:#9a6700}
.cols{display:flex;gap:2em;flex-wrap:wrap}
"""


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head><meta charset="utf-8">'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body><main>\n"
        f"{body}\n</main></body>\n</html>\n"
    )


class _Figures:
    """Hands out plotly.js with the first figure of a page only (one plotly.js per page)."""

    def __init__(self, include: str) -> None:
        self.include: str | bool = include

    def __call__(self, fig: dict, div_id: str, height: int = 480) -> str:
        out = plots.fragment(fig, self.include, div_id=div_id, height=height)
        self.include = False
        return out


def report_page(run: Run, plotlyjs_src: str, snapshot_href: str = "snapshots/") -> str:
    """report.html of one run: fit over time, loss, parameters, residuals, summary, config."""
    fig = _Figures(plotlyjs_src)
    s = run.summary
    parts = [f"<h1>{_e(run.name)}: fitcli report</h1>"]
    parts += [f'<p class="note">{_e(n)}</p>' for n in run.notes]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in _summary_rows(run))
    parts.append(
        '<section id="summary"><h2>Summary</h2><div class="cols">'
        f'<table class="summary">{rows}</table>{_params_table(run)}</div></section>'
    )
    d = run.data
    if run.snapshots:
        anim = plots.fit_animation_figure(
            name=run.name,
            epochs=int(s["epochs"]),
            loss_name=run.cfg.loss,
            x=d["x"],
            y=d["y"],
            y_true=d.get("y_true"),
            snapshots=[
                {"epoch": p.epoch, "loss": p.loss, "x_fit": p.x_fit, "y_fit": p.y_fit}
                for p in run.snapshots
            ],
        )
        links = " ".join(
            f'<a href="{_e(snapshot_href + p.file)}">{p.epoch}</a>' for p in run.snapshots
        )
        parts.append(
            '<section id="fit"><h2>Fit over time</h2>'
            + fig(anim, "fitcli-fit", 620)
            + f"<p>Snapshot pages by epoch: {links}</p></section>"
        )
    if run.metrics is not None:
        m = run.metrics
        lf = plots.loss_figure(
            epoch=m["epoch"],
            loss=m["loss"],
            loss_name=run.cfg.loss,
            snap_epochs=[p.epoch for p in run.snapshots],
            snap_losses=[p.loss for p in run.snapshots],
        )
        pf = plots.params_figure(epoch=m["epoch"], params={n: m[n] for n in run.names})
        parts.append('<section id="loss"><h2>Loss</h2>' + fig(lf, "fitcli-loss") + "</section>")
        parts.append(
            '<section id="params"><h2>Parameters</h2>' + fig(pf, "fitcli-params") + "</section>"
        )
    res = residuals(run)
    if res is not None:
        epoch, r = res
        rf = plots.residuals_figure(x=d["x"], residuals=r, epoch=epoch)
        parts.append(
            '<section id="residuals"><h2>Residuals</h2>'
            + fig(rf, "fitcli-residuals")
            + "</section>"
        )
    parts.append(
        '<section id="config"><h2>Config</h2>'
        f'<pre class="config">{_e(run.config_text)}</pre></section>'
    )
    return _page(f"{run.name} - fitcli report", "\n".join(parts))


def compare_page(runs: list[Run], plotlyjs_src: str) -> str:
    """Several runs side by side: loss curves and final fits overlaid, a table of parameters."""
    fig = _Figures(plotlyjs_src)
    labels = [r.label for r in runs]
    parts = [f"<h1>fitcli: {len(runs)} runs compared</h1>"]
    names: list[str] = []
    for r in runs:
        names += [n for n in r.names if n not in names]
    head = "".join(
        f"<th>{h}</th>" for h in ("run", "name", "status", "epochs", "final loss", *map(_e, names))
    )
    body = []
    for r, label in zip(runs, labels, strict=True):
        s = r.summary
        err = s.get("stderr") or {}
        cells = [
            _e(label),
            _e(r.name),
            f'<span class="status {_e(r.status)}">{_e(r.status)}</span>',
            f"{_g(s.get('epochs_run'))} of {_g(s.get('epochs'))}",
            f"{_g(s.get('final_loss'))} ({_e(s.get('loss', r.cfg.loss))})",
        ]
        for n in names:
            v = s["params"].get(n) if n in r.names else None
            e = err.get(n)
            cells.append(_g(v) + (f" ± {_g(e, 3)}" if e is not None else ""))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append(
        '<section id="table"><h2>Runs</h2>'
        f'<table class="runs"><tr>{head}</tr>{"".join(body)}</table></section>'
    )
    with_metrics = [
        {"label": label, "epoch": r.metrics["epoch"], "loss": r.metrics["loss"]}
        for r, label in zip(runs, labels, strict=True)
        if r.metrics is not None
    ]
    if with_metrics:
        lf = plots.compare_loss_figure(with_metrics)
        parts.append('<section id="loss"><h2>Loss</h2>' + fig(lf, "fitcli-loss") + "</section>")
    fits = [
        {
            "label": label,
            "x": r.data["x"],
            "y": r.data["y"],
            "epoch": r.snapshots[-1].epoch,
            "x_fit": r.snapshots[-1].x_fit,
            "y_fit": r.snapshots[-1].y_fit,
        }
        for r, label in zip(runs, labels, strict=True)
        if r.snapshots
    ]
    if fits:
        ff = plots.compare_fit_figure(fits)
        parts.append(
            '<section id="fits"><h2>Final fits</h2>' + fig(ff, "fitcli-fits", 560) + "</section>"
        )
    for r, label in zip(runs, labels, strict=True):
        parts.append(
            f"<section><h2>Config of {_e(label)}</h2>"
            f'<pre class="config">{_e(r.config_text)}</pre></section>'
        )
    return _page(f"fitcli: {len(runs)} runs compared", "\n".join(parts))


# -- writing at the edge -------------------------------------------------------------------------


def _href(target: Path, page_dir: Path) -> str:
    rel = os.path.relpath(target.resolve(), page_dir.resolve())
    return urllib.parse.quote(Path(rel).as_posix())


def _plotlyjs_for(page: Path, js_dir: Path, plotlyjs: str) -> str:
    """What the page's first figure includes; in directory mode, ensure js_dir has a good
    plotly.min.js (copied when missing, checked when present) and link to it."""
    if plotlyjs in ("embed", "cdn"):
        return plotlyjs
    js = js_dir / files.PLOTLY_JS
    if js.exists():
        check_plotly_js(js)
    else:
        files.copy_plotly_js(js_dir)
    return _href(js, page.parent)


@dataclass
class Written:
    """What `fitcli plot` wrote: the page and the snapshot pages rebuilt."""

    page: Path
    snapshots: list[Path]


def write_report(run_dir: Path, *, out: Path | None = None, plotlyjs: str = "directory") -> Written:
    """Rebuild a run's snapshot pages and write its report (default RUN_DIR/report.html).

    Everything is read, checked and built before the first byte is written.
    """
    run = read_run(Path(run_dir))
    page_path = Path(out) if out is not None else run.path / REPORT
    if plotlyjs == "directory":
        js = run.path / files.PLOTLY_JS
        if js.exists():
            check_plotly_js(js)
    pages = snapshot_pages(run, plotlyjs)
    files.check_output_file(page_path, "--out")
    src = _plotlyjs_for(page_path, run.path, plotlyjs)
    href = _href(run.path / files.SNAPSHOTS, page_path.parent) + "/"
    page = report_page(run, src, snapshot_href=href)
    written = []
    for fname, text in pages.items():
        files.atomic_write(run.path / files.SNAPSHOTS / fname, text)
        written.append(run.path / files.SNAPSHOTS / fname)
    files.atomic_write(page_path, page)
    return Written(page_path, written)


def write_compare(run_dirs: list[Path], out: Path, *, plotlyjs: str = "directory") -> Written:
    """One comparison page of several runs at `out` (plotly.min.js beside it in directory mode)."""
    runs = [read_run(Path(d)) for d in run_dirs]
    out = Path(out)
    files.check_output_file(out, "--out")
    src = _plotlyjs_for(out, out.parent, plotlyjs)
    files.atomic_write(out, compare_page(runs, src))
    return Written(out, [])
