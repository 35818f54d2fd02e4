"""Pure plotly figure builders for the demo (data in, figure out; no state, no IO).

The figures are plotly specs, plain dicts ({"data": [...], "layout": {...}}) that `json.dumps`
takes as they are: building them through plotly.graph_objects validated every property and
cost 30-40 ms per figure on a 2-core CPU, which every click paid twice. The tests validate
the specs with `go.Figure(spec)`, which raises on any property plotly does not know."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

COLORS = {"busy executive": "#4C72B0", "thorough analyst": "#55A868", "casual texter": "#DD8452",
          "friendly tutor": "#C44E52"}
YOU = "#6A3D9A"
CLICK_TARGET = "click-target"  # `meta` tag of the map's invisible click layer (the page's JS looks for it)
MAP_STEP = 0.05  # resolution of a map click: the manual-steering sliders' step
MAP_LIMIT = 1.0  # clicks and sliders cover [-MAP_LIMIT, MAP_LIMIT]^2

# The figures' keys, as HTML under each plot (ui.py): a plotly legend is measured and laid out
# again on every redraw, which cost the browser about 25 ms a click on a 2-core machine.
MAP_KEY = (f"<span style='color:{YOU}'>●</span> you (inferred) · <span style='color:{YOU}'>—</span> your path · "
           f"<span style='color:{YOU};opacity:.5'>■</span> uncertainty (1σ) · ★ archetypes · ✕ manual steering point")
CURVE_KEY = ("<span style='color:#55A868'>■</span>/<span style='color:#C44E52'>■</span> P(your choice) before each "
             "click (green: predicted right) · — running \"predicted your choice\" rate · ┈ chance")


# A light look set directly on the layout: resolving a named template ("plotly_white") costs about
# 20 ms per figure on a 2-core CPU, which a click that redraws two figures would pay every time.
_GRID = {"gridcolor": "#E5ECF6", "zerolinecolor": "#C8D4E3", "linecolor": "#C8D4E3"}
_TICKS = [-1.0, -0.5, 0.0, 0.5, 1.0]  # fixed map ticks: plotly need not work them out on every redraw
_LOOK = {"template": {}, "paper_bgcolor": "white", "plot_bgcolor": "white",
         "font": {"family": "sans-serif", "color": "#2a3f5f"}}


def ellipse(center: Sequence[float], cov: Sequence[Sequence[float]], n_std: float = 1.0, n: int = 60) -> np.ndarray:
    """Points (n, 2) on the n_std ellipse of a 2-D Gaussian."""
    c = np.asarray(cov, dtype=np.float64)[:2, :2]
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    vals = np.clip(vals, 0.0, None)
    t = np.linspace(0, 2 * math.pi, n)
    circle = np.stack([np.cos(t), np.sin(t)], 1)  # (n, 2)
    return np.asarray(center[:2]) + n_std * (circle * np.sqrt(vals)) @ vecs.T


def click_layer(axes: Sequence[str], step: float = MAP_STEP, limit: float = MAP_LIMIT) -> dict[str, Any]:
    """An invisible heatmap trace over [-limit, limit]^2, one cell per `step`.

    plotly only reports clicks on traces (`plotly_click`), so this layer makes a click anywhere in
    the steerable square register; the clicked cell's centre (x, y) is a multiple of `step`.
    """
    n = int(round(2 * limit / step)) + 1
    grid = [round(-limit + i * step, 6) + 0.0 for i in range(n)]  # (n,)
    return {"type": "heatmap", "x": grid, "y": grid, "z": [[0] * n for _ in range(n)],  # z: (n, n)
            "meta": CLICK_TARGET, "name": "steer here", "showscale": False, "showlegend": False,
            "colorscale": [[0, "rgba(0,0,0,0)"], [1, "rgba(0,0,0,0)"]],
            "hovertemplate": f"click to steer from here<br>{axes[0]} %{{x:.2f}} · {axes[1]} %{{y:.2f}}<extra></extra>"}


def _scatter(x: Sequence[float], y: Sequence[float], **kw: Any) -> dict[str, Any]:
    return {"type": "scatter", "x": [float(v) for v in x], "y": [float(v) for v in y], **kw}


def _axis(title: str, **kw: Any) -> dict[str, Any]:
    return {"title": {"text": title}, **_GRID, **kw}


def behaviour_map(latent: dict[str, Any], anchors: dict[str, Sequence[float]], axis_labels: dict[str, Sequence[str]],
                  axes: Sequence[str], manual: Sequence[float] | None = None, height: int = 430) -> dict[str, Any]:
    """The posterior's path over the behaviour map with its 1σ ellipse and the archetype anchors,
    as a plotly figure spec ({"data": traces, "layout": ...}, plain JSON-able values).

    The first trace is an invisible click layer over the steerable square (see `click_layer`),
    outlined by a dotted box; `manual` is the manual-steering point, drawn as a cross.
    """
    data = [click_layer(axes)]
    if anchors:  # one trace for all archetypes: each trace costs the browser a redraw on every click
        names = list(anchors)
        data.append(_scatter([anchors[k][0] for k in names], [anchors[k][1] for k in names], mode="markers+text",
                             text=names, textposition="bottom center", name="archetypes", hoverinfo="text",
                             marker={"symbol": "star", "size": 15, "color": [COLORS.get(k, "#888") for k in names]},
                             showlegend=False))
    traj = np.asarray(latent.get("trajectory") or [[latent["map"]["x"], latent["map"]["y"]]], dtype=np.float64)  # (T, 2)
    if len(traj) > 1:
        data.append(_scatter(traj[:, 0], traj[:, 1], mode="lines+markers", name="your path",
                             line={"color": YOU, "width": 1.5}, marker={"size": 5, "color": YOU},
                             text=[f"after {i} clicks" for i in range(len(traj))], hoverinfo="text"))
    cur = [float(latent["map"]["x"]), float(latent["map"]["y"])]
    e = ellipse(cur, latent["cov"])  # (60, 2)
    data.append(_scatter(e[:, 0], e[:, 1], mode="lines", fill="toself", fillcolor="rgba(106,61,154,0.15)",
                         line={"color": "rgba(106,61,154,0.5)"}, name="uncertainty (1σ)", hoverinfo="skip"))
    data.append(_scatter([cur[0]], [cur[1]], mode="markers", name="you (inferred)",
                         marker={"size": 13, "color": YOU, "line": {"color": "white", "width": 2}}))
    if manual is not None:
        data.append(_scatter([manual[0]], [manual[1]], mode="markers", name="manual steering point",
                             meta="manual-point", marker={"size": 13, "symbol": "x", "color": "black"}))
    ax0, ax1 = axes[0], axes[1]
    l0 = axis_labels.get(ax0, ["−", "+"])
    l1 = axis_labels.get(ax1, ["−", "+"])
    layout = {
        "height": height, "margin": {"l": 55, "r": 10, "t": 30, "b": 40}, **_LOOK,
        "shapes": [{"type": "rect", "x0": -MAP_LIMIT, "y0": -MAP_LIMIT, "x1": MAP_LIMIT, "y1": MAP_LIMIT,
                    "layer": "below", "line": {"color": "rgba(0,0,0,0.45)", "width": 1.5, "dash": "dot"}}],
        "xaxis": _axis(f"← {l0[0]}   {ax0}   {l0[1]} →", range=[-1.45, 1.45], zeroline=True, fixedrange=True,
                       tickvals=_TICKS),
        "yaxis": _axis(f"← {l1[0]}   {ax1}   {l1[1]} →", range=[-1.45, 1.45], zeroline=True, fixedrange=True,
                       tickvals=_TICKS),
        "showlegend": False,  # the key is MAP_KEY under the plot: a plotly legend costs ~25 ms a redraw
        "title": {"text": f"Behaviour map · {latent['n_clicks']} clicks", "x": 0.02},
        "hovermode": "closest", "dragmode": False}  # no zoom box: a press on the map is a click that steers
    return {"data": data, "layout": layout}


def learning_curve(latent: dict[str, Any], height: int = 300) -> dict[str, Any]:
    """Before each click, the model's probability of the choice you made; and the running accuracy
    (a plotly figure spec, as `behaviour_map`)."""
    p = [float(v) for v in latent.get("p_choice", []) if v is not None]
    acc = [float(v) for v in latent.get("running_accuracy", [])]
    x = list(range(1, len(p) + 1))
    data = [{"type": "bar", "x": x, "y": p, "name": "P(your choice) before the click",
             "marker": {"color": ["#55A868" if v > 0.5 else "#C44E52" for v in p]}},
            _scatter(x, acc, mode="lines+markers", name="running 'predicted your choice' rate", line={"color": "#333"})]
    acc_txt = f" · predicted {100 * latent['accuracy']:.0f}% of your clicks" if latent.get("accuracy") is not None else ""
    layout = {
        "height": height, "margin": {"l": 40, "r": 10, "t": 30, "b": 40}, **_LOOK,
        "shapes": [{"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "yref": "y", "y0": 0.5, "y1": 0.5,
                    "line": {"dash": "dot", "color": "#888"}}],  # the 50 % line
        "yaxis": _axis("probability", range=[0, 1.02]),
        "xaxis": _axis("click", **({"dtick": 1} if len(x) <= 20 else {})),
        "showlegend": False,  # the key is CURVE_KEY under the plot
        "title": {"text": "Learning curve" + acc_txt, "x": 0.02}}
    return {"data": data, "layout": layout}


def meters_html(attributes: dict[str, float], axis_labels: dict[str, Sequence[str]], words: int | None = None) -> str:
    """Small horizontal meters, one per behaviour axis, for a generated answer."""
    rows = []
    for ax, v in attributes.items():
        if ax == "words":
            continue
        lo, hi = (list(axis_labels.get(ax, ["−", "+"])) + ["", ""])[:2]
        pct = 50 + 50 * max(-1.0, min(1.0, float(v)))
        rows.append(
            f"<div style='display:flex;align-items:center;gap:6px;font-size:12px;margin:2px 0'>"
            f"<span style='width:90px;text-align:right'>{lo}</span>"
            f"<div style='flex:1;height:8px;background:#eee;border-radius:4px;position:relative'>"
            f"<div style='position:absolute;left:calc({pct:.1f}% - 4px);top:-2px;width:8px;height:12px;"
            f"background:{YOU};border-radius:3px'></div></div>"
            f"<span style='width:90px'>{hi}</span><span style='width:44px;color:#666'>{v:+.2f}</span></div>")
    if words is not None:
        rows.append(f"<div style='font-size:12px;color:#666'>{words} words</div>")
    return "".join(rows)
