"""How fast the demo's next-pair rules place a user: random against informative (BALD).

Simulated users (the four archetypes, and users on the square's edge) click on a persona
bundle's pool exactly as the demo's autopilot does (`core.session.Engine.simulate_choice`: BTL
on the gold attributes at temperature 0.1). After each click count the run records, per rule:

- map error: the distance from the user's weights to the map point the demo shows;
- held-out accuracy: how often the posterior predictive P(B ≻ A) picks the side the user's
  utility prefers, over the pool's pairs this session has not shown (exact ties left out);
- radius: the map point's largest coordinate (1 on the square's edge, 0 in its middle).

The two measures can disagree: informative clicks are near-ties for the user, after which the
encoder's z is accurate in direction but shorter, and the map (affine in z) reads a shorter z as
a user nearer the middle (README: "Informative pairs and the map").

    python -m core.experiments selection --bundle assets/models/persona-tiny [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic import write_text_atomic
from core.data import personas as P
from core.session import Engine, SessionState

MODES = ("random", "informative")


@dataclass
class SelectionConfig:
    clicks: list[int] = field(default_factory=lambda: [1, 2, 3, 6, 10, 15, 20])
    seeds: int = 6  # sessions per user and rule (session seed and click noise)
    edge_users: int = 8  # continuous users with weights on the square's boundary, besides the archetypes
    temperature: float = 0.1
    seed: int = 0  # draws the edge users

    def __post_init__(self) -> None:
        if not self.clicks or any(int(n) != n or n < 1 for n in self.clicks):
            raise ValueError(f"clicks must be whole numbers >= 1, got {self.clicks!r}")
        self.clicks = sorted({int(n) for n in self.clicks})
        if self.seeds < 1 or self.edge_users < 0:
            raise ValueError(f"need seeds >= 1 and edge_users >= 0, got {self.seeds}, {self.edge_users}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


def users(cfg: SelectionConfig) -> list[tuple[str, str, np.ndarray]]:
    """(name, group, weights): the archetypes, then cfg.edge_users users drawn on the square's edge."""
    rng = np.random.default_rng([cfg.seed, 31])
    out = [(k, "archetype", np.asarray(v, dtype=np.float64)) for k, v in P.ARCHETYPES.items()]
    out += [(f"edge {i}", "edge", np.asarray(P.sample_user(rng, "edge"))) for i in range(cfg.edge_users)]
    return out


def session_curve(engine: Engine, weights: np.ndarray, mode: str, seed: int, clicks: list[int],
                  temperature: float = 0.1) -> dict[int, dict[str, float]]:
    """One simulated session of max(clicks) clicks under `mode`; the measures after each count in clicks."""
    diff = np.array([[r["attributes"]["b"][ax] - r["attributes"]["a"][ax] for ax in engine.axes]
                     for r in engine.pool])  # (P, A)
    u = diff @ weights  # (P,) the user's utility of b over a
    rng = np.random.default_rng(seed)
    s = SessionState(mode=mode, seed=seed)
    out: dict[int, dict[str, float]] = {}
    for n in range(1, max(clicks) + 1):
        s = engine.next_pair(s)
        s = engine.choose(s, engine.simulate_choice(s, weights, temperature=temperature, rng=rng))
        if n not in clicks:
            continue
        lat = engine.latent(s)
        point = np.array([lat["map"]["x"], lat["map"]["y"]])
        unseen = np.ones(len(u), dtype=bool)
        unseen[[c["pair"] for c in s.clicks]] = False
        unseen &= u != 0
        p_b = engine.p_b(s)  # (P,)
        out[n] = {"map_error": float(np.linalg.norm(point - weights[:2])),
                  "accuracy": float(np.mean((p_b[unseen] > 0.5) == (u[unseen] > 0))),
                  "radius": float(np.abs(point).max())}
    return out


def _summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0,
            "n": int(len(v))}


def run_selection(engine: Engine, cfg: SelectionConfig | None = None) -> dict[str, Any]:
    """Every user x seed x rule; means and standard errors per rule, user group and click count."""
    cfg = cfg or SelectionConfig()
    if len(engine.axes) != 2:
        raise ValueError(f"the selection run needs a 2-axis map, this bundle has {engine.axes}")
    t0 = time.time()
    rows: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for name, group, w in users(cfg):
        for mode in MODES:
            for seed in range(cfg.seeds):
                for n, m in session_curve(engine, w, mode, seed, cfg.clicks, cfg.temperature).items():
                    for g in (group, "all"):
                        cell = rows.setdefault((mode, g, n), {k: [] for k in m})
                        for k, v in m.items():
                            cell[k].append(v)
    cells = [{"mode": mode, "users": g, "clicks": n, **{k: _summary(v) for k, v in m.items()}}
             for (mode, g, n), m in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0]))]
    return {"experiment": "selection", "config": asdict(cfg), "pool": len(engine.pool), "cells": cells,
            "seconds": round(time.time() - t0, 1)}


def format_table(res: dict[str, Any], users_group: str = "all") -> str:
    """Markdown: one row per click count, map error and held-out accuracy for each rule (mean ± SE)."""
    by = {(c["mode"], c["clicks"]): c for c in res["cells"] if c["users"] == users_group}
    lines = [f"users: {users_group}",
             "| clicks | map error, random | map error, informative | held-out acc., random | "
             "held-out acc., informative | radius, random | radius, informative |",
             "|---|---|---|---|---|---|---|"]
    for n in res["config"]["clicks"]:
        r, i = by[("random", n)], by[("informative", n)]
        f = lambda c, k, pct=False: (f"{100 * c[k]['mean']:.1f} ± {100 * c[k]['se']:.1f} %" if pct  # noqa: E731
                                     else f"{c[k]['mean']:.3f} ± {c[k]['se']:.3f}")
        lines.append(f"| {n} | {f(r, 'map_error')} | {f(i, 'map_error')} | {f(r, 'accuracy', True)} | "
                     f"{f(i, 'accuracy', True)} | {r['radius']['mean']:.2f} | {i['radius']['mean']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.experiments selection", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path, help="a persona bundle folder")
    ap.add_argument("--json", type=Path, help="write the full result here")
    ap.add_argument("--clicks", default="1,2,3,6,10,15,20", help="click counts to measure at")
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--edge-users", type=int, default=8)
    args = ap.parse_args(argv)
    from core.bundle import BundleError
    from core.persona import load_persona_bundle

    try:
        cfg = SelectionConfig(clicks=[int(x) for x in args.clicks.split(",")], seeds=args.seeds,
                              edge_users=args.edge_users)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        bundle = load_persona_bundle(args.bundle, policy=False, dpo=False)
    except BundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = run_selection(Engine.from_bundle(bundle), cfg)
    res["bundle"] = str(args.bundle)
    for g in ("archetype", "edge", "all"):
        if any(c["users"] == g for c in res["cells"]):
            print(format_table(res, g) + "\n")
    print(f"{res['seconds']} s")
    if args.json:
        write_text_atomic(args.json, json.dumps(res, indent=2) + "\n")
    return 0
