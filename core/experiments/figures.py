"""Figures as plain plotly JSON specs ({"data": [...], "layout": {...}}), written to HTML.

`core` does not import plotly: a figure is a dict that plotly.js renders. The HTML writer
inlines the plotly.js file shipped inside the installed `plotly` package (found without
importing it), so the page works offline; without the package it links the CDN instead.
"""

from __future__ import annotations

import html
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from core.atomic import write_text_atomic

Figure = dict[str, Any]
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def line(x: list[float], y: list[float], name: str, color: str | None = None, dash: str | None = None,
         error: list[float] | None = None, mode: str = "lines+markers", group: str | None = None,
         show_legend: bool = True) -> dict[str, Any]:
    tr: dict[str, Any] = {"type": "scatter", "x": list(x), "y": list(y), "name": name, "mode": mode,
                          "line": {k: v for k, v in (("color", color), ("dash", dash)) if v}}
    if error is not None:
        tr["error_y"] = {"type": "data", "array": list(error), "visible": True}
    if group is not None:
        tr["legendgroup"] = group
    tr["showlegend"] = show_legend
    return tr


def band(x: list[float], lo: list[float], hi: list[float], name: str, color: str = "rgba(100,100,100,0.2)") -> dict[str, Any]:
    """A filled band between lo and hi (one closed polygon)."""
    return {"type": "scatter", "x": list(x) + list(x)[::-1], "y": list(hi) + list(lo)[::-1], "fill": "toself",
            "fillcolor": color, "line": {"width": 0}, "name": name, "hoverinfo": "skip", "mode": "lines"}


def figure(traces: list[dict[str, Any]], title: str, x_title: str, y_title: str, **layout: Any) -> Figure:
    lay = {"title": {"text": title}, "xaxis": {"title": {"text": x_title}}, "yaxis": {"title": {"text": y_title}},
           "template": "plotly_white", "legend": {"orientation": "v"}, "height": 420}
    lay.update(layout)
    return {"data": traces, "layout": lay}


def _plotly_js() -> str:
    spec = importlib.util.find_spec("plotly")
    if spec and spec.submodule_search_locations:
        f = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
        if f.is_file():
            return f"<script>{f.read_text(encoding='utf-8')}</script>"
    return '<script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script>'


def write_html(path: str | os.PathLike, figures: list[Figure], title: str, notes: str = "") -> Path:
    """A self-contained HTML page with the figures stacked, written atomically."""
    path = Path(path)
    divs, calls = [], []
    for i, fig in enumerate(figures):
        divs.append(f'<div id="fig{i}" style="max-width:980px;margin:12px auto"></div>')
        calls.append(f"Plotly.newPlot('fig{i}', {json.dumps(fig['data'])}, {json.dumps(fig['layout'])}, "
                     "{responsive: true});")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"{_plotly_js()}</head><body style='font-family:sans-serif'>"
            f"<h2 style='text-align:center'>{html.escape(title)}</h2>"
            f"<p style='max-width:980px;margin:auto'>{html.escape(notes)}</p>{''.join(divs)}"
            f"<script>{''.join(calls)}</script></body></html>")
    return write_text_atomic(path, page)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")

