"""Evaluation CLI: accuracy on unseen pairs by user type and context size.

    python -m core.evaluate reward --bundle DIR --pairs FILE --split test --contexts 0,1,3,5,10 --json OUT

Writes {"accuracy": {type: {N_C: {"mean", "se", "n", "tasks"}}}, "overall": {N_C: {...}}} with
fractions in [0, 1], and prints the same as a table. Only targets outside the task's own
context are scored (ties are not scorable and are counted under "ties"). Cells share the
sampler seed but not their target sets, so each cell is an independent estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.bundle import BundleError, load_reward_bundle
from core.data.pairs import PairSet, PairsFormatError, load_pairs
from core.data.tasks import TaskConfig, TaskSampler
from core.reward import PreferenceModel, gather_features


def _cell(per_task_correct: list[np.ndarray], per_task_scored: list[np.ndarray], ties: int) -> dict[str, Any]:
    correct = np.concatenate(per_task_correct)  # (tasks, T)
    scored = np.concatenate(per_task_scored)  # (tasks, T)
    n_scored = scored.sum(1)
    keep = n_scored > 0
    acc = (correct * scored).sum(1)[keep] / n_scored[keep]  # per-task accuracy
    se = float(acc.std(ddof=1) / np.sqrt(len(acc))) if len(acc) > 1 else float("nan")
    return {"mean": float(acc.mean()) if len(acc) else float("nan"), "se": se, "n": int(n_scored.sum()),
            "tasks": int(keep.sum()), "ties": int(ties)}


@torch.no_grad()
def evaluate_reward(model: PreferenceModel, pairs: PairSet, emb: tuple[torch.Tensor, torch.Tensor],
                    split: str = "test", contexts: tuple[int, ...] = (0, 1, 3, 5, 10), n_tasks: int = 500,
                    n_targets: int = 20, seed: int = 0, batch_size: int = 250, context_mode: str = "subset",
                    target_pool: np.ndarray | None = None, context_pool: np.ndarray | None = None,
                    user_types: list[str] | None = None) -> dict[str, Any]:
    """Accuracy per user type and N_C on unseen targets (see module doc for the output shape)."""
    model.eval()
    emb_a, emb_b = emb
    types = user_types if user_types is not None else pairs.user_types
    max_c = max(contexts)
    n_targets = max(n_targets, max_c + 1) if context_mode == "subset" else n_targets
    cfg = TaskConfig(n_targets=n_targets, max_context=max_c, context_mode=context_mode)
    sampler = TaskSampler(pairs, cfg, split=split, seed=seed, target_pool=target_pool, context_pool=context_pool)
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"accuracy": {}, "overall": {}, "split": split, "n_targets": n_targets,
                           "tasks_per_cell": n_tasks, "context_mode": context_mode}
    pooled: dict[int, tuple[list, list, int]] = {c: ([], [], 0) for c in contexts}
    for u in types:
        out["accuracy"][u] = {}
        for n_c in contexts:
            corr, sc, ties = [], [], 0
            for k, left in enumerate(range(n_tasks, 0, -batch_size)):
                b = sampler.sample(k, min(batch_size, left), n_context=n_c, user_type=u)
                r = model.evaluate(gather_features(b, emb_a, emb_b), g)
                corr.append(r["correct"].numpy())
                sc.append(r["scored"].numpy())
                ties += int((b.unseen_mask & (b.target_choice == 0.5)).sum())
            out["accuracy"][u][str(n_c)] = _cell(corr, sc, ties)
            pc, ps, pt = pooled[n_c]
            pooled[n_c] = (pc + corr, ps + sc, pt + ties)
    for n_c, (pc, ps, pt) in pooled.items():
        out["overall"][str(n_c)] = _cell(pc, ps, pt)
    return out


def format_table(result: dict[str, Any], title: str = "accuracy on unseen pairs (%)") -> str:
    cols = list(result["overall"])
    rows = [(u, result["accuracy"][u]) for u in result["accuracy"]] + [("overall", result["overall"])]
    w = max(12, max(len(r[0]) for r in rows) + 2)
    head = f"{'user':<{w}}" + "".join(f"{'N_C=' + c:>15}" for c in cols)
    lines = [title, head, "-" * len(head)]
    for name, cells in rows:
        lines.append(f"{name:<{w}}" + "".join(f"{100 * cells[c]['mean']:>8.1f} ± {100 * cells[c]['se']:<4.1f}"
                                              for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("reward", help="evaluate a reward bundle on a pairs file")
    r.add_argument("--bundle", required=True, type=Path)
    r.add_argument("--pairs", required=True, type=Path)
    r.add_argument("--split", default="test", choices=("train", "val", "test"))
    r.add_argument("--contexts", default="0,1,3,5,10", help="comma-separated context sizes N_C")
    r.add_argument("--tasks", type=int, default=500, help="tasks per (user type, N_C) cell")
    r.add_argument("--targets", type=int, default=20, help="N_T per task")
    r.add_argument("--context-mode", default="subset", choices=("subset", "disjoint"))
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args(argv)
    try:
        contexts = tuple(int(c) for c in args.contexts.split(","))
        if any(c < 0 for c in contexts):
            raise ValueError(f"--contexts: sizes must be >= 0, got {args.contexts}")
    except ValueError as e:
        print(f"error: --contexts: {e}", file=sys.stderr)
        return 2
    try:
        model, meta = load_reward_bundle(args.bundle)
        pairs = load_pairs(args.pairs)
        from core.train import option_embeddings

        emb = option_embeddings(pairs)
        if emb[0].shape[1] != model.cfg.d_in:
            raise ValueError(f"{args.pairs}: options have width {emb[0].shape[1]}, the bundle expects {model.cfg.d_in}")
        res = evaluate_reward(model, pairs, emb, args.split, contexts, args.tasks, args.targets, args.seed,
                              context_mode=args.context_mode)
    except (PairsFormatError, BundleError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["bundle"] = str(args.bundle)
    res["model"] = meta.get("model")
    print(format_table(res, f"{meta.get('model')} on {args.pairs} [{args.split}]: accuracy on unseen pairs (%)"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
