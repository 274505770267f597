"""Plotly figures only: built as plain dicts (no validation pass) and rendered to HTML.

Every text that comes from a config (names, expressions, file names) is HTML-escaped before it
reaches a figure, because plotly renders a subset of HTML in titles and legends; plotly's JSON
encoder escapes `<`, `>` and `/` inside the page's script, so nothing in a config can run.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_POINTS = 4000  # per trace: plots stay small and fast at a million points
# A light look without shipping plotly's template (figures are plain dicts, not validated).
STYLE = {"plot_bgcolor": "white", "paper_bgcolor": "white", "font": {"family": "sans-serif"}}
AXIS = {
    "gridcolor": "#e5e5e5",
    "zerolinecolor": "#cccccc",
    "showline": True,
    "linecolor": "#888888",
}


# Okabe & Ito's palette ("Color Universal Design", 2008): eight colours told apart under every
# common colour-vision deficiency and in greyscale by lightness. Every figure takes its colours
# from here: observations in black on top of a vermillion fit, the true curve bluish green.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
}
OBSERVED = "rgba(0,0,0,0.65)"  # black, a little see-through where points crowd the fit
FIT = OKABE_ITO["vermillion"]
TRUE_CURVE = OKABE_ITO["bluish green"]
# Series (parameters, components, compared runs), in the order of the palette's contrast.
COLORS = tuple(
    OKABE_ITO[c]
    for c in ("blue", "orange", "bluish green", "reddish purple", "sky blue", "vermillion")
) + (OKABE_ITO["yellow"], OKABE_ITO["black"])
# Correlations from -1 (blue) through 0 (white) to +1 (vermillion): diverging, colour-blind safe.
CORRELATION_SCALE = [[0.0, OKABE_ITO["blue"]], [0.5, "#ffffff"], [1.0, OKABE_ITO["vermillion"]]]


@dataclass(frozen=True)
class Labels:
    """What a run's fit figures say on their axes: titles (config or data text, escaped when
    drawn), the fit figure's own title (None: the run's name) and which axes are logarithmic."""

    x: str = "x"
    y: str = "y"
    title: str | None = None
    log_x: bool = False
    log_y: bool = False


def axis_labels(spec: Any = None, columns: dict | None = None) -> Labels:
    """The `Labels` of a run: the config's `report` section (`spec`: x_label, y_label, title,
    log_x, log_y) over the data file's column names by role (`columns`), else x and y."""
    cols = columns or {}
    return Labels(
        x=getattr(spec, "x_label", None) or cols.get("x") or "x",
        y=getattr(spec, "y_label", None) or cols.get("y") or "y",
        title=getattr(spec, "title", None),
        log_x=bool(getattr(spec, "log_x", False)),
        log_y=bool(getattr(spec, "log_y", False)),
    )


def _axis(title: str, log: bool = False) -> dict:
    return {"title": {"text": text(title)}, **({"type": "log"} if log else {})}


def observed_trace(x: Any, y: Any, sigma: Any, n: int, note: str) -> dict:
    """The observations as markers on top of the fit (`zorder`), with ±1 sigma error bars when
    the data give sigma; `n` is how many points there are (WebGL beyond 20,000)."""
    trace = {
        "type": "scattergl" if n > 20000 else "scatter",
        "mode": "markers",
        "name": "observed" + note + (" ± 1 sigma" if sigma is not None else ""),
        "x": x,
        "y": y,
        "marker": {"size": 6 if n <= 2000 else 4, "color": OBSERVED},
        "zorder": 1,
    }
    if sigma is not None:
        trace["error_y"] = {
            "type": "data",
            "array": sigma,
            "visible": True,
            "color": OBSERVED,
            "thickness": 1,
            "width": 0,
        }
    return trace


def _state(epoch: int, epochs: int, note: str | None) -> str:
    """Where a fit figure is in the run: `epoch N/M`, or for a snapshot filled in after the fit
    stopped (its `note`, e.g. "converged at epoch 16"), that it is the final fit."""
    return f"{text(note)} (the final fit)" if note else f"epoch {epoch}/{epochs}"


def text(s: Any) -> str:
    """Config text made inert for plotly's HTML-like labels."""
    return html.escape(str(s), quote=True)


def typed(values: Any) -> dict:
    """A numeric array as a plotly.js typed array (base64 float64): exact, about half the size
    of decimal JSON, and encoded in microseconds instead of milliseconds."""
    import base64

    arr = np.ascontiguousarray(values, dtype="<f8")
    return {"dtype": "f8", "bdata": base64.b64encode(arr.tobytes()).decode("ascii")}


def downsample(n: int, limit: int = MAX_POINTS) -> tuple[slice, str]:
    """An even stride keeping at most `limit` of n points, and a legend note when it drops any."""
    if n <= limit:
        return slice(None), ""
    step = -(-n // limit)
    return slice(None, None, step), f" (every {step}th of {n:,} points)"


def _fmt_params(params: dict[str, float], limit: int = 8) -> str:
    items = [f"{text(k)}={v:.6g}" for k, v in list(params.items())[:limit]]
    if len(params) > limit:
        items.append(f"... {len(params) - limit} more")
    return ", ".join(items)


def snapshot_figure(
    *,
    name: str,
    epoch: int,
    epochs: int,
    loss: float,
    params: dict[str, float],
    x: np.ndarray,
    y: np.ndarray,
    y_true: np.ndarray | None,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    loss_name: str,
    components: list[tuple[str, np.ndarray]] | None = None,
    sigma: np.ndarray | None = None,
    labels: Labels | None = None,
    note: str | None = None,
    bands: dict | None = None,
) -> dict:
    """The fit at one epoch: observations (± sigma when given), the true curve when known, the
    current model and, beside it, its components (label, values on x_fit) when it has them;
    beneath them the shaded bands of the final fit (`fitcli.bands.band_set`) when given.
    A snapshot filled in after the fit stopped (`note`) is titled as the final fit."""
    labels = labels or Labels()
    sl, dropped = downsample(len(x))
    data = [
        *(band_traces(bands) if bands else []),
        observed_trace(
            typed(x[sl]), typed(y[sl]), None if sigma is None else typed(sigma[sl]), len(x), dropped
        ),
    ]
    if y_true is not None:
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": "true curve",
                "x": typed(x[sl]),
                "y": typed(y_true[sl]),
                "line": {"color": TRUE_CURVE, "dash": "dash"},
            }
        )
    data.append(
        {
            "type": "scatter",
            "mode": "lines",
            "name": "fit",
            "x": typed(x_fit),
            "y": typed(y_fit),
            "line": {"color": FIT, "width": 3},
        }
    )
    for k, (label, values) in enumerate(components or []):
        data.append(component_trace(k, label, typed(x_fit), typed(values)))
    head = text(labels.title or name)
    title = (
        f"{head}: {_state(epoch, epochs, note)}, {loss_name} {loss:.6g}"
        f"<br><sub>{_fmt_params(params)}</sub>"
    )
    return {
        "data": data,
        "layout": {
            "title": {"text": title},
            "xaxis": {**_axis(labels.x, labels.log_x), **AXIS},
            "yaxis": {**_axis(labels.y, labels.log_y), **AXIS},
            "legend": {"orientation": "h", "y": -0.15},
            "margin": {"t": 80},
            **STYLE,
        },
    }


BAND_FILL = {
    "conf": "rgba(214,39,40,0.22)",
    "pred": "rgba(120,120,120,0.14)",
    "cred": "rgba(86,180,233,0.30)",  # Okabe-Ito sky blue: the MCMC credible band
}


def band_traces(bands: dict) -> list[dict]:
    """Shaded areas of a `fitcli.bands.band_set`, widest first so that narrower ones sit on
    top: the prediction bands, then the confidence bands, of each level (and the MCMC credible
    bands, `cred_*` columns, where the grid has them). Each band is two
    traces: its lower edge, then its upper edge filled down to it."""
    from fitcli.bands import level_tag

    levels = sorted(bands["levels"], reverse=True)
    out: list[dict] = []
    sources: list[tuple[str, dict[str, np.ndarray], str]] = []
    grid, points = bands["grid"], bands.get("points")
    if points is not None:
        order = np.argsort(points["x"], kind="stable")
        sl, note = downsample(len(order))
        kept = order[sl]
        sorted_points = {k: np.asarray(v)[kept] for k, v in points.items()}
        sources.append(("pred", sorted_points, " at the data points" + note))
    else:
        sources.append(("pred", grid, ""))
    sources.append(("conf", grid, ""))
    sources.append(("cred", grid, ""))
    words = {"conf": "confidence band", "pred": "prediction band", "cred": "credible band"}
    for kind, cols, where in sources:
        for level in levels:
            tag = level_tag(level)
            lower, upper = cols.get(f"{kind}_lower_{tag}"), cols.get(f"{kind}_upper_{tag}")
            if lower is None or upper is None:
                continue
            name = f"{level * 100:.4g}% {words[kind]}{where}"
            group = f"{kind}_{tag}"
            edge = {"type": "scatter", "mode": "lines", "x": typed(cols["x"]), "line": {"width": 0}}
            out.append(
                {
                    **edge,
                    "name": name,
                    "y": typed(lower),
                    "legendgroup": group,
                    "showlegend": False,
                    "hoverinfo": "skip",
                }
            )
            out.append(
                {
                    **edge,
                    "name": name,
                    "y": typed(upper),
                    "legendgroup": group,
                    "fill": "tonexty",
                    "fillcolor": BAND_FILL[kind],
                    "hoverinfo": "skip",
                }
            )
    return out


def component_trace(k: int, label: str, x: Any, y: Any) -> dict:
    """The line of component k (0-based) of a fit, named `component_{k+1}: its text`."""
    return {
        "type": "scatter",
        "mode": "lines",
        "name": f"component_{k + 1}: {text(label)}",
        "x": x,
        "y": y,
        "line": {"color": COLORS[k % len(COLORS)], "width": 1.5, "dash": "dot"},
    }


def figure_object(fig: dict) -> Any:
    """A figure dict as a `plotly.graph_objects.Figure` (what `FitResult.figure()` returns),
    its typed arrays (`typed`) back as numpy arrays, so that `fig.data[0].x` reads as data."""
    import base64

    import plotly.graph_objects as go

    def plain(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"dtype", "bdata"}:
            return np.frombuffer(base64.b64decode(value["bdata"]), dtype="<" + value["dtype"])
        return value

    traces = [{k: plain(v) for k, v in trace.items()} for trace in fig["data"]]
    return go.Figure({**fig, "data": traces})


def to_html(
    fig: dict,
    plotlyjs: str,
    *,
    depth: int = 0,
    title: str = "fitcli",
    div_id: str | None = None,
) -> str:
    """A full HTML page; plotly.js embedded, from the CDN, or from the run directory's copy
    (`depth` levels up from the page). A fixed `div_id` makes the page deterministic (plotly
    otherwise draws a random uuid), so a rebuilt page is byte-identical to the original."""
    import plotly.io as pio

    if plotlyjs == "embed":
        include: Any = True
    elif plotlyjs == "cdn":
        include = "cdn"
    else:
        include = "../" * depth + "plotly.min.js"
    page = pio.to_html(
        fig,
        include_plotlyjs=include,
        full_html=True,
        validate=False,
        config={"responsive": True, "displaylogo": False},
        div_id=div_id,
    )
    return page.replace("<head>", f'<head><meta charset="utf-8"><title>{text(title)}</title>', 1)


def snapshot_page(
    *,
    name: str,
    epoch: int,
    epochs: int,
    loss: float,
    params: dict[str, float],
    x: np.ndarray,
    y: np.ndarray,
    y_true: np.ndarray | None,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    loss_name: str,
    plotlyjs: str,
    components: list[tuple[str, np.ndarray]] | None = None,
    sigma: np.ndarray | None = None,
    labels: Labels | None = None,
    note: str | None = None,
    variables: tuple[str, ...] | None = None,
    left_out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    bands: dict | None = None,
) -> str:
    """One snapshot page, `snapshots/epoch-N.html`: a pure function of stored values (the
    final one with the bands of bands.csv, `band_set`).

    With several `variables` (x n x k, y_fit the fit at the data points) it is
    `variables_figure`; `left_out` (x, y, reason per row) adds the rows not fitted.

    Training and `fitcli plot` both call it, so a rebuild from data.csv, params.json and the
    stored fitted curve is byte-identical to the page training wrote (same plotly.js mode).
    Observations are drawn sorted by x; the div id comes from the epoch, never a random uuid.
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if variables is not None:
        fig = variables_figure(
            title=_snapshot_title(name, epoch, epochs, loss_name, loss, params),
            variables=variables,
            x=x,
            y=y,
            y_fit=np.asarray(y_fit, dtype=np.float64),
            left_out=left_out,
            bands=bands,
        )
        return to_html(
            fig, plotlyjs, depth=1, title=f"{name} epoch {epoch}", div_id=f"fitcli-epoch-{epoch}"
        )
    if not np.all(np.diff(x) >= 0):
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        y_true = None if y_true is None else np.asarray(y_true)[order]
        sigma = None if sigma is None else np.asarray(sigma)[order]
    fig = snapshot_figure(
        name=name,
        epoch=epoch,
        epochs=epochs,
        loss=loss,
        params=params,
        x=x,
        y=y,
        y_true=y_true,
        x_fit=x_fit,
        y_fit=y_fit,
        loss_name=loss_name,
        components=components,
        sigma=sigma,
        labels=labels,
        note=note,
        bands=bands,
    )
    if left_out is not None:
        fig["data"] += left_out_traces(*left_out)
    page_title = f"{name} epoch {epoch}" if note is None else f"{name} ({note})"
    return to_html(fig, plotlyjs, depth=1, title=page_title, div_id=f"fitcli-epoch-{epoch}")


def _snapshot_title(
    name: str, epoch: int, epochs: int, loss_name: str, loss: float, params: dict[str, float]
) -> str:
    return (
        f"{text(name)}: epoch {epoch}/{epochs}, {loss_name} {loss:.6g}"
        f"<br><sub>{_fmt_params(params)}</sub>"
    )


def left_out_traces(
    x: np.ndarray, y: np.ndarray, reason: np.ndarray, axes: dict | None = None
) -> list[dict]:
    """The rows read but not fitted, against x (a 1-D array): hollow markers for those omitted
    for a NaN or empty cell (where x and y are known), grey ones for those outside data.range."""
    out = []
    for why, label, marker in (
        ("nan", "omitted (NaN)", {"size": 7, "symbol": "circle-open", "color": "#636efa"}),
        ("range", "outside range", {"size": 5, "color": "rgba(150,150,150,0.6)"}),
    ):
        keep = (reason == why) & np.isfinite(x) & np.isfinite(y)
        if keep.any():
            out.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": label,
                    "x": typed(x[keep]),
                    "y": typed(y[keep]),
                    "marker": marker,
                    **(axes or {}),
                }
            )
    return out


def grid_of(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(values of the first variable, of the second, index of each point in the value grid) when
    the n x 2 points lie on a full grid, each pair once; else None."""
    if x.ndim != 2 or x.shape[1] != 2:
        return None
    u0, i0 = np.unique(x[:, 0], return_inverse=True)
    u1, i1 = np.unique(x[:, 1], return_inverse=True)
    if len(u0) < 2 or len(u1) < 2 or len(u0) * len(u1) != x.shape[0]:
        return None
    flat = i0 * len(u1) + i1
    if len(np.unique(flat)) != x.shape[0]:
        return None
    return u0, u1, flat


def variables_figure(
    *,
    title: str,
    variables: tuple[str, ...],
    x: np.ndarray,
    y: np.ndarray,
    y_fit: np.ndarray,
    left_out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    bands: dict | None = None,
) -> dict:
    """The fit of several variables at the data points. Two variables: observed and fitted
    against each (top) with the residuals below, and a heatmap of the fit when the points lie
    on a grid; more: observed against fitted, and the residuals against fitted. With `bands`
    (a `fitcli.bands.band_set` at the same points) the confidence bands are error bars on the
    fitted markers of each panel (`point_band_traces`)."""
    sl, note = downsample(len(y))
    resid = y - y_fit
    data: list[dict] = []
    layout: dict = {"title": {"text": title}, "margin": {"t": 80}, **STYLE}
    layout["legend"] = {"orientation": "h", "y": -0.12}
    grid = grid_of(x) if len(variables) == 2 else None
    panels = len(variables) if len(variables) == 2 else 1
    columns = panels + (grid is not None)
    width = 1.0 / columns
    for c in range(columns):
        layout[f"xaxis{2 * c + 1 if c else ''}"] = {
            **AXIS,
            "domain": [c * width + 0.04, (c + 1) * width - 0.04],
            "anchor": f"y{2 * c + 1 if c else ''}",
        }
        layout[f"yaxis{2 * c + 1 if c else ''}"] = {
            **AXIS,
            "domain": [0.45, 1.0] if c < panels else [0.0, 1.0],
            "anchor": f"x{2 * c + 1 if c else ''}",
        }
        if c < panels:
            layout[f"xaxis{2 * c + 2}"] = {
                **AXIS,
                "domain": [c * width + 0.04, (c + 1) * width - 0.04],
                "anchor": f"y{2 * c + 2}",
            }
            layout[f"yaxis{2 * c + 2}"] = {
                **AXIS,
                "domain": [0.0, 0.35],
                "anchor": f"x{2 * c + 2}",
            }

    def axes(c: int, row: int) -> dict:
        k = 2 * c + row
        return {"xaxis": f"x{k if k > 1 else ''}", "yaxis": f"y{k if k > 1 else ''}"}

    def markers(
        c: int,
        against: np.ndarray,
        name: str,
        values: np.ndarray,
        marker: dict,
        group: str,
        row: int,
    ) -> dict:
        """One panel's markers of `values` against a variable (or the fit); legend once."""
        return {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "x": typed(against[sl]),
            "y": typed(values[sl]),
            "marker": marker,
            "legendgroup": group,
            "showlegend": c == 0,
            **axes(c, row),
        }

    obs = {"size": 5, "color": "rgba(99,110,250,0.55)"}
    fit = {"size": 5, "color": "#d62728", "symbol": "x"}
    for c in range(panels):
        if len(variables) == 2:
            against, label = x[:, c], text(variables[c])
        else:
            against, label = y_fit, "fitted"
        res = {"size": 4, "color": "#636efa"}
        if bands is not None:
            top = point_band_traces(bands, against)
            below = point_band_traces(bands, against, residual=True)
            data += [{**t, **axes(c, 1)} for t in top] + [{**t, **axes(c, 2)} for t in below]
            if c == 0:
                data += [{**t, **axes(c, 2)} for t in band_legend(below)]
        data.append(markers(c, against, "observed" + note, y, obs, "obs", 1))
        data.append(markers(c, against, "fit", y_fit, fit, "fit", 1))
        data.append(markers(c, against, "residual", resid, res, "res", 2))
        if left_out is not None and len(variables) == 2:
            lx, ly, why = left_out
            data += left_out_traces(lx[:, c], ly, why, axes(c, 1))
        k = 2 * c + 1
        layout[f"xaxis{k if k > 1 else ''}"]["title"] = {"text": label}
        layout[f"yaxis{k if k > 1 else ''}"]["title"] = {"text": "y"}
        layout[f"xaxis{k + 1}"]["title"] = {"text": label}
        layout[f"yaxis{k + 1}"]["title"] = {"text": "residual"}
    if grid is not None:
        u0, u1, flat = grid
        z = np.full(len(u0) * len(u1), np.nan)
        z[flat] = y_fit
        c = panels
        data.append(
            {
                "type": "heatmap",
                "name": "fit on the grid",
                "x": typed(u0),
                "y": typed(u1),
                "z": z.reshape(len(u0), len(u1)).T.tolist(),
                "colorscale": "Viridis",
                "colorbar": {"title": {"text": "fit"}, "len": 0.8},
                **axes(c, 1),
            }
        )
        layout[f"xaxis{2 * c + 1}"]["title"] = {"text": text(variables[0])}
        layout[f"yaxis{2 * c + 1}"]["title"] = {"text": text(variables[1])}
    return {"data": data, "layout": layout}


BAND_POINTS = 1000  # error bars drawn per band trace of a model of several variables, at most


def point_band_traces(bands: dict, against: np.ndarray, *, residual: bool = False) -> list[dict]:
    """The bands of a `fitcli.bands.band_set` at the data points (a model of several variables)
    as error bars drawn against `against` (a variable, or the fit): on the fitted values (the
    band's own `fit` column), each
    confidence band (widest first and thinnest); with `residual`, about zero for the residual
    panel, the widest prediction band too (where a new observation's residual falls), in grey.
    At most BAND_POINTS points per trace (an even stride). The traces have no legend entry:
    `band_legend` gives each band one, which hides it in every panel when clicked."""
    from fitcli.bands import level_tag

    cols, levels = bands["grid"], sorted(bands["levels"], reverse=True)
    fit = cols["fit"]
    sl, note = downsample(len(fit), BAND_POINTS)
    centre = np.zeros_like(fit) if residual else fit
    kinds = (("pred", levels[:1]), ("conf", levels)) if residual else (("conf", levels),)
    out = []
    for kind, shown in kinds:
        for k, level in enumerate(shown):
            tag = level_tag(level)
            lower, upper = cols.get(f"{kind}_lower_{tag}"), cols.get(f"{kind}_upper_{tag}")
            if lower is None or upper is None:
                continue
            word = "confidence" if kind == "conf" else "prediction"
            color = "rgba(120,120,120,0.55)" if kind == "pred" else FIT
            thickness = 1 + 1.5 * k if kind == "conf" else 1
            out.append(
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": f"{level * 100:.4g}% {word} band{note}",
                    "x": typed(against[sl]),
                    "y": typed(centre[sl]),
                    "marker": {"size": 1, "color": "rgba(0,0,0,0)"},  # the error bar is the band
                    "error_y": {
                        "type": "data",
                        "symmetric": False,
                        "array": typed((upper - fit)[sl]),
                        "arrayminus": typed((fit - lower)[sl]),
                        "visible": True,
                        "color": color,
                        "thickness": thickness,
                        "width": 0,
                    },
                    "legendgroup": f"{kind}_{tag}",
                    "showlegend": False,
                    "hoverinfo": "skip",
                }
            )
    return out


def band_legend(traces: list[dict]) -> list[dict]:
    """One legend entry per band of `point_band_traces`' traces: an empty line trace of the
    band's colour and width in its legend group (an error-bar trace shows no symbol there)."""
    seen: dict[str, dict] = {}
    for t in traces:
        bar = t["error_y"]
        seen.setdefault(
            t["legendgroup"],
            {
                "type": "scatter",
                "mode": "lines",
                "name": t["name"].split(" (every")[0],
                "x": [None],
                "y": [None],
                "line": {"color": bar["color"], "width": bar["thickness"] + 1},
                "legendgroup": t["legendgroup"],
                "hoverinfo": "skip",
            },
        )
    return list(seen.values())


# -- the report and comparison pages ---------------------------------------------------------


def _layout(title: str, **extra: Any) -> dict:
    return {
        "title": {"text": title},
        "xaxis": {**AXIS, **extra.pop("xaxis", {})},
        "yaxis": {**AXIS, **extra.pop("yaxis", {})},
        "legend": {"orientation": "h", "y": -0.2},
        "margin": {"t": 70},
        **STYLE,
        **extra,
    }


def _fit_title(
    name: str,
    epoch: int,
    epochs: int,
    loss_name: str,
    loss: float | None,
    note: str | None = None,
    title: str | None = None,
) -> str:
    shown = "-" if loss is None else f"{loss:.6g}"
    state = f"{text(note)} (the final fit)" if note else f"fit at epoch {epoch}/{epochs}"
    return f"{text(title or name)}: {state}, {text(loss_name)} {shown}"


def fit_animation_figure(
    *,
    name: str,
    epochs: int,
    loss_name: str,
    x: np.ndarray,
    y: np.ndarray,
    y_true: np.ndarray | None,
    snapshots: list[dict],
    components: list[str] | None = None,
    sigma: np.ndarray | None = None,
    labels: Labels | None = None,
) -> dict:
    """Observations (± sigma when given), true curve and the fitted curve, with a slider and a
    play button across `snapshots` (each: epoch, loss, x_fit, y_fit and, with `components`
    (their labels), the list `components` of their values; optionally a `note` saying it is
    the final fit of a run that stopped early, and its slider `label`). Frames replace only the
    fit and component traces."""
    axes = labels or Labels()
    if not np.all(np.diff(x) >= 0):
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        y_true = None if y_true is None else y_true[order]
        sigma = None if sigma is None else sigma[order]
    sl, note = downsample(len(x))
    data: list[dict] = [
        observed_trace(x[sl], y[sl], None if sigma is None else sigma[sl], len(x), note)
    ]
    if y_true is not None:
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": "true curve" + note,
                "x": x[sl],
                "y": y_true[sl],
                "line": {"color": TRUE_CURVE, "dash": "dash"},
            }
        )
    fit_index = len(data)
    last = snapshots[-1] if snapshots else None
    data.append(
        {
            "type": "scatter",
            "mode": "lines",
            "name": "fit",
            "x": last["x_fit"] if last else [],
            "y": last["y_fit"] if last else [],
            "line": {"color": FIT, "width": 3},
        }
    )
    parts = list(components or [])
    for k, label in enumerate(parts):
        values = last["components"][k] if last else []
        data.append(component_trace(k, label, last["x_fit"] if last else [], values))
    moving = list(range(fit_index, fit_index + 1 + len(parts)))

    def title_of(s: dict) -> str:
        return _fit_title(name, s["epoch"], epochs, loss_name, s["loss"], s.get("note"), axes.title)

    title = title_of(last) if last else f"{text(axes.title or name)}: no snapshot yet"
    layout = _layout(title, xaxis=_axis(axes.x, axes.log_x), yaxis=_axis(axes.y, axes.log_y))
    frames = []
    steps = []
    for s in snapshots:
        key = str(s["epoch"])
        frames.append(
            {
                "name": key,
                "data": [
                    {"x": s["x_fit"], "y": s["y_fit"]},
                    *({"x": s["x_fit"], "y": v} for v in (s["components"] if parts else [])),
                ],
                "traces": moving,
                "layout": {"title": {"text": title_of(s)}},
            }
        )
        steps.append(
            {
                "label": text(s.get("label") or key),
                "method": "animate",
                "args": [
                    [key],
                    {"mode": "immediate", "frame": {"duration": 0, "redraw": True}},
                ],
            }
        )
    if frames:
        layout["sliders"] = [
            {
                "active": len(steps) - 1,
                "steps": steps,
                "currentvalue": {"prefix": "epoch "},
                "pad": {"t": 50},
                "x": 0.1,
                "len": 0.9,
            }
        ]
        layout["updatemenus"] = [
            {
                "type": "buttons",
                "showactive": False,
                "x": 0.0,
                "y": 0,
                "xanchor": "left",
                "yanchor": "top",
                "pad": {"t": 60},
                "buttons": [
                    {
                        "label": "Play",
                        "method": "animate",
                        "args": [
                            None,
                            {
                                "frame": {"duration": 500, "redraw": True},
                                "fromcurrent": False,
                                "transition": {"duration": 0},
                                "mode": "immediate",
                            },
                        ],
                    },
                    {
                        "label": "Pause",
                        "method": "animate",
                        "args": [
                            [None],
                            {"frame": {"duration": 0}, "mode": "immediate"},
                        ],
                    },
                ],
            }
        ]
        layout["legend"] = {
            "orientation": "h",
            "y": 1.02,
            "yanchor": "bottom",
            "x": 1,
            "xanchor": "right",
        }
    return {"data": data, "layout": layout, "frames": frames}


def loss_figure(
    *,
    epoch: np.ndarray,
    loss: np.ndarray,
    loss_name: str,
    snap_epochs: list[int],
    snap_losses: list[float | None],
) -> dict:
    """The loss over the epochs on a log scale, snapshot epochs marked; the epoch axis ends at
    the last epoch run (a run that stopped early ends there, not at its scheduled epochs)."""
    sl, note = downsample(len(epoch))
    data = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": f"{text(loss_name)} loss{note}",
            "x": epoch[sl],
            "y": loss[sl],
            "line": {"color": OKABE_ITO["blue"]},
        }
    ]
    if snap_epochs:
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "snapshots",
                "x": snap_epochs,
                "y": snap_losses,
                "marker": {"size": 9, "color": FIT, "symbol": "diamond"},
                "hovertemplate": "snapshot at epoch %{x}<br>loss %{y:.6g}<extra></extra>",
            }
        )
    xaxis: dict = {"title": {"text": "epoch"}}
    if len(epoch) > 1:
        xaxis["range"] = [float(epoch[0]), float(epoch[-1])]
    return {
        "data": data,
        "layout": _layout(
            "loss",
            xaxis=xaxis,
            yaxis={"title": {"text": f"{text(loss_name)} (log scale)"}, "type": "log"},
        ),
    }


def params_figure(*, epoch: np.ndarray, params: dict[str, np.ndarray]) -> dict:
    """Each parameter's trajectory over the epochs, one stacked panel per parameter (a shared
    panel beyond 12 parameters)."""
    sl, note = downsample(len(epoch))
    names = list(params)
    stacked = 0 < len(names) <= 12
    data, layout = [], _layout("parameters" + note, showlegend=not stacked)
    n = len(names) if stacked else 1
    gap = 0.04 if n > 1 else 0.0
    height = (1.0 - gap * (n - 1)) / n
    for k, pname in enumerate(names):
        ax = k + 1 if stacked else 1
        suffix = "" if ax == 1 else str(ax)
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": text(pname),
                "x": epoch[sl],
                "y": params[pname][sl],
                "xaxis": f"x{suffix}",
                "yaxis": f"y{suffix}",
                "line": {"color": COLORS[k % len(COLORS)]},
            }
        )
        if stacked:
            top = 1.0 - k * (height + gap)
            layout[f"yaxis{suffix}"] = {
                **AXIS,
                "domain": [max(0.0, top - height), top],
                "title": {"text": text(pname)},
            }
            if ax > 1:
                layout[f"xaxis{suffix}"] = {**AXIS, "matches": "x"}
            layout[f"xaxis{suffix}"] = {
                **layout.get(f"xaxis{suffix}", {}),
                **AXIS,
                "anchor": f"y{suffix}",
                "showticklabels": k == n - 1,
                "title": {"text": "epoch" if k == n - 1 else ""},
            }
    if not stacked:
        layout["xaxis"]["title"] = {"text": "epoch"}
    layout["height"] = max(320, 60 + 170 * n) if stacked else 480
    return {"data": data, "layout": layout}


def credible_band_figure(
    *, x: np.ndarray, y: np.ndarray, band: dict, levels: list[float], labels: Labels | None = None
) -> dict:
    """The MCMC credible band of the fitted curve (`fitcli.mcmc.credible_band`: x, median,
    cred_lower_<tag>, cred_upper_<tag>) shaded under the posterior median curve, with the data."""
    labels = labels or Labels()
    grid = {k: np.asarray(v, dtype=np.float64) for k, v in band.items() if isinstance(v, list)}
    data = band_traces({"grid": grid, "levels": levels, "points": None})
    order = np.argsort(x, kind="stable")
    sl, note = downsample(len(x))
    data.append(
        {
            "type": "scattergl" if len(x) > 20000 else "scatter",
            "mode": "markers",
            "name": f"observed{note}",
            "x": typed(np.asarray(x)[order][sl]),
            "y": typed(np.asarray(y)[order][sl]),
            "marker": {"size": 5, "color": OBSERVED},
        }
    )
    data.append(
        {
            "type": "scatter",
            "mode": "lines",
            "name": "posterior median of the curve",
            "x": typed(grid["x"]),
            "y": typed(grid["median"]),
            "line": {"color": FIT, "width": 2},
        }
    )
    layout = {
        **STYLE,
        "margin": {"t": 30},
        "xaxis": {**AXIS, "title": {"text": text(labels.x)}},
        "yaxis": {**AXIS, "title": {"text": text(labels.y)}},
        "legend": {"orientation": "h", "y": -0.2},
    }
    return {"data": data, "layout": layout}


def residuals_figure(
    *,
    x: np.ndarray,
    residuals: np.ndarray,
    epoch: int,
    sigma: np.ndarray | None = None,
    labels: Labels | None = None,
) -> dict:
    """Residuals y - fit of the final fit against x (left), divided by sigma when the data give
    one, around a zero line, and their histogram (right)."""
    labels = labels or Labels()
    if sigma is not None:
        residuals = residuals / sigma
    what = "(y - fit) / sigma" if sigma is not None else "y - fit"
    order = np.argsort(x, kind="stable")
    x, residuals = x[order], residuals[order]
    sl, note = downsample(len(x))
    finite = residuals[np.isfinite(residuals)]
    if finite.size:
        bins = int(min(80, max(10, np.sqrt(finite.size))))
        counts, edges = np.histogram(finite, bins=bins)
        centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    else:
        counts, centers, widths = np.array([]), np.array([]), np.array([])
    data = [
        {
            "type": "scattergl" if len(x) > 20000 else "scatter",
            "mode": "markers",
            "name": f"residual {what}{note}",
            "x": x[sl],
            "y": residuals[sl],
            "marker": {"size": 5, "color": OBSERVED},
        },
        {
            "type": "bar",
            "name": f"histogram (all {len(finite):,} residuals)",
            "x": counts,
            "y": centers,
            "width": widths,
            "orientation": "h",
            "xaxis": "x2",
            "yaxis": "y2",
            "marker": {"color": COLORS[0], "opacity": 0.7},
        },
    ]
    layout = _layout(
        f"residuals of the final fit (epoch {epoch})",
        xaxis={**_axis(labels.x, labels.log_x), "domain": [0, 0.72]},
        yaxis={"title": {"text": what}},
    )
    layout["shapes"] = [  # the zero line, across the residual panel
        {
            "type": "line",
            "xref": "x domain",
            "x0": 0,
            "x1": 1,
            "yref": "y",
            "y0": 0,
            "y1": 0,
            "line": {"color": FIT, "width": 1.5},
        }
    ]
    layout["xaxis2"] = {**AXIS, "domain": [0.76, 1], "anchor": "y2", "title": {"text": "count"}}
    layout["yaxis2"] = {**AXIS, "anchor": "x2", "matches": "y", "showticklabels": False}
    layout["bargap"] = 0
    return {"data": data, "layout": layout}


def correlation_figure(names: list[str], matrix: list[list[float | None]]) -> dict:
    """The parameters' correlation matrix as a heatmap from -1 to 1, each cell labelled with its
    value; a missing entry (a parameter without an error bar) is left blank."""
    shown = [text(n) for n in names]
    z = [[None if v is None else float(v) for v in row] for row in matrix]
    size = max(320, min(720, 140 + 60 * len(names)))
    return {
        "data": [
            {
                "type": "heatmap",
                "name": "correlation",
                "x": shown,
                "y": shown,
                "z": z,
                "zmin": -1,
                "zmax": 1,
                "colorscale": CORRELATION_SCALE,
                "texttemplate": "%{z:.2f}",
                "hovertemplate": "%{y}, %{x}: %{z:.4f}<extra></extra>",
                "colorbar": {"title": {"text": "correlation"}},
            }
        ],
        "layout": {
            **_layout("correlation of the parameters"),
            "yaxis": {**AXIS, "autorange": "reversed", "showgrid": False},
            "xaxis": {**AXIS, "showgrid": False, "side": "bottom"},
            "height": size,
            "width": size + 120,
        },
    }


def compare_loss_figure(runs: list[dict]) -> dict:
    """Loss curves of several runs overlaid (each: label, epoch, loss)."""
    data = []
    for k, r in enumerate(runs):
        sl, note = downsample(len(r["epoch"]))
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": text(r["label"]) + note,
                "x": r["epoch"][sl],
                "y": r["loss"][sl],
                "line": {"color": COLORS[k % len(COLORS)]},
            }
        )
    return {
        "data": data,
        "layout": _layout(
            "loss",
            xaxis={"title": {"text": "epoch"}},
            yaxis={"title": {"text": "loss (log scale)"}, "type": "log"},
        ),
    }


def compare_fit_figure(runs: list[dict]) -> dict:
    """Final fits of several runs overlaid; each run's observations can be shown from the
    legend (the first run's are shown)."""
    data = []
    for k, r in enumerate(runs):
        color = COLORS[k % len(COLORS)]
        x, y = r["x"], r["y"]
        order = np.argsort(x, kind="stable")
        sl, note = downsample(len(x))
        data.append(
            {
                "type": "scattergl" if len(x) > 20000 else "scatter",
                "mode": "markers",
                "name": f"{text(r['label'])} observed{note}",
                "legendgroup": str(k),
                "x": x[order][sl],
                "y": y[order][sl],
                "marker": {"size": 4, "color": color, "opacity": 0.35},
                "visible": True if k == 0 else "legendonly",
            }
        )
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"{text(r['label'])} fit (epoch {r['epoch']})",
                "legendgroup": str(k),
                "x": r["x_fit"],
                "y": r["y_fit"],
                "line": {"color": color, "width": 3},
            }
        )
    return {
        "data": data,
        "layout": _layout(
            "final fits", xaxis={"title": {"text": "x"}}, yaxis={"title": {"text": "y"}}
        ),
    }


def fragment(fig: dict, plotlyjs: str | bool, *, div_id: str, height: int = 480) -> str:
    """One figure as a `<div>` plus its script, for pages holding several figures.

    `plotlyjs` is what precedes it: False (already loaded), "embed", "cdn" or a script path.
    """
    import plotly.io as pio

    modes: dict[str | bool, str | bool] = {"embed": True, "cdn": "cdn"}
    include = modes.get(plotlyjs, plotlyjs) if plotlyjs else False
    height = int(fig.get("layout", {}).get("height") or height)
    return pio.to_html(
        fig,
        include_plotlyjs=include,
        full_html=False,
        validate=False,
        auto_play=False,
        div_id=div_id,
        default_height=f"{height}px",
        config={"responsive": True, "displaylogo": False},
    )


GRAPH_STYLE = {
    "op": ("operation", OKABE_ITO["blue"], "square"),
    "param": ("parameter (requires grad)", OKABE_ITO["vermillion"], "diamond"),
    "data": ("data / constant (no grad)", OKABE_ITO["bluish green"], "circle"),
}


def graph_figure(graph: Any, pos: dict[int, tuple[int, int]], *, title: str) -> dict:
    """An autograd DAG drawn in layers from the loss (top) to the leaves: edges as lines,
    nodes as markers by kind, each with its label and details on hover."""
    width: dict[int, int] = {}
    for layer, k in pos.values():
        width[layer] = max(width.get(layer, 0), k + 1)
    widest = max(width.values(), default=1)

    def xy(nid: int) -> tuple[float, float]:
        layer, k = pos[nid]
        return (k - (width[layer] - 1) / 2) * (widest / max(width[layer], 1)) / 1.0, -layer

    ex, ey = [], []
    for a, b in graph.edges:
        (x0, y0), (x1, y1) = xy(a), xy(b)
        ex += [x0, x1, None]
        ey += [y0, y1, None]
    data: list[dict] = [
        {
            "type": "scatter",
            "mode": "lines",
            "name": "edge (input of)",
            "x": ex,
            "y": ey,
            "line": {"color": "#aaaaaa", "width": 1.5},
            "hoverinfo": "skip",
        }
    ]
    for kind, (legend, color, symbol) in GRAPH_STYLE.items():
        nodes = [n for n in graph.nodes.values() if n.kind == kind]
        if not nodes:
            continue
        pts = [xy(n.id) for n in nodes]
        data.append(
            {
                "type": "scatter",
                "mode": "markers+text",
                "name": legend,
                "x": [p[0] for p in pts],
                "y": [p[1] for p in pts],
                "text": [text(n.label) for n in nodes],
                "textposition": "middle right",
                "hovertext": [
                    f"#{n.id} {text(n.label)}" + (f"<br>{text(n.detail)}" if n.detail else "")
                    for n in nodes
                ],
                "hoverinfo": "text",
                "marker": {"size": 14, "color": color, "symbol": symbol},
            }
        )
    depth = max((layer for layer, _ in pos.values()), default=0)
    hidden = {"visible": False, "showgrid": False, "zeroline": False}
    return {
        "data": data,
        "layout": {
            "title": {"text": text(title)},
            "xaxis": {**hidden, "range": [-widest / 2 - 0.5, widest / 2 + 1.5]},
            "yaxis": hidden,
            "legend": {"orientation": "h", "y": -0.05},
            "height": max(400, 110 * (depth + 1)),
            "hovermode": "closest",
            **STYLE,
        },
    }


# -- static figures for papers (`fitcli.export` draws them as PNG, SVG, PDF) ---------------------

# The palette of every figure (`OKABE_ITO`); black observations sit on top of the coloured fit.
PAPER_COLORS = tuple(
    OKABE_ITO[c]
    for c in ("vermillion", "blue", "bluish green", "reddish purple", "orange", "sky blue")
) + (OKABE_ITO["yellow"],)
PAPER_FIT = PAPER_COLORS[0]
PAPER_STYLE = {
    "plot_bgcolor": "white",
    "paper_bgcolor": "white",
    "font": {"family": "Arial, Helvetica, sans-serif", "size": 14, "color": "black"},
    "margin": {"l": 70, "r": 20, "t": 20, "b": 60},
    "showlegend": True,
    # Above the plot, never over the data (plotly makes room for it in the top margin).
    "legend": {"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom", "font": {"size": 12}},
}
PAPER_AXIS = {
    "showline": True,
    "mirror": True,
    "linecolor": "black",
    "linewidth": 1,
    "ticks": "outside",
    "showgrid": False,
    "zeroline": False,
}


def _band_trace(x: np.ndarray, lower: np.ndarray, upper: np.ndarray, name: str, alpha: float):
    """A filled area between lower and upper (one closed polygon)."""
    r, g, b = (int(PAPER_FIT[i : i + 2], 16) for i in (1, 3, 5))
    return {
        "type": "scatter",
        "mode": "lines",
        "name": name,
        "x": typed(np.concatenate([x, x[::-1]])),
        "y": typed(np.concatenate([upper, lower[::-1]])),
        "fill": "toself",
        "fillcolor": f"rgba({r},{g},{b},{alpha})",
        "line": {"width": 0},
        "hoverinfo": "skip",
    }


def paper_variables_figure(
    *,
    variables: tuple[str, ...],
    x: np.ndarray,
    y: np.ndarray,
    y_fit: np.ndarray,
    bands: dict | None = None,
) -> dict:
    """The final fit of a model of several variables as a static figure: the panels of
    `variables_figure` (observed and fitted against each variable with the residuals beneath,
    the fit's heatmap on a grid; or observed against fitted), with its bands as error bars,
    in the paper style of `paper_fit_figure`: white, framed, no title."""
    fig = variables_figure(title="", variables=variables, x=x, y=y, y_fit=y_fit, bands=bands)
    layout = fig["layout"]
    for key in [k for k in layout if k in STYLE]:
        del layout[key]
    layout.pop("title", None)
    layout.update(PAPER_STYLE)
    for key, axis in layout.items():
        if not key.startswith(("xaxis", "yaxis")):
            continue
        for style_key in AXIS:
            axis.pop(style_key, None)
        axis.update(PAPER_AXIS)
        if key.startswith("xaxis"):
            lo, hi = axis.get("domain", [0.0, 1.0])
            # Wider gaps between columns: the paper font's tick labels and titles need them.
            axis["domain"] = [lo + 0.03 if lo > 0.05 else lo, hi - 0.03 if hi < 0.95 else hi]
            # A panel with residuals beneath names its variable once, under the residuals.
            k = int(key[5:] or 1)
            if k % 2 and f"xaxis{k + 1}" in layout:
                axis.pop("title", None)
    return fig


def paper_fit_figure(
    *,
    x: np.ndarray,
    y: np.ndarray,
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    sigma: np.ndarray | None = None,
    y_true: np.ndarray | None = None,
    components: list[tuple[str, np.ndarray]] | None = None,
    bands: list[dict] | None = None,
    residuals: np.ndarray | None = None,
    x_label: str = "x",
    y_label: str = "y",
) -> dict:
    """The final fit as a static figure: observations (with ±1 sigma error bars when sigma is
    given), the fitted curve on x_fit, its components, the `bands` (each: kind "confidence" or
    "prediction", level, x, lower, upper) and, when `residuals` (y - fit at x) are given, a panel
    of them beneath sharing x, divided by sigma when there is one (its axis says so). White,
    framed, no title (a paper's caption is the title), no animation."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    sigma = None if sigma is None else np.asarray(sigma, dtype=np.float64)[order]
    y_true = None if y_true is None else np.asarray(y_true, dtype=np.float64)[order]
    sl, note = downsample(len(x))
    data: list[dict] = []
    levels = sorted({float(b["level"]) for b in bands or []}, reverse=True)
    for band in sorted(bands or [], key=lambda b: (b["kind"] != "prediction", -b["level"])):
        label = f"{band['level'] * 100:g}% {text(band['kind'])} band"
        if band["kind"] == "prediction":
            data.append(
                {
                    "type": "scatter",
                    "mode": "lines",
                    "name": label,
                    "x": typed(np.concatenate([band["x"], [np.nan], band["x"]])),
                    "y": typed(np.concatenate([band["lower"], [np.nan], band["upper"]])),
                    "line": {"color": PAPER_FIT, "width": 1, "dash": "dash"},
                }
            )
        else:  # the widest level palest, so that narrower ones read on top of it
            alpha = 0.15 + 0.15 * levels.index(float(band["level"])) / max(1, len(levels))
            data.append(_band_trace(band["x"], band["lower"], band["upper"], label, alpha))
    if y_true is not None:
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": "true curve",
                "x": typed(x[sl]),
                "y": typed(y_true[sl]),
                "line": {"color": "#666666", "width": 1.5, "dash": "dash"},
            }
        )
    data.append(
        {
            "type": "scatter",
            "mode": "lines",
            "name": "fit",
            "x": typed(x_fit),
            "y": typed(y_fit),
            "line": {"color": PAPER_FIT, "width": 2},
        }
    )
    for k, (label, values) in enumerate(components or []):
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"component_{k + 1}: {text(label)}",
                "x": typed(x_fit),
                "y": typed(values),
                "line": {"color": PAPER_COLORS[1 + k % (len(PAPER_COLORS) - 1)], "dash": "dot"},
            }
        )
    observed: dict[str, Any] = {
        "type": "scatter",
        "mode": "markers",
        "name": "observed" + note,
        "x": typed(x[sl]),
        "y": typed(y[sl]),
        "marker": {"size": 5, "color": "black"},
    }
    if sigma is not None:
        observed["name"] = "observed ± 1σ" + note
        observed["error_y"] = {
            "type": "data",
            "array": typed(sigma[sl]),
            "visible": True,
            "thickness": 1,
            "width": 0,
            "color": "#555555",
        }
    data.append(observed)
    layout: dict[str, Any] = {
        **PAPER_STYLE,
        "xaxis": {**PAPER_AXIS, "title": {"text": text(x_label)}},
        "yaxis": {**PAPER_AXIS, "title": {"text": text(y_label)}},
    }
    if residuals is not None:
        r = np.asarray(residuals, dtype=np.float64)[order]
        r_label = f"({text(y_label)} − fit)/σ" if sigma is not None else f"{text(y_label)} − fit"
        if sigma is not None:
            r = r / sigma
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "residuals",
                "showlegend": False,
                "x": typed(x[sl]),
                "y": typed(r[sl]),
                "xaxis": "x2",
                "yaxis": "y2",
                "marker": {"size": 4, "color": "black"},
            }
        )
        # The fit on top, the residuals beneath on the same x (the top panel's labels hidden).
        layout["xaxis"] = {**PAPER_AXIS, "anchor": "y", "matches": "x2", "showticklabels": False}
        layout["yaxis"]["domain"] = [0.33, 1]
        layout["xaxis2"] = {**PAPER_AXIS, "anchor": "y2", "title": {"text": text(x_label)}}
        layout["yaxis2"] = {
            **PAPER_AXIS,
            "anchor": "x2",
            "domain": [0, 0.25],
            "title": {"text": r_label},
            "zeroline": True,
            "zerolinecolor": "#555555",
            "zerolinewidth": 1,
        }
    return {"data": data, "layout": layout}


def paper_loss_figure(*, epoch: np.ndarray, loss: np.ndarray, loss_name: str) -> dict:
    """The loss over the epochs that ran, as a static figure: a log axis when every loss is
    positive (a linear one otherwise)."""
    epoch, loss = np.asarray(epoch, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    sl, note = downsample(len(epoch))
    finite = loss[np.isfinite(loss)]
    log = finite.size > 0 and bool(np.all(finite > 0))
    yaxis: dict[str, Any] = {
        **PAPER_AXIS,
        "title": {"text": f"{text(loss_name)} loss" + (" (log scale)" if log else "")},
        "type": "log" if log else "linear",
        "exponentformat": "power",
    }
    if log and np.log10(finite.max() / finite.min()) >= 1.5:  # label the decades only
        yaxis.update(dtick=1, minor={"ticks": "outside", "ticklen": 3, "showgrid": False})
    return {
        "data": [
            {
                "type": "scatter",
                "mode": "lines",
                "name": f"{text(loss_name)} loss{note}",
                "x": typed(epoch[sl]),
                "y": typed(loss[sl]),
                "line": {"color": PAPER_COLORS[1], "width": 2},
            }
        ],
        "layout": {
            **PAPER_STYLE,
            "showlegend": False,
            "xaxis": {**PAPER_AXIS, "title": {"text": "epoch"}},
            "yaxis": yaxis,
        },
    }


def group_small_multiples(
    curves: list, *, title: str, labels: Labels | None = None, versus_fitted: bool = False
) -> dict:
    """A grid of small plots, one per group, at most 36: `curves` holds (label, status, x, y,
    grid x, model on the grid, left out) per group. One variable: its data (markers) and its
    fit (a line) against x, on the axes `labels` name (log axes where it says), and the rows
    left out (x, y, reason, or None) as `left_out_traces` draws them. Several
    (`versus_fitted`): x is the fit at the data points, drawn against the observations with
    the diagonal where they agree; the grid is not used. The x axis is titled on the panels
    with none below, the y axis on the first column."""
    labels = labels or Labels()
    n = max(len(curves), 1)
    cols = min(6, n)
    rows = -(-n // cols)
    data: list[dict] = []
    layout: dict[str, Any] = {"title": {"text": text(title)}, "showlegend": False, **STYLE}
    x_title = f"fitted {labels.y}" if versus_fitted else labels.x
    y_title = f"observed {labels.y}" if versus_fitted else labels.y
    log_x = labels.log_x and not versus_fitted
    log_y = labels.log_y
    small = {"font": {"size": 10}}
    gap = 0.04
    for k, (label, status, x, y, gx, gy, left) in enumerate(curves):
        r, c = divmod(k, cols)
        axis = "" if k == 0 else str(k + 1)
        x0 = c / cols + gap / 2
        y1 = 1 - r / rows - gap
        xaxis: dict[str, Any] = {
            **AXIS,
            "domain": [x0, (c + 1) / cols - gap / 2],
            "anchor": f"y{axis}",
            **({"type": "log"} if log_x or (versus_fitted and log_y) else {}),
        }
        yaxis: dict[str, Any] = {
            **AXIS,
            "domain": [1 - (r + 1) / rows + gap, y1],
            "anchor": f"x{axis}",
            **({"type": "log"} if log_y else {}),
        }
        if k + cols >= len(curves):
            xaxis["title"] = {"text": text(x_title), **small}
        if c == 0:
            yaxis["title"] = {"text": text(y_title), **small}
        layout[f"xaxis{axis}"], layout[f"yaxis{axis}"] = xaxis, yaxis
        color = "#d62728" if status == "failed" else "#1f77b4"
        on = {"xaxis": f"x{axis}", "yaxis": f"y{axis}"}
        data.append(
            {
                "type": "scattergl",
                "mode": "markers",
                "x": typed(x),
                "y": typed(y),
                **on,
                "name": text(label),
                "marker": {"size": 3, "color": "#444"},
            }
        )
        if versus_fitted:
            both = np.concatenate([np.asarray(x, float), np.asarray(y, float)])
            both = both[np.isfinite(both) & ((both > 0) if log_y else True)]
            line = [float(both.min()), float(both.max())] if both.size else []
            gx = gy = np.array(line)
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "x": typed(gx),
                "y": typed(gy),
                **on,
                "name": text(f"{label} " + ("observed = fitted" if versus_fitted else "fit")),
                "line": {"color": color, "width": 1.5},
            }
        )
        if left is not None and not versus_fitted:
            lx, ly, why = left
            traces = left_out_traces(lx, ly, why, on)
            data += [{**t, "name": f"{label} {t['name']}"} for t in traces]
        layout.setdefault("annotations", []).append(
            {
                "text": text(f"{label} ({status})"),
                "showarrow": False,
                "font": {"size": 10},
                "xref": "paper",
                "yref": "paper",
                "x": (x0 + (c + 1) / cols - gap / 2) / 2,
                "y": y1 + gap / 2,
                "xanchor": "center",
            }
        )
    layout["height"] = 180 * rows + 80
    return {"data": data, "layout": layout}


def group_histograms(rows: list[dict], names: list[str]) -> dict:
    """One histogram per per-group parameter over the groups that did not fail; a parameter
    whose values are all positive and span two decades or more is binned by its log10."""
    n = max(len(names), 1)
    data: list[dict] = []
    layout: dict[str, Any] = {
        "title": {"text": "per-group parameters"},
        "showlegend": False,
        **STYLE,
    }
    for k, name in enumerate(names):
        axis = "" if k == 0 else str(k + 1)
        values = np.array(
            [r[name] for r in rows if r["status"] != "failed" and np.isfinite(r[name])], dtype=float
        )
        title = name
        if values.size and values.min() > 0 and values.max() >= 100 * values.min():
            values, title = np.log10(values), f"log10 {name}"
        layout[f"xaxis{axis}"] = {
            **AXIS,
            "domain": [k / n + 0.02, (k + 1) / n - 0.02],
            "anchor": f"y{axis}",
            "title": {"text": text(title)},
        }
        layout[f"yaxis{axis}"] = {
            **AXIS,
            "anchor": f"x{axis}",
            **({"title": {"text": "groups"}} if k == 0 else {}),
        }
        data.append(
            {
                "type": "histogram",
                "x": typed(values),
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
                "name": text(title),
            }
        )
    layout["height"] = 360
    return {"data": data, "layout": layout}


def groups_page(figs: list[dict], plotlyjs: str, depth: int, title: str) -> str:
    """A page of several figures (a grouped run's report and snapshots)."""
    script: str | bool = (
        plotlyjs if plotlyjs in ("embed", "cdn") else "../" * depth + "plotly.min.js"
    )
    parts = []
    for k, fig in enumerate(figs):
        parts.append(fragment(fig, script if k == 0 else False, div_id=f"fig{k}"))
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{text(title)}</title></head>'
        "<body>" + "".join(parts) + "</body></html>"
    )
