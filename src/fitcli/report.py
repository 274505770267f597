"""`fitcli plot`: rebuild a run's snapshot pages and write its report, or compare several runs.

Three layers: `rundir.reader.read_run` reads and validates every file of a run directory (any
fault becomes a `RunFileError` naming the file, exit 2); `snapshot_pages`, `report_page` and
`compare_page` are pure functions of what was read; `write_report` and `write_compare` write at
the edge, only report.html / the comparison page and snapshots/*.html (plus plotly.min.js when
it is missing).

Snapshot pages are rebuilt from data.csv, snapshots/params.json and the fitted curve stored next
to each page (snapshots/epoch-N.csv): re-evaluating the model could not reproduce the curve bit
for bit on another device, in float32 or through the bounds' transforms, so the curve is stored.
"""

from __future__ import annotations

import html
import math
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fitcli import liveness, plots
from fitcli.errors import RunFileError
from fitcli.losses import name_of
from fitcli.rundir import files
from fitcli.rundir.reader import Run, check_plotly_js, read_run

REPORT = files.REPORT


# -- pure page builders ------------------------------------------------------------------------


def labels(run: Run) -> plots.Labels:
    """The axis titles, title and log axes of a run's fit figures, as training drew them."""
    return plots.axis_labels(run.cfg.report, run.columns)


def bands_epoch(run: Run) -> int | None:
    """The epoch of the snapshot page drawn with the bands (summary.json's bands.snapshot: the
    last page, when it shows the final fit), or None."""
    record = run.summary.get("bands")
    epoch = record.get("snapshot") if isinstance(record, dict) else None
    return epoch if run.bands is not None and isinstance(epoch, int) else None


def snapshot_pages(run: Run, plotlyjs: str) -> dict[str, str]:
    """Every snapshot page by file name, exactly as training wrote them."""
    d, epochs, loss_name = run.data, int(run.summary["epochs"]), name_of(run.cfg.loss)
    with_bands = bands_epoch(run)
    return {
        s.file: plots.snapshot_page(
            name=run.name,
            note=s.note,
            sigma=d.get("sigma"),
            labels=labels(run),
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
            components=list(zip(run.components, s.components, strict=True)) or None,
            bands=run.bands if s.epoch == with_bands else None,
            **run.plot_extras,
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

    model = build_model(run.cfg.model, 0, torch.float64, run.variables)
    if list(model.names) != run.names:
        raise RunFileError(
            f"{run.path / files.CONFIG}: its model has parameters {list(model.names)} but "
            f"{files.SUMMARY} has {run.names} (from another run?)"
        )
    full = torch.tensor([params[n] for n in run.names], dtype=torch.float64)
    x = torch.as_tensor(run.data["x"], dtype=torch.float64)
    with torch.no_grad():
        fit = model.predict_full(full, x).reshape(-1).expand(x.shape[:1]).numpy()
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
        ("final loss", f"{_g(s.get('final_loss'))} ({_e(s.get('loss', name_of(run.cfg.loss)))})"),
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
    tied = s.get("tied")
    tied = tied if isinstance(tied, dict) else {}
    for n in run.names:
        label = f"{n} = {tied[n]}" if n in tied else n  # a tied parameter shows its tie
        cells = f"<td>{_e(label)}</td><td class=num>{_g(s['params'].get(n))}</td>"
        if has_err:
            cells += f"<td class=num>{_g(err.get(n), 3)}</td>"
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="params">{head}</tr>{"".join(body)}</table>'


def _uncertainty_note(run: Run) -> str:
    """The error bars' status in words (`stats.uncertainty_words`) where it is not ok."""
    from fitcli.stats import uncertainty_words

    words = uncertainty_words(run.summary.get("uncertainty"))
    return f'<p class="uncertainty">Error bars: {_e(words)}</p>' if words else ""


# The statistics block: summary.json's key, its label (condition_number is in `uncertainty`).
STATISTICS = (
    ("n_points", "n (points)"),
    ("n_params", "p (free parameters)"),
    ("rss", "RSS"),
    ("r2", "R²"),
    ("chi2_reduced", "reduced χ²"),
    ("aic", "AIC"),
    ("bic", "BIC"),
    ("condition_number", "condition number"),
    ("optimum_loss", "optimum loss"),
    ("gap", "gap to the optimum"),
)


def statistics(run: Run) -> dict[str, Any]:
    """The statistics block's values by summary.json key, those the run has (not null)."""
    s = run.summary
    unc = s.get("uncertainty")
    cond = unc.get("condition_number") if isinstance(unc, dict) else None
    values = {**s, "condition_number": cond}
    return {k: values[k] for k, _ in STATISTICS if _number(values.get(k))}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _stats_table(run: Run) -> str:
    values = statistics(run)
    if not values:
        return ""
    rows = "".join(
        f'<tr data-key="{k}"><th>{label}</th><td class=num>{_g(values[k])}</td></tr>'
        for k, label in STATISTICS
        if k in values
    )
    return f'<table class="stats">{rows}</table>'


def _correlation(run: Run) -> tuple[list[str], list[list[float | None]]] | None:
    """The free parameters' names and correlation matrix from summary.json, when it has one."""
    s = run.summary
    names, matrix = s.get("covariance_params"), s.get("correlation")
    if not isinstance(names, list) or not isinstance(matrix, list) or len(names) < 2:
        return None
    if len(matrix) != len(names) or any(
        not isinstance(row, list)
        or len(row) != len(names)
        or not all(v is None or _number(v) for v in row)
        for row in matrix
    ):
        return None
    return [str(n) for n in names], matrix


def _intervals_section(run: Run, fig: _Figures) -> str:
    """The profile, bootstrap or MCMC intervals of summary.json (`fitcli ci`), ends as -/+ from
    the estimate so that an asymmetric interval shows as such (MCMC: with each parameter's
    R-hat, autocorrelation time and effective samples, and the chain's verdict in words); ""
    when there are none."""
    doc = run.summary.get("intervals")
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict):
        return ""
    mcmc = doc.get("method") == "mcmc"
    rows = []
    for name, entry in doc["params"].items():
        est = entry.get("estimate")
        # MCMC: the chain's diagnostics of each parameter, on its first row.
        diag = (
            f"<td class=num>{_g(entry.get('r_hat'), 4)}</td>"
            f"<td class=num>{_g(entry.get('autocorr_time'), 3)}</td>"
            f"<td class=num>{_g(entry.get('effective_samples'), 3)}</td>"
        )
        for k, iv in enumerate(entry.get("intervals") or []):
            lo, hi = iv.get("lower"), iv.get("upper")
            minus = "n/a" if lo is None or est is None else f"-{_g(est - lo, 4)}"
            plus = "n/a" if hi is None or est is None else f"+{_g(hi - est, 4)}"
            rows.append(
                f"<tr><td>{_e(name)}</td><td class=num>{_g(est)}</td>"
                f"<td class=num>{_g(iv.get('level'), 3)}</td><td class=num>{_g(lo)}</td>"
                f"<td class=num>{_g(hi)}</td><td class=num>{minus} / {plus}</td>"
                + ((diag if k == 0 else "<td></td><td></td><td></td>") if mcmc else "")
                + "</tr>"
            )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("parameter", "estimate", "level", "lower", "upper", "-/+ from estimate")
        + (("R-hat", "autocorr. time", "effective samples") if mcmc else ())
    )
    verdict = ""
    if mcmc:
        verdict = (
            f'<p class="{"" if doc.get("converged") else "note"}">{_e(doc.get("reason"))} '
            f"({doc.get('walkers')} walkers, {doc.get('steps')} steps, the first "
            f"{doc.get('burn')} left out; acceptance {_g(doc.get('acceptance_fraction'), 2)})</p>"
        )
    notes = "".join(
        f'<p class="note">{_e(n)}</p>'
        for n in doc.get("notes") or []
        if not (mcmc and n == doc.get("reason"))
    )
    band = doc.get("band")
    figure = ""
    if mcmc and isinstance(band, dict) and "x" in band:
        d = run.data
        cf = plots.credible_band_figure(
            x=d["x"], y=d["y"], band=band, levels=list(doc.get("levels") or []), labels=labels(run)
        )
        figure = fig(cf, "fitcli-credible", 460) + (
            f'<p class="note">Shaded: the central credible band of the curve at each level, from '
            f"{_e(band.get('draws'))} posterior draws; the line is the posterior median.</p>"
        )
    elif mcmc and isinstance(band, dict) and band.get("skipped"):
        figure = f'<p class="note">No credible band: {_e(band["skipped"])}</p>'
    return (
        f'<section id="intervals"><h2>Intervals ({_e(doc.get("method"))})</h2>'
        f'<table class="intervals"><tr>{head}</tr>'
        f"{''.join(rows)}</table>{verdict}{notes}{figure}</section>"
    )


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
.uncertainty{color:#9a6700;font-weight:bold;max-width:40em}
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


def _frames(run: Run) -> list[dict]:
    """The fit animation's frames: every snapshot up to where the run stopped, then the final
    fit once, as what it is (its note, e.g. "converged at epoch 16"), not as a later epoch:
    the snapshots filled in after an early stop all hold that same fit."""
    frames: list[dict] = []
    for p in run.snapshots:
        frame = {
            "epoch": p.epoch,
            "loss": p.loss,
            "x_fit": p.x_fit,
            "y_fit": p.y_fit,
            "components": p.components,
        }
        if p.note is not None:
            done = run.summary.get("epochs_run")
            final = {"note": p.note, "label": f"{done} (final fit)"}
            if frames and frames[-1]["epoch"] == done:  # the stop's own snapshot: that one
                frames[-1].update(final)
            else:
                frames.append({**frame, **final})
            break
        frames.append(frame)
    return frames


def report_page(run: Run, plotlyjs_src: str, snapshot_href: str = "snapshots/") -> str:
    """report.html of one run: fit over time, loss, parameters, residuals, summary, config."""
    fig = _Figures(plotlyjs_src)
    s = run.summary
    parts = [f"<h1>{_e(run.name)}: fitcli report</h1>"]
    parts += [f'<p class="note">{_e(n)}</p>' for n in run.notes]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in _summary_rows(run))
    corr = _correlation(run)
    heatmap = (
        fig(plots.correlation_figure(*corr), "fitcli-correlation", 420) if corr is not None else ""
    )
    parts.append(
        '<section id="summary"><h2>Summary</h2><div class="cols">'
        f'<table class="summary">{rows}</table>'
        f"<div>{_uncertainty_note(run)}{_params_table(run)}{_stats_table(run)}</div>"
        f"<div>{heatmap}</div></div></section>"
    )
    parts.append(_intervals_section(run, fig))
    d = run.data
    if run.snapshots and len(run.variables) > 1:
        last = run.snapshots[-1]
        vf = plots.variables_figure(
            title=f"{_e(run.name)}: fit at epoch {last.epoch}",
            variables=run.variables,
            x=d["x"],
            y=d["y"],
            y_fit=last.y_fit,
            left_out=run.left_out,
        )
        links = " ".join(
            f'<a href="{_e(snapshot_href + p.file)}">{p.epoch}</a>' for p in run.snapshots
        )
        parts.append(
            '<section id="fit"><h2>Fit</h2>'
            + fig(vf, "fitcli-fit", 620)
            + f"<p>Snapshot pages by epoch: {links}</p></section>"
        )
    elif run.snapshots:
        anim = plots.fit_animation_figure(
            name=run.name,
            epochs=int(s["epochs"]),
            loss_name=name_of(run.cfg.loss),
            x=d["x"],
            y=d["y"],
            y_true=d.get("y_true"),
            snapshots=_frames(run),
            components=run.components,
            sigma=d.get("sigma"),
            labels=labels(run),
        )
        links = " ".join(
            f'<a href="{_e(snapshot_href + p.file)}">'
            f"{p.epoch if p.note is None else f'{p.epoch} ({_e(p.note)})'}</a>"
            for p in run.snapshots
        )
        parts.append(
            '<section id="fit"><h2>Fit over time</h2>'
            + fig(anim, "fitcli-fit", 620)
            + f"<p>Snapshot pages by epoch: {links}</p></section>"
        )
    parts += bands_section(run, fig)
    if run.metrics is not None:
        m = run.metrics
        lf = plots.loss_figure(
            epoch=m["epoch"],
            loss=m["loss"],
            loss_name=name_of(run.cfg.loss),
            snap_epochs=[p.epoch for p in run.snapshots if p.note is None],
            snap_losses=[p.loss for p in run.snapshots if p.note is None],
        )
        pf = plots.params_figure(epoch=m["epoch"], params={n: m[n] for n in run.names})
        parts.append('<section id="loss"><h2>Loss</h2>' + fig(lf, "fitcli-loss") + "</section>")
        parts.append(
            '<section id="params"><h2>Parameters</h2>' + fig(pf, "fitcli-params") + "</section>"
        )
    res = residuals(run) if len(run.variables) == 1 else None  # several: in the fit's panels
    if res is not None:
        epoch, r = res
        rf = plots.residuals_figure(
            x=d["x"], residuals=r, epoch=epoch, sigma=d.get("sigma"), labels=labels(run)
        )
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


BANDS_MEANING = (
    "Shaded: the pointwise confidence band of the fitted curve (at each x, where the true "
    "curve lies with that probability if the model is right) and, wider, the prediction band "
    "of a new observation at x. The whole true curve lies inside the confidence band less "
    "often than the level says (BENCHMARKS.md, Band coverage)."
)


def bands_section(run: Run, fig: _Figures) -> list[str]:
    """The report's bands: the final fit with its shaded bands and what they mean, or the
    reason there are none; nothing for a run without a bands record (still running)."""
    record = run.summary.get("bands")
    if not isinstance(record, dict):
        return []
    head = '<section id="bands"><h2>Confidence and prediction bands</h2>'
    if run.bands is None:
        why = record.get("skipped") or "no bands were written"
        return [f'{head}<p class="note">No bands: {_e(why)}</p></section>']
    grid, d = run.bands["grid"], run.data
    epoch, params = run.final_params
    final_loss = run.summary.get("final_loss")
    if len(run.variables) > 1:
        return _point_bands_section(run, record, head, fig)
    order = np.argsort(d["x"], kind="stable")
    figure = plots.snapshot_figure(
        name=run.name,
        epoch=epoch,
        epochs=int(run.summary["epochs"]),
        loss=math.nan if final_loss is None else float(final_loss),
        params=params,
        x=d["x"][order],
        y=d["y"][order],
        y_true=d["y_true"][order] if "y_true" in d else None,
        x_fit=grid["x"],
        y_fit=grid["fit"],
        loss_name=name_of(run.cfg.loss),
        sigma=d["sigma"][order] if "sigma" in d else None,
        labels=labels(run),
        bands=run.bands,
    )
    quantile = "the normal quantile (sigma is absolute)"
    if record.get("quantile") == "student_t":
        quantile = f"Student's t quantile with {_g(record.get('dof'))} degrees of freedom"
    text = (
        f"{BANDS_MEANING} Delta method with the exact Jacobian of the model at the fitted "
        f"parameters, {quantile}."
    )
    if record.get("prediction") == files.BANDS_DATA:
        text += " With a sigma column the prediction band is given at the data points only."
    elif record.get("prediction_skipped"):
        text += f" No prediction band: {record['prediction_skipped']}."
    return [f"{head}{fig(figure, 'fitcli-bands', 560)}<p>{_e(text)}</p></section>"]


def _point_bands_section(run: Run, record: dict, head: str, fig: _Figures) -> list[str]:
    """`bands_section` of a model of several variables: the final fit at the data points with
    its bands as error bars on the fitted markers (`plots.variables_figure`)."""
    assert run.bands is not None
    grid, d = run.bands["grid"], run.data
    epoch, _ = run.final_params
    figure = plots.variables_figure(
        title=f"{_e(run.name)}: the final fit (epoch {epoch}) with its bands",
        variables=run.variables,
        x=d["x"],
        y=d["y"],
        y_fit=grid["fit"],
        bands=run.bands,
    )
    text = (
        "Error bars on the fitted values (top): the pointwise confidence band of the fit at "
        "each data point (where the true model lies with that probability if the model is "
        "right); the same about zero in the residual panels, with, in grey, the prediction band "
        "of a new observation there (a residual outside it is unusually large). Every level's "
        f"bands are in {files.BANDS} at every data point. Delta method with the exact Jacobian "
        f"of the model at the fitted parameters, {_quantile_text(record)}."
    )
    return [f"{head}{fig(figure, 'fitcli-bands', 620)}<p>{_e(text)}</p></section>"]


def _quantile_text(record: dict) -> str:
    if record.get("quantile") == "student_t":
        return f"Student's t quantile with {_g(record.get('dof'))} degrees of freedom"
    return "the normal quantile (sigma is absolute)"


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
            f"{_g(s.get('final_loss'))} ({_e(s.get('loss', name_of(r.cfg.loss)))})",
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
    from fitcli.rundir.reader import is_grouped

    if Path(run_dir).is_dir() and is_grouped(Path(run_dir)):
        from fitcli.grouped_run import rebuild_report

        rebuilt: Written = rebuild_report(Path(run_dir), out=out, plotlyjs=plotlyjs)
        return rebuilt
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


# -- grouped runs ------------------------------------------------------------------------------

# Failed groups listed by name on a grouped run's report (all of them are in groups.csv).
FAILED_SHOWN = 20


def _grouped_summary_rows(s: dict) -> list[tuple[str, str]]:
    """The summary table of a grouped run, from its summary.json values known when the pages
    are drawn (not elapsed_s: the pages are part of that time)."""
    status = str(s.get("status", "-"))
    counts = (
        f"{_g(s.get('groups'))}: {_g(s.get('groups_converged'))} converged, "
        f"{_g(s.get('groups_failed'))} failed"
    )
    if s.get("groups_completed"):
        counts += f", {_g(s['groups_completed'])} completed but not converged"
    fit_s, rate = s.get("fit_s"), s.get("fits_per_s")
    timing = "-"
    if _number(fit_s):
        timing = f"{fit_s:.3g} s" + (f" ({rate:,.0f} groups/s)" if _number(rate) else "")
    rows = [
        ("status", f'<span class="status {_e(status)}">{_e(status)}</span>'),
        ("groups", counts),
        ("iterations", f"up to {_g(s.get('epochs_run'))} of {_g(s.get('epochs'))}"),
        ("final loss", f"{_g(s.get('final_loss'))} ({_e(s.get('loss', '-'))}, over all points)"),
        (
            "fit",
            f"RSS {_g(s.get('rss'))}, {_g(s.get('n_points'))} points, "
            f"{_g(s.get('n_params'))} free parameters",
        ),
        ("optimizer", _e(s.get("optimizer", "-"))),
        ("device", _e(s.get("device", "-"))),
        ("dtype", _e(s.get("dtype", "-"))),
        ("fitting time", timing),
    ]
    if s.get("started_at"):
        rows.append(("started", _e(s["started_at"])))
    if s.get("reason"):
        rows.append(("stopped", _e(s["reason"])))
    return rows


def _shared_table(s: dict) -> str:
    """The shared parameters with their standard errors (from the whole stacked problem)."""
    values, errors = s.get("params") or {}, s.get("stderr") or {}
    if not values:
        return "<p>No shared parameters: every group is its own fit.</p>"
    body = "".join(
        f"<tr><td>{_e(n)}</td><td class=num>{_g(v)}</td>"
        f"<td class=num>{_g(errors.get(n), 3)}</td></tr>"
        for n, v in values.items()
    )
    return (
        '<table class="params"><tr><th>shared parameter</th><th>value</th>'
        f"<th>± stderr</th></tr>{body}</table>"
    )


def per_group_statistics(rows: list[dict], names: list[str]) -> dict[str, dict[str, float]]:
    """Each per-group parameter over the groups that did not fail (finite values): their
    count, median, 16th and 84th percentiles, and the median standard error."""
    out: dict[str, dict[str, float]] = {}
    for name in names:
        kept = [r for r in rows if r["status"] != "failed" and math.isfinite(r[name])]
        values = np.array([r[name] for r in kept], dtype=float)
        errors = np.array([r[f"{name}_stderr"] for r in kept], dtype=float)
        errors = errors[np.isfinite(errors)]
        if not values.size:
            out[name] = {"groups": 0}
            continue
        lo, mid, hi = np.percentile(values, [16, 50, 84])
        out[name] = {"groups": int(values.size), "median": mid, "p16": lo, "p84": hi}
        if errors.size:
            out[name]["median_stderr"] = float(np.median(errors))
    return out


def _per_group_table(rows: list[dict], names: list[str]) -> str:
    if not names:
        return ""
    body = []
    for name, st in per_group_statistics(rows, names).items():
        if not st["groups"]:
            body.append(f"<tr><td>{_e(name)}</td><td colspan=4>no group fitted</td></tr>")
            continue
        body.append(
            f"<tr><td>{_e(name)}</td><td class=num>{_g(st['median'])}</td>"
            f"<td class=num>{_g(st['p16'], 4)} to {_g(st['p84'], 4)}</td>"
            f"<td class=num>{_g(st.get('median_stderr'), 3)}</td>"
            f"<td class=num>{st['groups']}</td></tr>"
        )
    return (
        '<table class="per-group"><tr><th>per-group parameter</th><th>median</th>'
        "<th>middle 68% of groups</th><th>median stderr</th><th>groups</th></tr>"
        f"{''.join(body)}</table>"
        "<p>Over the groups that did not fail; every group's value and standard error are in "
        "<code>groups.csv</code>.</p>"
    )


def _failed_section(rows: list[dict]) -> str:
    failed = [r for r in rows if r["status"] == "failed"]
    if not failed:
        return ""
    body = "".join(
        f"<tr><td>{_e(r['group'])}</td><td>{_e(r['reason'])}</td>"
        f"<td class=num>{_g(r['n_points'])}</td><td class=num>{_g(r['iterations'])}</td></tr>"
        for r in failed[:FAILED_SHOWN]
    )
    more = (
        f"<p>and {len(failed) - FAILED_SHOWN} more: every row of <code>groups.csv</code> with "
        "status <code>failed</code>.</p>"
        if len(failed) > FAILED_SHOWN
        else ""
    )
    return (
        f'<section id="failed"><h2>Failed groups ({len(failed)})</h2>'
        '<table class="failed-groups"><tr><th>group</th><th>reason</th><th>points</th>'
        f"<th>iterations</th></tr>{body}</table>{more}</section>"
    )


def grouped_report_page(
    *,
    summary: dict,
    rows: list[dict],
    config_text: str,
    fits: dict,
    histograms: dict,
    shown: int,
    snapshots: list[tuple[str, str]],
    plotlyjs_src: str,
) -> str:
    """report.html of a grouped run: its summary (groups, shared parameters, the per-group
    parameters' spread), the failed groups, the fits of `shown` groups (`fits`, small
    multiples), the per-group parameters' histograms and the config; `snapshots` are the
    snapshot pages' (label, href)."""
    fig = _Figures(plotlyjs_src)
    name = str(summary.get("name", "run"))
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in _grouped_summary_rows(summary))
    per = [str(n) for n in summary.get("per_group_params") or []]
    parts = [
        f"<h1>{_e(name)}: fitcli report</h1>",
        '<section id="summary"><h2>Summary</h2><div class="cols">'
        f'<table class="summary">{table}</table>'
        f"<div>{_shared_table(summary)}{_per_group_table(rows, per)}</div></div></section>",
        _failed_section(rows),
    ]
    total = len(rows)
    which = (
        f"All {total} groups"
        if shown >= total
        else f"{shown} of {total} groups, spread over the distribution of their loss"
    )
    links = " ".join(f'<a href="{_e(href)}">{_e(label)}</a>' for label, href in snapshots)
    parts.append(
        '<section id="fit"><h2>Fits by group</h2>'
        f"<p>{which}, the worst first (failed groups in red).</p>"
        + fig(fits, "fitcli-groups")
        + f"<p>Snapshot pages: {links}</p></section>"
    )
    if per:
        parts.append(
            '<section id="per-group"><h2>Per-group parameters</h2>'
            + fig(histograms, "fitcli-histograms", 360)
            + "</section>"
        )
    parts.append(
        f'<section id="config"><h2>Config</h2><pre class="config">{_e(config_text)}</pre></section>'
    )
    return _page(f"{name} - fitcli report", "\n".join(p for p in parts if p))
