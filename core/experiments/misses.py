"""Where a persona bundle's NP-BTL and NP-DPO go wrong: every scored pair at one N_C, with the
user's exact utility difference, broken down.

    python -m core.experiments misses --bundle DIR --json OUT [--users "busy executive,friendly tutor"]
        [--seeds 0,1,2,3] [--tasks 10] [--n-context 10] [--models reward,policy]

The tasks are those of `python -m core.experiments steering --parts policy --policy-tasks TASKS
--seed S` at that N_C (the same sampler, seed, 8 targets per task and batches of 8), so the
per-task accuracies here reproduce the policy's cells there. For each archetype and model it prints

- the accuracy against the recorded (BTL-noisy) choices, and the label ceiling: how often those
  choices agree with the sign of the user's noiseless utility difference d = w · (att_b − att_a);
- the accuracy where the axes agree (every axis's share w_i · Δatt_i of d has the same sign) and
  where they pull against each other (a terse + formal user asked to choose between a short warm
  answer and a long formal one);
- the accuracy by |d|, the utility margin;
- among its mistakes, how often the option it preferred is higher on each axis (longer, warmer).

`--probe` adds the feature ceiling: a ridge probe from the bundle's option features to the gold
attributes, and how often its attributes pick the same option as the gold ones for each user.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from core.data import personas as P

MODELS = ("reward", "policy")


@dataclass
class MissesConfig:
    users: tuple[str, ...] = ()  # archetypes (default: the bundle's)
    seeds: tuple[int, ...] = (0,)
    tasks: int = 10  # tasks per user and seed
    n_context: int = 10
    n_targets: int = 8
    batch: int = 8  # tasks per batch: the steering experiment's policy_batch
    split: str = "test"
    margins: tuple[float, ...] = (0.25, 0.5, 1.0)  # |d| bin edges


# -- the breakdown (pure) ---------------------------------------------------------------------------

def _acc(correct: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    n = int(mask.sum())
    return {"n": n, "accuracy": float(correct[mask].mean()) if n else float("nan")}


def breakdown(records: Sequence[dict[str, Any]], axes: Sequence[str], margins: Sequence[float] = (0.25, 0.5, 1.0),
              models: Sequence[str] = MODELS) -> dict[str, Any]:
    """Per user: label ceiling and, per model, accuracy overall, by axis agreement, by |d| and the
    direction of its mistakes. A record holds user, task (any hashable id per task), choice (1 = b),
    d, contrib (per axis, w_i · Δatt_i), delta (per axis, att_b − att_a) and, per model, `reward_p`
    (p(b ≻ a)) or `policy_logit` (b over a). Tied choices (0.5) must already be left out."""
    out: dict[str, Any] = {}
    edges = [0.0, *margins, np.inf]
    for u in sorted({r["user"] for r in records}):
        R = [r for r in records if r["user"] == u]
        choice = np.array([r["choice"] for r in R]) > 0.5  # (n,) b chosen
        d = np.array([r["d"] for r in R], dtype=np.float64)  # (n,)
        contrib = np.array([r["contrib"] for r in R], dtype=np.float64).reshape(len(R), len(axes))  # (n, A)
        delta = np.array([r["delta"] for r in R], dtype=np.float64).reshape(len(R), len(axes))  # (n, A)
        task = [r["task"] for r in R]
        pos, neg = (contrib > 0).any(1), (contrib < 0).any(1)
        conflict = pos & neg  # (n,) the axes pull against each other
        decided = d != 0
        cell: dict[str, Any] = {
            "pairs": len(R), "tasks": len(set(task)),
            "label_ceiling": _acc((d > 0) == choice, decided),
            "axes_conflict_share": float(conflict.mean()) if len(R) else float("nan"),
        }
        prefs = {}
        for m in models:
            key = "reward_p" if m == "reward" else "policy_logit"
            if not R or key not in R[0]:
                continue
            v = np.array([r[key] for r in R], dtype=np.float64)
            prefers_b = v > (0.5 if m == "reward" else 0.0)  # (n,)
            prefs[m] = prefers_b
            correct = prefers_b == choice
            by_task: dict[Any, list[bool]] = {}
            for t, c in zip(task, correct):
                by_task.setdefault(t, []).append(bool(c))
            per_task = np.array([np.mean(c) for c in by_task.values()])
            wrong = ~correct
            preferred_minus_other = np.where(prefers_b[:, None], delta, -delta)  # (n, A)
            cell[m] = {
                **_acc(correct, np.ones(len(R), bool)),
                "task_mean": float(per_task.mean()) if len(per_task) else float("nan"),
                "task_se": float(per_task.std(ddof=1) / np.sqrt(len(per_task))) if len(per_task) > 1 else float("nan"),
                "agrees_with_utility": _acc(prefers_b == (d > 0), decided)["accuracy"],
                "axes_agree": _acc(correct, ~conflict),
                "axes_conflict": _acc(correct, conflict),
                "margin": {f"[{lo:g}, {hi:g})": _acc(correct, (np.abs(d) >= lo) & (np.abs(d) < hi))
                           for lo, hi in zip(edges[:-1], edges[1:])},
                "mistakes": {"n": int(wrong.sum()),
                             **{f"preferred higher {a}": float((preferred_minus_other[wrong, i] > 0).mean())
                                if wrong.any() else float("nan") for i, a in enumerate(axes)}},
            }
        if len(prefs) == 2:
            cell["models_agree"] = float((prefs["reward"] == prefs["policy"]).mean())
        out[u] = cell
    return out


def format_breakdown(res: dict[str, Any]) -> str:
    lines = []
    for u, c in res.items():
        lc = c["label_ceiling"]
        lines.append(f"== {u}: {c['pairs']} pairs over {c['tasks']} tasks; the recorded choices follow the "
                     f"utility's sign on {100 * lc['accuracy']:.1f} %; the axes pull apart on "
                     f"{100 * c['axes_conflict_share']:.0f} %")
        for m in MODELS:
            if m not in c:
                continue
            s = c[m]
            margin = ", ".join(f"|d| {k} {100 * v['accuracy']:.0f} % (n={v['n']})" for k, v in s["margin"].items())
            mis = ", ".join(f"{k} {100 * v:.0f} %" for k, v in s["mistakes"].items() if k != "n")
            lines.append(f"  {m:6s} {100 * s['task_mean']:5.1f} ± {100 * s['task_se']:.1f} %  axes agree "
                         f"{100 * s['axes_agree']['accuracy']:.1f} % (n={s['axes_agree']['n']}), pull apart "
                         f"{100 * s['axes_conflict']['accuracy']:.1f} % (n={s['axes_conflict']['n']})")
            lines.append(f"         {margin}")
            lines.append(f"         {s['mistakes']['n']} mistakes: {mis}")
        if "models_agree" in c:
            lines.append(f"  NP-DPO and NP-BTL pick the same option on {100 * c['models_agree']:.1f} %")
    return "\n".join(lines)


# -- the feature ceiling: how well the option features determine the gold attributes ---------------

def ridge_fit(x: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Ridge regression on standardised inputs with an unpenalised intercept: x (n, D), y (n, A) ->
    (mean (D,), scale (D,), coef (D, A), intercept (A,))."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd  # (n, D)
    y0 = y.mean(0)  # (A,)
    coef = np.linalg.solve(xs.T @ xs + lam * np.eye(x.shape[1]), xs.T @ (y - y0))  # (D, A)
    return mu, sd, coef, y0


def ridge_predict(fit: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    mu, sd, coef, y0 = fit
    return (x - mu) / sd @ coef + y0  # (n, A)


def r2(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(A,) coefficient of determination per column."""
    return 1 - ((pred - y) ** 2).mean(0) / y.var(0)


def feature_probe(x: dict[str, np.ndarray], y: dict[str, np.ndarray], users: dict[str, Sequence[float]],
                  axes: Sequence[str], lams: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)) -> dict[str, Any]:
    """A linear probe from option features to the gold attributes. x[split] (n, 2, D) and y[split]
    (n, 2, A) hold both options of every pair of the train, val and test splits. The ridge penalty
    is chosen on val (mean R²); R² per axis is reported on test, with each user's sign agreement:
    how often the probe's attributes give the same preferred option as the gold ones (pairs with
    d = 0 left out). A model reading these features through a linear head can at best match it."""
    flat = {k: (v.reshape(-1, v.shape[-1]).astype(np.float64)) for k, v in x.items()}  # (2n, D)
    flat_y = {k: v.reshape(-1, v.shape[-1]).astype(np.float64) for k, v in y.items()}  # (2n, A)
    scores = {lam: float(r2(ridge_predict(ridge_fit(flat["train"], flat_y["train"], lam), flat["val"]),
                            flat_y["val"]).mean()) for lam in lams}
    lam = max(scores, key=scores.get)
    fit = ridge_fit(flat["train"], flat_y["train"], lam)
    pred = ridge_predict(fit, flat["test"]).reshape(y["test"].shape)  # (n, 2, A)
    gold_d, pred_d = y["test"][:, 1] - y["test"][:, 0], pred[:, 1] - pred[:, 0]  # (n, A)
    agree = {}
    for u, w in users.items():
        d = gold_d @ np.asarray(w, dtype=np.float64)  # (n,)
        keep = d != 0
        agree[u] = float(np.mean(np.sign(pred_d[keep] @ np.asarray(w, dtype=np.float64)) == np.sign(d[keep])))
    return {"lambda": lam, "val_r2_by_lambda": {f"{k:g}": v for k, v in scores.items()},
            "test_r2": dict(zip(axes, r2(pred.reshape(-1, len(axes)), y["test"].reshape(-1, len(axes))).tolist())),
            "sign_agreement": agree, "options": {k: int(v.shape[0]) for k, v in flat.items()}}


# -- collecting records (the bundle's models on the steering experiment's tasks) -------------------

def collect(bundle, pairs, emb, cfg: MissesConfig, models: Sequence[str], log=print) -> list[dict[str, Any]]:
    from core.data.tasks import TaskConfig, TaskSampler
    from core.policy import PolicyData
    from core.reward import gather_features

    idx = [pairs.attribute_names.index(a) for a in P.AXES]
    att = pairs.attributes[:, :, idx].astype(np.float64)  # (n, 2, A)
    delta_all = att[:, 1] - att[:, 0]  # (n, A)
    data = PolicyData(bundle.policy, pairs, emb) if "policy" in models else None
    g = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for seed in cfg.seeds:
        tcfg = TaskConfig(n_targets=cfg.n_targets, max_context=cfg.n_context, context_mode="disjoint")
        sampler = TaskSampler(pairs, tcfg, split=cfg.split, seed=seed)
        for u in cfg.users:
            w = np.asarray(P.ARCHETYPES[u], dtype=np.float64)  # (A,) the gold utility's weights
            for k, left in enumerate(range(cfg.tasks, 0, -cfg.batch)):
                b = sampler.sample(k, min(cfg.batch, left), n_context=cfg.n_context, user_type=u)
                scored = b.unseen_mask & b.target_mask & (b.target_choice != 0.5)  # (B, T)
                with torch.no_grad():
                    p = bundle.reward.predict(gather_features(b, emb[0], emb[1]), g) if "reward" in models else None
                    logit = torch.full(scored.shape, float("nan"))
                    if data is not None and scored.any():
                        inp = data.inputs(bundle.policy, b, scored).to(bundle.policy.device)
                        logit[torch.as_tensor(scored)] = bundle.policy.dpo_logits(inp).float().cpu()
                for i, j in np.argwhere(np.asarray(scored)):
                    r = int(b.target_idx[i, j])
                    rec = {"seed": seed, "user": u, "task": f"{seed}/{k * cfg.batch + i}", "row": r,
                           "choice": float(b.target_choice[i, j]), "d": float(delta_all[r] @ w),
                           "contrib": (w * delta_all[r]).tolist(), "delta": delta_all[r].tolist()}
                    if p is not None:
                        rec["reward_p"] = float(p[i, j])
                    if data is not None:
                        rec["policy_logit"] = float(logit[i, j])
                    rows.append(rec)
            log(f"seed {seed}, {u}: {time.time() - t0:.0f} s")
    return rows


def run(bundle_dir: Path, json_out: Path, cfg: MissesConfig, models: Sequence[str] = MODELS, log=print,
        probe: bool = False, embed_cache: Path | None = None) -> dict[str, Any]:
    from core.atomic import write_jsonl_atomic
    from core.experiments import figures as F
    from core.experiments.steering import bundle_pairs, embed
    from core.persona import load_persona_bundle

    bundle = load_persona_bundle(bundle_dir, policy="policy" in models, dpo=False)
    known = [u for u in bundle.archetypes if u in P.ARCHETYPES]
    unknown = [u for u in cfg.users if u not in known]
    if unknown:
        raise ValueError(f"unknown user(s) {unknown}; this bundle's persona archetypes are {known}")
    users = cfg.users or tuple(known)
    cfg = MissesConfig(**{**asdict(cfg), "users": users})
    pairs = bundle_pairs(bundle, None, cfg.split)
    if pairs.attributes is None:
        raise ValueError(f"{pairs.source}: the pairs carry no attributes, so utilities can't be computed")
    embedder = str(bundle.meta.get("embedder", "all-minilm-l6-v2"))
    emb = embed(pairs, embed_cache, embedder)
    if bundle.policy is not None:
        bundle.policy.merge_for_inference()
        bundle.policy.eval()
    bundle.reward.eval()
    t0 = time.time()
    records = collect(bundle, pairs, emb, cfg, models, log)
    res = {"bundle": str(bundle_dir), "name": bundle.name, "config": asdict(cfg), "models": list(models),
           "users": breakdown(records, P.AXES, cfg.margins, models), "seconds": round(time.time() - t0, 1)}
    if probe:
        t = time.time()
        x, y = {}, {}
        idx = [pairs.attribute_names.index(a) for a in P.AXES]
        for split in ("train", "val", "test"):
            sp = pairs if split == cfg.split else bundle_pairs(bundle, None, split)
            e = embed(sp, embed_cache, embedder)
            x[split] = torch.stack([e[0], e[1]], 1).numpy()  # (n, 2, D)
            y[split] = sp.attributes[:, :, idx]  # (n, 2, A)
        res["feature_probe"] = feature_probe(x, y, {u: P.ARCHETYPES[u] for u in users}, P.AXES)
        fp = res["feature_probe"]
        log(f"feature probe (ridge, lambda {fp['lambda']:g} chosen on val, {time.time() - t:.0f} s): test R² "
            + ", ".join(f"{a} {v:.3f}" for a, v in fp["test_r2"].items()) + "; sign agreement with the gold "
            "attributes " + ", ".join(f"{u} {100 * v:.1f} %" for u, v in fp["sign_agreement"].items()))
    F.write_json(json_out, res)
    rec_file = write_jsonl_atomic(json_out.with_suffix(".pairs.jsonl"), records)
    log(format_breakdown(res["users"]))
    log(f"wrote {json_out} and {rec_file} ({res['seconds']:.0f} s)")
    return res


def main(argv: list[str] | None = None) -> int:
    from core.experiments.steering import parse_whole_numbers

    ap = argparse.ArgumentParser(prog="python -m core.experiments misses", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="a persona bundle folder")
    ap.add_argument("--json", type=Path, required=True, help="output JSON (the per-pair records are written beside it)")
    ap.add_argument("--users", help="comma-separated archetypes (default: all of the bundle's)")
    ap.add_argument("--seeds", default="0", help="comma-separated task seeds, as steering's --seed")
    ap.add_argument("--tasks", type=int, default=MissesConfig.tasks, help="tasks per user and seed")
    ap.add_argument("--n-context", type=int, default=MissesConfig.n_context, help="clicks in each task's context")
    ap.add_argument("--models", default="reward,policy", help="reward, policy or both")
    ap.add_argument("--probe", action="store_true",
                    help="also fit a linear probe from the option features to the gold attributes (embeds the train "
                         "and val options too: minutes with MiniLM)")
    ap.add_argument("--embed-cache", type=Path, help="safetensors cache of option embeddings (read and extended)")
    args = ap.parse_args(argv)
    try:
        seeds = parse_whole_numbers(args.seeds, "--seeds")
        models = tuple(m.strip() for m in args.models.split(",") if m.strip())
        if not models or set(models) - set(MODELS) or len(set(models)) != len(models):
            raise ValueError(f"--models {args.models!r}: give reward, policy or reward,policy")
        if args.tasks < 1 or args.n_context < 0:
            raise ValueError(f"--tasks {args.tasks} / --n-context {args.n_context}: need at least 1 task and 0 clicks")
    except ValueError as e:
        ap.error(str(e))
    users = tuple(u.strip() for u in args.users.split(",") if u.strip()) if args.users else ()
    cfg = MissesConfig(users=users, seeds=seeds, tasks=args.tasks, n_context=args.n_context)
    from core.bundle import BundleError

    try:
        run(args.bundle, args.json, cfg, tuple(m for m in MODELS if m in models), probe=args.probe,
            embed_cache=args.embed_cache)
    except (BundleError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
