"""Steering experiment on a persona bundle: does the inferred z steer the reward model and the
policy's generations, for every archetype, both ways?

    python -m core.experiments steering --bundle assets/models/persona-tiny --json results/steering/tiny.json

Evaluated on the test split of the bundle's own persona world (regenerated from its recipe
seed; or `--pairs FILE`), at N_C ∈ {0, 1, 3, 5, 10}:

(i)   NP-BTL posterior-predictive accuracy per archetype and for continuous users on unseen
      pairs. Every pair conflicts for diagonal archetypes (their utilities are negatives), so
      these are conflicting pairs; "conflict_sum" adds two archetypes' accuracies on the pairs
      where they disagree (≈ 100 % user-blind, 200 % perfect).
(ii)  The same for the NP-DPO policy's implicit reward β·log π/π_ref, and for the DPO baseline.
(iii) Generation: greedy responses to held-out prompts, z inferred from the user's clicks on
      pairs of *other* prompts; gold attribute scores against the unconditioned DPO baseline and
      against a wrong-user control (z from the opposite archetype's clicks), over seeds.
(iv)  The behaviour map's error: distance of map(z) from the archetype's anchor (axes in [-1, 1]).

Contexts are drawn from the whole test split ("disjoint" tasks): targets are never in the
context. Writes JSON (every number, the target checks) and an HTML page of figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic import write_jsonl_atomic
from core.data import personas as P
from core.data.pairs import PairSet, load_pairs
from core.evaluate import conflict_sums, evaluate_cells, policy_score_fn, reward_score_fn
from core.experiments import figures as F
from core.encoder import Gaussian
from core.persona import PersonaBundle, load_persona_bundle, simulate_contexts


@dataclass
class SteeringConfig:
    contexts: tuple[int, ...] = (0, 1, 3, 5, 10)
    split: str = "test"
    seed: int = 0
    reward_tasks: int = 300  # tasks per (user, N_C) cell
    policy_tasks: int = 60
    n_targets: int = 8
    policy_batch: int = 8
    gen_seeds: int = 5
    gen_prompts: int = 8  # held-out prompts per seed
    gen_continuous: int = 8  # continuous users per seed (at the largest N_C)
    gen_batch: int = 64
    gen_contexts: tuple[int, ...] | None = None  # N_C values generated at (default: contexts)
    max_new_tokens: int = 160
    decoding: str = "greedy"  # greedy | sample (temperature, top_p; seeded per seed and batch)
    temperature: float = 0.7
    top_p: float = 0.95
    # SteerablePolicy.generate's repetition_penalty (1 = none) and no_repeat_ngram_size (0 = none);
    # None takes the bundle's own (its bundle.json `decoding`, what the demo uses)
    repetition_penalty: float | None = None
    no_repeat_ngram: int | None = None
    map_draws: int = 200  # context draws per archetype and N_C for the map error
    check_context: int = 5  # N_C at which generation targets are checked
    targets: dict[str, float] = field(default_factory=lambda: {
        "accuracy": 0.90, "conflict_sum": 1.75, "gap_se": 3.0, "word_ratio": 0.5, "map_error": 0.25})


# -- data ----------------------------------------------------------------------------------------

def bundle_pairs(bundle: PersonaBundle, path: Path | None, split: str) -> PairSet:
    """The evaluation split: from `path`, or regenerated from the bundle's recipe seed."""
    if path is not None:
        pairs = load_pairs(path)
    else:
        r = bundle.meta.get("recipe", {})
        pc = P.PersonaConfig(seed=int(r.get("seed", 0)), n_pairs_per_request=int(r.get("pairs_per_request", 8)),
                             conflict_rate=float(r.get("conflict_rate", 0.5)),
                             choice_temperature=float(r.get("choice_temperature", 0.1)))
        pairs = P.generate_pairset(pc)
    rows = pairs.indices(split)
    if len(rows) == 0:
        raise ValueError(f"{pairs.source}: no {split} pairs")
    missing = [t for t in bundle.archetypes if t not in pairs.user_types]
    if missing:
        raise ValueError(f"{pairs.source}: no choices for archetype(s) {', '.join(missing)}")
    return pairs.take(rows)


def embed(pairs: PairSet, cache_path: Path | None, embedder: str = "all-minilm-l6-v2") -> tuple[torch.Tensor, torch.Tensor]:
    """Option embeddings by the embedder a bundle records (its name, e.g. all-minilm-l6-v2+style-v1)."""
    from core.embed import EmbedderError, EmbeddingCache, embed_pairs, make_text_embedder, text_embedder_spec

    spec = text_embedder_spec(embedder)
    if spec is None:
        raise EmbedderError(f"the bundle's options were embedded with {embedder!r}, which this experiment can't rebuild")
    cache = EmbeddingCache(make_text_embedder(spec), cache_path)
    emb = embed_pairs(pairs, cache)
    if cache_path is not None:
        cache.save()
    return emb


def opposite(name: str, anchors: dict[str, list[float]]) -> str:
    """The archetype farthest from `name` (the diagonal opposite at the corners)."""
    a = np.asarray(anchors[name])
    return max((k for k in anchors if k != name), key=lambda k: float(np.linalg.norm(np.asarray(anchors[k]) - a)))


def one_axis_opposites(anchors: dict[str, list[float]], axis: int) -> list[tuple[str, str]]:
    """(low, high) archetype pairs that differ only on `axis`."""
    out = []
    for lo, a in anchors.items():
        for hi, b in anchors.items():
            d = np.asarray(b) - np.asarray(a)
            if d[axis] > 0 and np.allclose(np.delete(d, axis), 0):
                out.append((lo, hi))
    return out


# -- (i), (ii) accuracy ----------------------------------------------------------------------------

def accuracy_suite(pairs: PairSet, score, cfg: SteeringConfig, n_tasks: int, batch_size: int,
                   contexts: tuple[int, ...], anchors: dict[str, list[float]],
                   continuous: bool = True, all_conflicts: bool = True) -> dict[str, Any]:
    """Accuracy per archetype (and continuous users) by N_C, and conflict sums: for every two
    archetypes, or (all_conflicts=False, for the slower policies) only the opposite ones."""
    kw = dict(split=cfg.split, contexts=contexts, n_tasks=n_tasks, n_targets=cfg.n_targets, seed=cfg.seed,
              batch_size=batch_size, context_mode="disjoint")
    out = evaluate_cells(pairs, score, user_types=list(anchors), **kw)
    if continuous:
        cont = evaluate_cells(pairs, score, continuous={"weight_prior": "sphere", "choice_temperature": 0.1}, **kw)
        out["accuracy"]["continuous"] = cont["accuracy"]["continuous"]
    names = list(anchors)
    type_pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
                  if all_conflicts or b == opposite(a, anchors)]
    out["conflict_sum"] = conflict_sums(pairs, score, type_pairs=type_pairs, **kw)
    return out


# -- (iii) generation ------------------------------------------------------------------------------

def _z(encoder, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Posterior means (U, d_z) of U context sets."""
    with torch.no_grad():
        q = encoder(a, b, c, m)
    return (q.mean if isinstance(q, Gaussian) else q).float()


def _latents(encoder, emb, rows: np.ndarray, choices: np.ndarray) -> torch.Tensor:
    """Posterior means for U users with recorded choices: rows (U, C), choices (U, C)."""
    t = torch.as_tensor(rows, dtype=torch.long)
    return _z(encoder, emb[0][t], emb[1][t], torch.as_tensor(choices, dtype=torch.float32),
              torch.ones(t.shape, dtype=torch.bool))


def _decoding_name(cfg: SteeringConfig) -> str:
    name = cfg.decoding if cfg.decoding == "greedy" else f"sample T={cfg.temperature} top-p {cfg.top_p}"
    if cfg.repetition_penalty != 1.0:
        name += f", repetition penalty {cfg.repetition_penalty}"
    if cfg.no_repeat_ngram:
        name += f", no repeated {cfg.no_repeat_ngram}-grams"
    return name


def _generate(policy, prompts: list[str], z: torch.Tensor | None, cfg: SteeringConfig, seed: int = 0) -> list[str]:
    if cfg.decoding not in ("greedy", "sample"):
        raise ValueError(f"decoding must be greedy or sample, got {cfg.decoding!r}")
    out: list[str] = []
    for k, i in enumerate(range(0, len(prompts), cfg.gen_batch)):
        zi = None if z is None else z[i:i + cfg.gen_batch]
        kw: dict[str, Any] = dict(repetition_penalty=cfg.repetition_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram)
        if cfg.decoding == "sample":
            kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p,
                      seed=int(np.random.SeedSequence([cfg.seed, seed, k]).generate_state(1)[0]))
        out += policy.generate(prompts[i:i + cfg.gen_batch], zi, max_new_tokens=cfg.max_new_tokens, **kw)
    return out


EXTRA_COLUMNS = ("words", "repetition", "looping")  # after the axes: length, and guards against degenerate loops
TEXT_COLUMNS = (*P.AXES, *EXTRA_COLUMNS)  # the columns of `_scores`


def _scores(texts: list[str]) -> np.ndarray:
    """(n, A + 3): gold axis scores, word counts, repeated-trigram shares and looping flags (0 / 1)."""
    rows = []
    for t in texts:
        rep = P.repetition(t)
        rows.append([*P.score_all(t).values(), P.word_count(t), rep, float(rep > P.LOOPING_THRESHOLD)])  # = is_looping(t)
    return np.array(rows, dtype=np.float64).reshape(len(texts), len(P.AXES) + len(EXTRA_COLUMNS))


def generation_suite(bundle: PersonaBundle, pairs: PairSet, emb, cfg: SteeringConfig, log=print,
                     texts_out: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Generation steering (iii); every generated text is appended to `texts_out` when given."""
    dec = bundle.decoding
    cfg = replace(cfg, repetition_penalty=dec.repetition_penalty if cfg.repetition_penalty is None else cfg.repetition_penalty,
                  no_repeat_ngram=dec.no_repeat_ngram_size if cfg.no_repeat_ngram is None else cfg.no_repeat_ngram)
    policy, dpo = bundle.policy, bundle.dpo
    anchors = bundle.archetypes
    names = list(anchors)
    A = len(bundle.axes)
    cols = list(bundle.axes) + list(EXTRA_COLUMNS)
    W = len(cols)
    gen_c = tuple(cfg.gen_contexts or cfg.contexts)
    if cfg.check_context not in gen_c:
        raise ValueError(f"generation contexts {gen_c} must include check_context {cfg.check_context}")
    max_c = max(gen_c)
    prompts_all = sorted({p for p in pairs.prompts if p})
    type_col = {t: pairs.type_index(t) for t in names}
    # per seed: scores[cond][type][n_c] -> (W,) means over prompts
    per_seed: list[dict[str, Any]] = []
    examples: dict[str, Any] = {}
    cont_corr: list[list[float]] = []
    for s in range(cfg.gen_seeds):
        rng = np.random.default_rng([cfg.seed, 101, s])
        eval_prompts = list(rng.choice(prompts_all, cfg.gen_prompts, replace=False))
        held = set(eval_prompts)
        ctx_rows = np.array([i for i, p in enumerate(pairs.prompts) if p not in held])
        own = rng.permutation(ctx_rows)[:max_c]
        wrong = rng.permutation(ctx_rows)[:max_c]
        jobs: list[tuple[str, str, int]] = []
        zs: list[torch.Tensor] = []
        for t in names:
            for n_c in gen_c:
                r = own[:n_c][None]
                zs.append(_latents(policy.encoder, emb, r, pairs.choices[r, type_col[t]]))
                jobs.append(("steered", t, n_c))
                if n_c > 0:
                    r = wrong[:n_c][None]
                    zs.append(_latents(policy.encoder, emb, r, pairs.choices[r, type_col[opposite(t, anchors)]]))
                    jobs.append(("wrong", t, n_c))
        users = np.stack([P.sample_user(rng, "sphere") for _ in range(cfg.gen_continuous)]) if cfg.gen_continuous else None
        if users is not None:
            zs.append(_z(policy.encoder, *simulate_contexts(pairs, emb, users, max_c, ctx_rows, 0.1, rng)))
        Z = torch.cat(zs)  # (J [+ K], d_z)
        P_ = len(eval_prompts)
        texts = _generate(policy, eval_prompts * len(Z), Z.repeat_interleave(P_, 0), cfg, seed=2 * s)
        base_texts = _generate(dpo, eval_prompts, None, cfg, seed=2 * s + 1)
        sc = _scores(texts).reshape(len(Z), P_, W)  # (J [+ K], P, W)
        base = _scores(base_texts)  # (P, W)
        if texts_out is not None:
            conds = list(jobs) + [("continuous", f"user {u}", max_c) for u in range(len(Z) - len(jobs))]
            for j, (cond, t, n_c) in enumerate(conds):
                for q, prompt in enumerate(eval_prompts):
                    texts_out.append({"seed": s, "condition": cond, "user": t, "n_context": n_c, "prompt": prompt,
                                      "text": texts[j * P_ + q], **dict(zip(cols, sc[j, q].tolist()))})
            for q, prompt in enumerate(eval_prompts):
                texts_out.append({"seed": s, "condition": "baseline", "user": "", "n_context": 0, "prompt": prompt,
                                  "text": base_texts[q], **dict(zip(cols, base[q].tolist()))})
        seed_out: dict[str, Any] = {"baseline": base.mean(0).tolist(), "steered": {}, "wrong": {}}
        for j, (cond, t, n_c) in enumerate(jobs):
            seed_out[cond].setdefault(t, {})[str(n_c)] = sc[j].mean(0).tolist()
        if users is not None:
            cu = sc[len(jobs):].mean(1)  # (K, W)
            cont_corr.append([float(np.corrcoef(users[:, a], cu[:, a])[0, 1]) for a in range(A)])
        per_seed.append(seed_out)
        if s == 0:
            k = str(cfg.check_context)
            examples = {"prompt": eval_prompts[0], "baseline": base_texts[0],
                        **{t: texts[jobs.index(("steered", t, cfg.check_context)) * P_]
                           for t in names if ("steered", t, cfg.check_context) in jobs}, "n_context": k}
        log(f"  generation seed {s + 1}/{cfg.gen_seeds}: {len(texts) + len(base_texts)} responses")

    def stat(vals: list[list[float]]) -> dict[str, Any]:
        v = np.asarray(vals)  # (S, W)
        se = v.std(0, ddof=1) / np.sqrt(len(v)) if len(v) > 1 else np.full(v.shape[1], np.nan)
        return {c: {"mean": float(v[:, i].mean()), "se": float(se[i])} for i, c in enumerate(cols)}

    out: dict[str, Any] = {"columns": cols, "seeds": cfg.gen_seeds, "prompts_per_seed": cfg.gen_prompts,
                           "max_new_tokens": cfg.max_new_tokens,
                           "decoding": _decoding_name(cfg), "repetition_penalty": cfg.repetition_penalty,
                           "no_repeat_ngram": cfg.no_repeat_ngram,
                           "baseline": stat([s_["baseline"] for s_ in per_seed]), "steered": {}, "wrong": {},
                           "examples": examples}
    for cond in ("steered", "wrong"):
        for t in names:
            out[cond][t] = {str(c): stat([s_[cond][t][str(c)] for s_ in per_seed])
                            for c in gen_c if str(c) in per_seed[0][cond].get(t, {})}
    if cont_corr:
        cc = np.asarray(cont_corr)
        out["continuous_corr"] = {ax: {"mean": float(cc[:, a].mean()), "min": float(cc[:, a].min())}
                                  for a, ax in enumerate(bundle.axes)}
    # gaps between archetypes that differ on one axis only, per seed
    gaps: dict[str, Any] = {}
    k = str(cfg.check_context)
    for a, ax in enumerate(bundle.axes):
        for lo, hi in one_axis_opposites(anchors, a):
            d = np.array([s_["steered"][hi][k][a] - s_["steered"][lo][k][a] for s_ in per_seed])
            se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
            gaps[f"{ax}: {hi} - {lo}"] = {"mean": float(d.mean()), "se": se,
                                          "ratio": float(d.mean() / se) if se > 0 else float("inf")}
    out["gaps"] = gaps
    terse = [t for t in names if anchors[t][0] < 0]
    thorough = [t for t in names if anchors[t][0] > 0]
    w_terse = np.mean([out["steered"][t][k]["words"]["mean"] for t in terse])
    w_thor = np.mean([out["steered"][t][k]["words"]["mean"] for t in thorough])
    out["word_ratio"] = {"terse": float(w_terse), "thorough": float(w_thor), "ratio": float(w_terse / max(w_thor, 1e-9)),
                         "n_context": cfg.check_context}
    return out


# -- (iv) map ----------------------------------------------------------------------------------------

def map_suite(bundle: PersonaBundle, pairs: PairSet, emb, cfg: SteeringConfig) -> dict[str, Any]:
    anchors = bundle.archetypes
    rows_all = np.arange(len(pairs))
    rng = np.random.default_rng([cfg.seed, 202])
    out: dict[str, Any] = {"archetypes": {}, "continuous": {}}
    for t, anchor in anchors.items():
        col = pairs.type_index(t)
        out["archetypes"][t] = {}
        for n_c in cfg.contexts:
            rows = np.stack([rng.choice(rows_all, n_c, replace=False) for _ in range(cfg.map_draws)])  # (D, C)
            z = _latents(bundle.reward.encoder, emb, rows, pairs.choices[rows, col])  # (D, d_z)
            pts = bundle.map(z)  # (D, A)
            err = np.linalg.norm(pts - np.asarray(anchor), axis=1)
            out["archetypes"][t][str(n_c)] = {"error": float(err.mean()), "error_se": float(err.std(ddof=1) / np.sqrt(len(err))),
                                              "point": pts.mean(0).tolist()}
    users = np.stack([P.sample_user(rng, "square") for _ in range(cfg.map_draws)])  # (D, A)
    for n_c in cfg.contexts:
        pts = bundle.map(_z(bundle.reward.encoder, *simulate_contexts(pairs, emb, users, n_c, rows_all, 0.1, rng)))
        err = np.linalg.norm(pts - users, axis=1)
        out["continuous"][str(n_c)] = {"error": float(err.mean()), "error_se": float(err.std(ddof=1) / np.sqrt(len(err)))}
    return out


# -- targets ------------------------------------------------------------------------------------------

def check_targets(res: dict[str, Any], bundle: PersonaBundle, cfg: SteeringConfig) -> dict[str, Any]:
    tg = cfg.targets
    anchors = bundle.archetypes
    top = str(max(cfg.contexts))
    k = str(cfg.check_context)
    out: dict[str, Any] = {}
    for model in ("reward", "policy"):
        if model not in res:
            continue
        cells = {t: res[model]["accuracy"][t][top] for t in anchors}
        acc = {t: c["mean"] for t, c in cells.items()}
        worst = min(acc, key=acc.get)
        out[f"{model} accuracy at N_C={top} (min over archetypes)"] = {
            "value": acc[worst], "target": f">= {tg['accuracy']}", "met": acc[worst] >= tg["accuracy"],
            "per_archetype": acc,
            # how precise the verdict is: the worst cell's standard error over its tasks
            **({"se": cells[worst]["se"], "tasks": cells[worst].get("tasks")} if "se" in cells[worst] else {})}
        diag = {key: v[top]["sum"] for key, v in res[model]["conflict_sum"].items()
                if "skipped" not in v and all(opposite(t, anchors) in key for t in key.split(" + "))}
        if diag:
            out[f"{model} conflict sum of opposite archetypes at N_C={top} (min)"] = {
                "value": min(diag.values()), "target": f">= {tg['conflict_sum']}",
                "met": min(diag.values()) >= tg["conflict_sum"], "per_pair": diag}
    g = res.get("generation")
    if g:
        base = g["baseline"]
        right, wrong_ok = {}, {}
        for t, anchor in anchors.items():
            for a, ax in enumerate(bundle.axes):
                sign = np.sign(anchor[a])
                right[f"{t} / {ax}"] = bool(sign * (g["steered"][t][k][ax]["mean"] - base[ax]["mean"]) > 0)
                wrong_ok[f"{t} / {ax}"] = bool(sign * (g["wrong"][t][k][ax]["mean"] - base[ax]["mean"]) < 0)
        out[f"generation moves the right way at N_C={k} (archetype x axis)"] = {
            "value": f"{sum(right.values())}/{len(right)}", "target": "all", "met": all(right.values()), "cells": right}
        out[f"wrong-user control moves the other way at N_C={k}"] = {
            "value": f"{sum(wrong_ok.values())}/{len(wrong_ok)}", "target": "all", "met": all(wrong_ok.values()),
            "cells": wrong_ok}
        ratios = {key: v["ratio"] for key, v in g["gaps"].items()}
        out[f"gap between opposite archetypes / SE at N_C={k} (min)"] = {
            "value": min(ratios.values()), "target": f">= {tg['gap_se']} (and positive)",
            "met": min(ratios.values()) >= tg["gap_se"], "per_pair": ratios}
        wr = g["word_ratio"]["ratio"]
        out[f"words terse / thorough at N_C={k}"] = {"value": wr, "target": f"<= {tg['word_ratio']}",
                                                     "met": wr <= tg["word_ratio"]}
    m = res.get("map")
    if m:
        errs = {t: v[top]["error"] for t, v in m["archetypes"].items()}
        out[f"map error at N_C={top} (max over archetypes)"] = {
            "value": max(errs.values()), "target": f"<= {tg['map_error']}", "met": max(errs.values()) <= tg["map_error"],
            "per_archetype": errs}
    return out


# -- figures ------------------------------------------------------------------------------------------

def _figures(res: dict[str, Any], bundle: PersonaBundle) -> list[F.Figure]:
    figs = []
    names = list(bundle.archetypes) + ["continuous"]
    xs = [int(c) for c in res["config"]["contexts"]]
    tr = []
    for i, t in enumerate(names):
        col = F.PALETTE[i % len(F.PALETTE)]
        for model, dash in (("reward", None), ("policy", "dash")):
            if model in res and t in res[model]["accuracy"]:
                cells = res[model]["accuracy"][t]
                tr.append(F.line(xs, [100 * cells[str(c)]["mean"] for c in xs], f"{t} ({'NP-BTL' if model == 'reward' else 'NP-DPO'})",
                                 col, dash, error=[100 * cells[str(c)]["se"] for c in xs], group=t))
    if "dpo" in res:
        v = 100 * res["dpo"]["overall"]["0"]["mean"]
        tr.append(F.line(xs, [v] * len(xs), "DPO baseline (user-blind)", "#888888", "dot", mode="lines"))
    figs.append(F.figure(tr, "Accuracy on unseen pairs (solid NP-BTL, dashed NP-DPO implicit reward)",
                         "clicks in context (N_C)", "accuracy (%)"))
    g = res.get("generation")
    if g:
        for a, ax in enumerate(bundle.axes):
            tr = []
            for i, t in enumerate(bundle.archetypes):
                cells = g["steered"][t]
                cs = [c for c in xs if str(c) in cells]
                tr.append(F.line(cs, [cells[str(c)][ax]["mean"] for c in cs], t, F.PALETTE[i],
                                 error=[cells[str(c)][ax]["se"] for c in cs]))
            b = g["baseline"][ax]["mean"]
            tr.append(F.line(xs, [b] * len(xs), "DPO baseline", "#888888", "dot", mode="lines"))
            lo, hi = (bundle.map.axis_labels.get(ax) or ["-", "+"])[:2]
            figs.append(F.figure(tr, f"Generated responses: gold {ax} score ({lo} = -1, {hi} = +1)",
                                 "clicks in context (N_C)", f"{ax} score"))
    m = res.get("map")
    if m:
        tr = []
        top = str(max(xs))
        for i, (t, anchor) in enumerate(bundle.archetypes.items()):
            path = [m["archetypes"][t][str(c)]["point"] for c in xs]
            tr.append({"type": "scatter", "x": [p[0] for p in path], "y": [p[1] for p in path], "mode": "lines+markers+text",
                       "text": [f"{c}" for c in xs], "textposition": "top center", "name": f"{t} (mean map(z) by N_C)",
                       "line": {"color": F.PALETTE[i]}})
            tr.append({"type": "scatter", "x": [anchor[0]], "y": [anchor[1]], "mode": "markers", "name": f"{t} anchor",
                       "marker": {"symbol": "star", "size": 16, "color": F.PALETTE[i]}, "showlegend": False})
        ax0, ax1 = bundle.axes[:2]
        figs.append(F.figure(tr, f"Behaviour map: inferred users by clicks (error at N_C={top}: "
                                 + ", ".join(f"{t} {m['archetypes'][t][top]['error']:.2f}" for t in bundle.archetypes) + ")",
                             ax0, ax1, xaxis={"range": [-1.3, 1.3], "title": {"text": ax0}},
                             yaxis={"range": [-1.3, 1.3], "title": {"text": ax1}}, height=560))
    return figs


# -- driver -------------------------------------------------------------------------------------------

def run(bundle_dir: Path, json_out: Path, cfg: SteeringConfig, pairs_path: Path | None = None,
        html_out: Path | None = None, embed_cache: Path | None = None, parts: tuple[str, ...] = ("reward", "policy", "dpo", "generation", "map"),
        log=print) -> dict[str, Any]:
    t0 = time.time()
    need_lm = bool({"policy", "dpo", "generation"} & set(parts))
    bundle = load_persona_bundle(bundle_dir, policy=need_lm, dpo=need_lm)
    pairs = bundle_pairs(bundle, pairs_path, cfg.split)
    emb = embed(pairs, embed_cache, str(bundle.meta.get("embedder", "all-minilm-l6-v2")))
    log(f"{bundle.name}: {len(pairs)} {cfg.split} pairs, {len({p for p in pairs.prompts})} prompts")
    anchors = bundle.archetypes
    res: dict[str, Any] = {"bundle": str(bundle_dir), "name": bundle.name, "config": asdict(cfg),
                           "pairs": pairs.source, "n_pairs": len(pairs)}
    if "reward" in parts:
        t = time.time()
        res["reward"] = accuracy_suite(pairs, reward_score_fn(bundle.reward, emb, cfg.seed), cfg, cfg.reward_tasks,
                                       250, cfg.contexts, anchors)
        log(f"(i) NP-BTL accuracy: {time.time() - t:.0f} s")
    if bundle.policy is not None:
        bundle.policy.merge_for_inference()
        bundle.dpo.merge_for_inference()
    if "policy" in parts:
        t = time.time()
        res["policy"] = accuracy_suite(pairs, policy_score_fn(bundle.policy, pairs, emb), cfg, cfg.policy_tasks,
                                       cfg.policy_batch, cfg.contexts, anchors, all_conflicts=False)
        log(f"(ii) NP-DPO implicit accuracy: {time.time() - t:.0f} s")
    if "dpo" in parts:
        t = time.time()
        res["dpo"] = accuracy_suite(pairs, policy_score_fn(bundle.dpo, pairs, None), cfg, cfg.policy_tasks,
                                    cfg.policy_batch, (0,), anchors, continuous=False,
                                    all_conflicts=False)
        log(f"(ii) DPO baseline implicit accuracy: {time.time() - t:.0f} s")
    if "generation" in parts:
        t = time.time()
        texts: list[dict[str, Any]] = []
        res["generation"] = generation_suite(bundle, pairs, emb, cfg, log, texts_out=texts)
        texts_file = write_jsonl_atomic(json_out.with_suffix(".texts.jsonl"), texts)
        res["generation"]["texts"] = str(texts_file)
        log(f"(iii) generation: {time.time() - t:.0f} s ({len(texts)} texts in {texts_file})")
    if "map" in parts:
        res["map"] = map_suite(bundle, pairs, emb, cfg)
    res["targets"] = check_targets(res, bundle, cfg)
    res["seconds"] = round(time.time() - t0, 1)
    F.write_json(json_out, res)
    html_out = html_out or json_out.with_suffix(".html")
    F.write_html(html_out, _figures(res, bundle), f"Steering: {bundle.name}",
                 notes="Accuracy per archetype and for continuous users by clicks in context; gold attribute scores of "
                       "generated answers against the unconditioned DPO baseline; where the behaviour map places "
                       "the inferred user.")
    log(format_summary(res))
    log(f"wrote {json_out} and {html_out} ({res['seconds']:.0f} s)")
    return res


def format_summary(res: dict[str, Any]) -> str:
    lines = [f"== {res['name']}: targets =="]
    for name, v in res["targets"].items():
        val = v["value"]
        val = f"{val:.3f}" if isinstance(val, float) else str(val)
        if "se" in v:
            val += f" ± {v['se']:.3f}" + (f" ({v['tasks']} tasks per cell)" if v.get("tasks") else "")
        lines.append(f"  [{'met' if v['met'] else 'MISSED'}] {name}: {val} (target {v['target']})")
    for model, label in (("reward", "NP-BTL"), ("policy", "NP-DPO")):
        if model in res:
            acc = res[model]["accuracy"]
            cs = list(next(iter(acc.values())))
            lines.append(f"  {label} accuracy (%) by N_C {', '.join(cs)}:")
            for t, cells in acc.items():
                lines.append(f"    {t:18s} " + " ".join(f"{100 * cells[c]['mean']:5.1f}" for c in cs))
    g = res.get("generation")
    if g:
        lines.append(f"  generation at N_C={res['config']['check_context']} ({', '.join(g['columns'])}); "
                     f"baseline " + " ".join(f"{g['baseline'][c]['mean']:+.2f}" for c in g["columns"]))
        k = str(res["config"]["check_context"])
        for t in g["steered"]:
            lines.append(f"    {t:18s} own " + " ".join(f"{g['steered'][t][k][c]['mean']:+.2f}" for c in g["columns"])
                         + "   wrong-user " + " ".join(f"{g['wrong'][t][k][c]['mean']:+.2f}" for c in g["columns"]))
    return "\n".join(lines)


def texts_summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per condition and user (continuous users pooled): the texts rescored with the current gold
    scorers and loop measures, averaged, and the mean zlib compression ratio of the `n_long` texts of
    `P.COMPRESSION_MIN_CHARS` or more (NaN without one). Rows are those of a steering run's OUT.texts.jsonl."""
    groups: dict[str, list[np.ndarray]] = {}
    ratios: dict[str, list[float]] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str) or "condition" not in r:
            raise ValueError(f"row {i + 1}: expected an object with 'condition' and a string 'text'")
        key = r["condition"] if r["condition"] in ("baseline", "continuous") else f"{r['condition']}: {r.get('user', '')}"
        groups.setdefault(key, []).append(_scores([r["text"]])[0])
        if len(r["text"]) >= P.COMPRESSION_MIN_CHARS:
            ratios.setdefault(key, []).append(P.compression_ratio(r["text"]))
    return {k: {"n": float(len(v)), **{c: float(x) for c, x in zip(TEXT_COLUMNS, np.mean(v, 0))},
                "n_long": float(len(ratios.get(k, []))),
                "compression": float(np.mean(ratios[k])) if k in ratios else float("nan")}
            for k, v in sorted(groups.items())}


def texts_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.experiments texts",
                                 description="Rescore a steering run's generated texts (OUT.texts.jsonl) with the current "
                                             "gold scorers and loop measures; prints a table per condition and user, with "
                                             "the mean zlib compression ratio of the long texts.")
    ap.add_argument("files", type=Path, nargs="+")
    args = ap.parse_args(argv)
    for f in args.files:
        try:
            rows = [json.loads(line) for line in f.read_text(encoding="utf-8").split("\n") if line.strip()]  # not splitlines: U+2028 may sit in a text
            table = texts_summary(rows)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            print(f"error: {f}: {e}", file=sys.stderr)
            return 2
        print(f"== {f} ({len(rows)} texts)")
        print(f"  {'condition':34s} {'n':>5s} " + " ".join(f"{c:>10s}" for c in TEXT_COLUMNS)
              + f" {'n_long':>6s} {'compression':>11s}")
        for k, v in table.items():
            print(f"  {k:34s} {int(v['n']):5d} " + " ".join(f"{v[c]:10.3f}" for c in TEXT_COLUMNS)
                  + f" {int(v['n_long']):6d} {v['compression']:11.3f}")
    return 0


def parse_whole_numbers(text: str, flag: str) -> tuple[int, ...]:
    """'10' or '0,5,10' -> (0, 5, 10): distinct whole numbers >= 0, in increasing order."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 0 or len(set(vals)) != len(vals):
        raise ValueError(f"{flag} {text!r}: give distinct whole numbers >= 0, comma-separated, e.g. 0,5,10")
    return tuple(sorted(vals))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.experiments steering", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="a persona bundle folder")
    ap.add_argument("--json", type=Path, required=True, help="output JSON (an HTML page is written beside it)")
    ap.add_argument("--pairs", type=Path, help="evaluation pairs (default: regenerate the bundle's persona world)")
    ap.add_argument("--embed-cache", type=Path, help="safetensors cache of option embeddings")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-seeds", type=int, default=SteeringConfig.gen_seeds)
    ap.add_argument("--gen-prompts", type=int, default=SteeringConfig.gen_prompts)
    ap.add_argument("--policy-tasks", type=int, default=SteeringConfig.policy_tasks)
    ap.add_argument("--reward-tasks", type=int, default=SteeringConfig.reward_tasks)
    ap.add_argument("--max-new-tokens", type=int, default=SteeringConfig.max_new_tokens)
    ap.add_argument("--decoding", choices=("greedy", "sample"), default=SteeringConfig.decoding,
                    help="greedy (what the demo shows) or seeded sampling at --temperature")
    ap.add_argument("--temperature", type=float, default=SteeringConfig.temperature)
    ap.add_argument("--repetition-penalty", type=float, default=SteeringConfig.repetition_penalty,
                    help="CTRL repetition penalty in decoding (1 = none; default: the bundle's)")
    ap.add_argument("--no-repeat-ngram", type=int, default=SteeringConfig.no_repeat_ngram,
                    help="forbid repeating any token n-gram of this size in an answer (0 = none; default: the bundle's)")
    ap.add_argument("--contexts", help="comma-separated N_C values to score at (default: 0,1,3,5,10; --quick: 0,1,5); "
                                       "the tasks at each N_C are those of a run over more N_C with the same --seed")
    ap.add_argument("--gen-contexts", help="comma-separated N_C values to generate at (default: all); must include 5")
    ap.add_argument("--parts", default="reward,policy,dpo,generation,map",
                    help="comma-separated subset of reward,policy,dpo,generation,map")
    ap.add_argument("--quick", action="store_true", help="few tasks and seeds: checks the pipeline, not the numbers")
    args = ap.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = sorted(set(parts) - {"reward", "policy", "dpo", "generation", "map"})
    if bad:
        ap.error(f"unknown --parts {', '.join(bad)}")
    try:
        contexts = (parse_whole_numbers(args.contexts, "--contexts") if args.contexts
                    else (0, 1, 5) if args.quick else SteeringConfig.contexts)
        gen_contexts = parse_whole_numbers(args.gen_contexts, "--gen-contexts") if args.gen_contexts else None
    except ValueError as e:
        ap.error(str(e))
    if "generation" in parts and SteeringConfig.check_context not in (gen_contexts or contexts):
        ap.error(f"generation is checked at N_C={SteeringConfig.check_context}: include it in "
                 f"{'--gen-contexts' if gen_contexts else '--contexts'}, or leave generation out of --parts")
    gen_kw = dict(decoding=args.decoding, temperature=args.temperature, repetition_penalty=args.repetition_penalty,
                  no_repeat_ngram=args.no_repeat_ngram,
                  gen_contexts=gen_contexts)
    cfg = SteeringConfig(seed=args.seed, contexts=contexts, gen_seeds=args.gen_seeds, gen_prompts=args.gen_prompts,
                         policy_tasks=args.policy_tasks, reward_tasks=args.reward_tasks, max_new_tokens=args.max_new_tokens,
                         **gen_kw)
    if args.quick:
        cfg = SteeringConfig(seed=args.seed, contexts=contexts, reward_tasks=20, policy_tasks=4, gen_seeds=2,
                             gen_prompts=2, gen_continuous=3, max_new_tokens=24, map_draws=10, check_context=5,
                             **gen_kw)
    from core.bundle import BundleError

    try:
        run(args.bundle, args.json, cfg, args.pairs, embed_cache=args.embed_cache, parts=parts)
    except (BundleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
