"""Plotly figures only: built as plain dicts (no validation pass) and rendered to HTML.

Every text that comes from a config (names, expressions, file names) is HTML-escaped before it
reaches a figure, because plotly renders a subset of HTML in titles and legends; plotly's JSON
encoder escapes `<`, `>` and `/` inside the page's script, so nothing in a config can run.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

MAX_POINTS = 4000  # per trace: plots stay small and fast at a million points
PLOTLYJS_MODES = ("directory", "embed", "cdn")
# A light look without shipping plotly's template (figures are plain dicts, not validated).
STYLE = {"plot_bgcolor": "white", "paper_bgcolor": "white", "font": {"family": "sans-serif"}}
AXIS = {
    "gridcolor": "#e5e5e5",
    "zerolinecolor": "#cccccc",
    "showline": True,
    "linecolor": "#888888",
}


def text(s: Any) -> str:
    """Config text made inert for plotly's HTML-like labels."""
    return html.escape(str(s), quote=True)


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
) -> dict:
    """The fit at one epoch: observations, the true curve when known, and the current model."""
    sl, note = downsample(len(x))
    data = [
        {
            "type": "scattergl" if len(x) > 20000 else "scatter",
            "mode": "markers",
            "name": "observed" + note,
            "x": x[sl],
            "y": y[sl],
            "marker": {"size": 4, "color": "rgba(99,110,250,0.45)"},
        },
    ]
    if y_true is not None:
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": "true curve",
                "x": x[sl],
                "y": y_true[sl],
                "line": {"color": "#2ca02c", "dash": "dash"},
            }
        )
    data.append(
        {
            "type": "scatter",
            "mode": "lines",
            "name": "fit",
            "x": x_fit,
            "y": y_fit,
            "line": {"color": "#d62728", "width": 3},
        }
    )
    title = (
        f"{text(name)}: epoch {epoch}/{epochs}, {loss_name} {loss:.6g}"
        f"<br><sub>{_fmt_params(params)}</sub>"
    )
    return {
        "data": data,
        "layout": {
            "title": {"text": title},
            "xaxis": {"title": {"text": "x"}, **AXIS},
            "yaxis": {"title": {"text": "y"}, **AXIS},
            "legend": {"orientation": "h", "y": -0.15},
            "margin": {"t": 80},
            **STYLE,
        },
    }


def to_html(fig: dict, plotlyjs: str, *, depth: int = 0, title: str = "fitcli") -> str:
    """A full HTML page; plotly.js embedded, from the CDN, or from the run directory's copy
    (`depth` levels up from the page)."""
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
    )
    return page.replace("<head>", f'<head><meta charset="utf-8"><title>{text(title)}</title>', 1)
