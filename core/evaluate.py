"""Evaluation CLI: accuracy on unseen pairs by user type and context size.

    python -m core.evaluate reward --bundle DIR --pairs FILE --split test --contexts 0,1,3,5,10 --json OUT
    python -m core.evaluate policy --bundle DIR --pairs FILE --contexts 0,1,3,5,10 --json OUT

Writes {"accuracy": {type: {N_C: {"mean", "se", "n", "tasks"}}}, "overall": {N_C: {...}}} with
fractions in [0, 1], and prints the same as a table. Only targets outside the task's own
context are scored (ties are not scorable and are counted under "ties"). Cells share the
sampler seed but not their target sets, so each cell is an independent estimate.

For a policy the accuracy is the implicit reward's (β·log π/π_ref of b vs a, with z from the
task's context), and "conflict_sum" adds, for every two user types, their accuracies on the
pairs where they disagree: about 100 % for a user-blind policy, more when it really steers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core.bundle import BundleError, load_reward_bundle
from core.data.pairs import PairSet, PairsFormatError, load_pairs
from core.data.tasks import TaskBatch, TaskConfig, TaskSampler
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


ScoreFn = Callable[[TaskBatch], tuple[np.ndarray, np.ndarray]]  # batch -> correct (B, T), scored (B, T)


def evaluate_cells(pairs: PairSet, score: ScoreFn, split: str = "test", contexts: tuple[int, ...] = (0, 1, 3, 5, 10),
                   n_tasks: int = 500, n_targets: int = 20, seed: int = 0, batch_size: int = 250,
                   context_mode: str = "subset", target_pool: np.ndarray | None = None,
                   context_pool: np.ndarray | None = None, user_types: list[str] | None = None,
                   continuous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Accuracy per user type and N_C of any scorer (see module doc for the output shape).

    continuous: score simulated continuous users instead of the data's types, e.g.
    {"weight_prior": "sphere", "choice_temperature": 0.1}; reported as the type "continuous".
    """
    types = user_types if user_types is not None else pairs.user_types
    max_c = max(contexts)
    n_targets = max(n_targets, max_c + 1) if context_mode == "subset" else n_targets
    if continuous is not None:
        cfg = TaskConfig(n_targets=n_targets, max_context=max_c, context_mode=context_mode, users="continuous",
                         **continuous)
        types = ["continuous"]
    else:
        cfg = TaskConfig(n_targets=n_targets, max_context=max_c, context_mode=context_mode)
    sampler = TaskSampler(pairs, cfg, split=split, seed=seed, target_pool=target_pool, context_pool=context_pool)
    out: dict[str, Any] = {"accuracy": {}, "overall": {}, "split": split, "n_targets": n_targets,
                           "tasks_per_cell": n_tasks, "context_mode": context_mode}
    pooled: dict[int, tuple[list, list, int]] = {c: ([], [], 0) for c in contexts}
    for u in types:
        out["accuracy"][u] = {}
        for n_c in contexts:
            corr, sc, ties = [], [], 0
            for k, left in enumerate(range(n_tasks, 0, -batch_size)):
                b = sampler.sample(k, min(batch_size, left), n_context=n_c,
                                   user_type=None if continuous is not None else u)
                c, s = score(b)
                corr.append(c)
                sc.append(s)
                ties += int((b.unseen_mask & (b.target_choice == 0.5)).sum())
            out["accuracy"][u][str(n_c)] = _cell(corr, sc, ties)
            pc, ps, pt = pooled[n_c]
            pooled[n_c] = (pc + corr, ps + sc, pt + ties)
    for n_c, (pc, ps, pt) in pooled.items():
        out["overall"][str(n_c)] = _cell(pc, ps, pt)
    return out


@torch.no_grad()
def reward_score_fn(model: PreferenceModel, emb: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> ScoreFn:
    """Scorer of a reward model's posterior-predictive choices on a task batch."""
    model.eval()
    emb_a, emb_b = emb
    g = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def score(b: TaskBatch) -> tuple[np.ndarray, np.ndarray]:
        r = model.evaluate(gather_features(b, emb_a, emb_b), g)
        return r["correct"].numpy(), r["scored"].numpy()

    return score


def policy_score_fn(policy, pairs: PairSet, emb: tuple[torch.Tensor, torch.Tensor] | None) -> ScoreFn:
    """Scorer of a policy's implicit reward β·log π/π_ref (b vs a, with z from the context)."""
    from core.policy import PolicyData

    policy.eval()
    data = PolicyData(policy, pairs, emb)

    @torch.no_grad()
    def score(b: TaskBatch) -> tuple[np.ndarray, np.ndarray]:
        scored = b.unseen_mask & b.target_mask & (b.target_choice != 0.5)  # (B, T)
        correct = torch.zeros(scored.shape)
        if scored.any():
            inp = data.inputs(policy, b, scored).to(policy.device)
            logit = policy.dpo_logits(inp).float().cpu()  # (R,)
            correct[scored] = ((logit > 0) == (inp.choice.cpu() > 0.5)).float()
        return correct.numpy(), scored.numpy()

    return score


def conflict_sums(pairs: PairSet, score: ScoreFn, split: str = "test", contexts: tuple[int, ...] = (0, 1, 3, 5, 10),
                  n_tasks: int = 100, n_targets: int = 8, seed: int = 0, batch_size: int = 8,
                  context_mode: str = "subset", type_pairs: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """For two user types, the sum of their accuracies on the pairs where they disagree (context
    and targets both from those pairs in subset mode; in disjoint mode the context comes from
    the whole split): ≈ 100 % for a user-blind model, up to 200 % for one that
    follows each user. Every two types unless `type_pairs` is given."""
    types = pairs.user_types
    if type_pairs is None:
        type_pairs = [(t1, t2) for i, t1 in enumerate(types) for t2 in types[i + 1:]]
    split_rows = set(pairs.indices(split).tolist())
    out: dict[str, Any] = {}
    for t1, t2 in type_pairs:
        pool = np.array(sorted(set(np.flatnonzero(pairs.conflicting(t1, t2)).tolist()) & split_rows), dtype=np.int64)
        key = f"{t1} + {t2}"
        if len(pool) < max(n_targets, max(contexts) + 1):
            out[key] = {"skipped": f"only {len(pool)} conflicting {split} pairs"}
            continue
        r = evaluate_cells(pairs, score, split, contexts, n_tasks, n_targets, seed + 1, batch_size, context_mode,
                           target_pool=pool, context_pool=pool if context_mode == "subset" else None,
                           user_types=[t1, t2])
        out[key] = {c: {"sum": r["accuracy"][t1][c]["mean"] + r["accuracy"][t2][c]["mean"],
                        "se": float(np.hypot(r["accuracy"][t1][c]["se"], r["accuracy"][t2][c]["se"])),
                        t1: r["accuracy"][t1][c]["mean"], t2: r["accuracy"][t2][c]["mean"]}
                    for c in r["overall"]}
    return out


def evaluate_reward(model: PreferenceModel, pairs: PairSet, emb: tuple[torch.Tensor, torch.Tensor],
                    split: str = "test", contexts: tuple[int, ...] = (0, 1, 3, 5, 10), n_tasks: int = 500,
                    n_targets: int = 20, seed: int = 0, batch_size: int = 250, context_mode: str = "subset",
                    target_pool: np.ndarray | None = None, context_pool: np.ndarray | None = None,
                    user_types: list[str] | None = None) -> dict[str, Any]:
    """Accuracy of a reward model per user type and N_C on unseen targets."""
    return evaluate_cells(pairs, reward_score_fn(model, emb, seed), split, contexts, n_tasks, n_targets, seed,
                          batch_size, context_mode, target_pool, context_pool, user_types)


@torch.no_grad()
def evaluate_policy(policy, pairs: PairSet, emb: tuple[torch.Tensor, torch.Tensor] | None, split: str = "test",
                    contexts: tuple[int, ...] = (0, 1, 3, 5, 10), n_tasks: int = 100, n_targets: int = 8,
                    seed: int = 0, batch_size: int = 8, context_mode: str = "subset",
                    with_conflict_sums: bool = True) -> dict[str, Any]:
    """Implicit-reward accuracy of a policy per user type and N_C on unseen pairs.

    With two or more user types, also the sum of every two types' accuracies on the pairs
    where they disagree ("conflict_sum", see `conflict_sums`).
    """
    score = policy_score_fn(policy, pairs, emb)
    out = evaluate_cells(pairs, score, split, contexts, n_tasks, n_targets, seed, batch_size, context_mode)
    out["metric"] = "implicit-reward accuracy"
    if with_conflict_sums and len(pairs.user_types) >= 2:
        out["conflict_sum"] = conflict_sums(pairs, score, split, contexts, n_tasks, n_targets, seed, batch_size,
                                            context_mode)
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


def _common_args(ap: argparse.ArgumentParser, tasks: int, targets: int) -> None:
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--pairs", required=True, type=Path)
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--contexts", default="0,1,3,5,10", help="comma-separated context sizes N_C")
    ap.add_argument("--tasks", type=int, default=tasks, help="tasks per (user type, N_C) cell")
    ap.add_argument("--targets", type=int, default=targets, help="N_T per task")
    ap.add_argument("--context-mode", default="subset", choices=("subset", "disjoint"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the result here")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("reward", help="evaluate a reward bundle on a pairs file")
    _common_args(r, tasks=500, targets=20)
    r.add_argument("--embedder", help="text options: minilm or lm:SPEC (default: the one the bundle records)")
    r.add_argument("--embed-cache", type=Path, help="safetensors file caching option embeddings")
    p = sub.add_parser("policy", help="implicit-reward accuracy of a policy bundle on a pairs file")
    _common_args(p, tasks=100, targets=8)
    p.add_argument("--embed-cache", type=Path, help="safetensors file caching context embeddings")
    args = ap.parse_args(argv)
    try:
        contexts = tuple(int(c) for c in args.contexts.split(","))
        if any(c < 0 for c in contexts):
            raise ValueError(f"--contexts: sizes must be >= 0, got {args.contexts}")
    except ValueError as e:
        print(f"error: --contexts: {e}", file=sys.stderr)
        return 2
    if args.what == "policy":
        return _main_policy(args, contexts)
    from core.embed import EmbedderError

    try:
        model, meta = load_reward_bundle(args.bundle)
        pairs = load_pairs(args.pairs)
        emb = reward_option_embeddings(pairs, meta, args.embedder, args.embed_cache)
        if emb[0].shape[1] != model.cfg.d_in:
            raise ValueError(f"{args.pairs}: options have width {emb[0].shape[1]}, the bundle expects {model.cfg.d_in}")
        res = evaluate_reward(model, pairs, emb, args.split, contexts, args.tasks, args.targets, args.seed,
                              context_mode=args.context_mode)
    except (PairsFormatError, BundleError, EmbedderError, ValueError, KeyError) as e:
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


def reward_option_embeddings(pairs: PairSet, meta: dict[str, Any], embedder: str | None = None,
                             cache_path: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Option features for scoring a reward bundle: numeric options as they are; text options
    embedded with `embedder`, else the embedder the bundle records (bundle.json embedder.spec)."""
    from core.train import make_embedder, option_embeddings

    if pairs.is_numeric:
        return option_embeddings(pairs)
    from core.embed import EmbeddingCache, embed_pairs

    spec = embedder or (meta.get("embedder") or {}).get("spec")
    if not spec:
        raise ValueError(f"{pairs.source}: text options, and the bundle does not record how its options were "
                         "embedded (trained from precomputed embeddings); pass --embedder minilm or lm:SPEC")
    if spec == "base":
        raise ValueError("--embedder base is for policies (their own LM); a reward bundle takes minilm or lm:SPEC")
    cache = EmbeddingCache(make_embedder(spec), cache_path)
    emb = embed_pairs(pairs, cache)
    cache.save()
    return emb[0].float(), emb[1].float()


def bundle_embedder(policy, meta: dict[str, Any]):
    """The embedder a policy bundle was trained with (None for the DPO baseline)."""
    from core.embed import EmbedderError

    emb = meta.get("embedder")
    if not emb:
        return None
    from core.train import make_embedder

    from core.embed import text_embedder_spec

    name = emb.get("name") or ""
    spec = text_embedder_spec(name) or (emb.get("spec") if name == "given" else None)
    if spec is not None and spec != "base":
        e = make_embedder(spec)
    elif name.startswith("base:"):
        e = make_embedder("base", policy)
    else:
        raise EmbedderError(f"the bundle's context embeddings came from {name!r}, which this CLI can't rebuild")
    if e.dim != emb.get("dim"):
        raise EmbedderError(f"embedder {name} gives {e.dim}-d vectors, the bundle expects {emb.get('dim')}")
    return e


def _main_policy(args: argparse.Namespace, contexts: tuple[int, ...]) -> int:
    from core.basemodels import BaseModelError
    from core.bundle import load_policy_bundle
    from core.embed import EmbedderError, EmbeddingCache, embed_pairs

    try:
        policy, meta = load_policy_bundle(args.bundle)
        pairs = load_pairs(args.pairs)
        embedder = bundle_embedder(policy, meta)
        emb = None
        if embedder is not None:
            cache = EmbeddingCache(embedder, args.embed_cache)
            emb = embed_pairs(pairs, cache)
            cache.save()
        res = evaluate_policy(policy, pairs, emb, args.split, contexts, args.tasks, args.targets, args.seed,
                              context_mode=args.context_mode)
    except (PairsFormatError, BundleError, BaseModelError, EmbedderError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["bundle"] = str(args.bundle)
    res["model"] = meta.get("model")
    print(format_table(res, f"{meta.get('model')} on {args.pairs} [{args.split}]: implicit-reward accuracy (%)"))
    for key, cells in res.get("conflict_sum", {}).items():
        if "skipped" in cells:
            print(f"conflicting pairs, {key}: skipped ({cells['skipped']})")
            continue
        print(f"conflicting pairs, {key} (sum %; ~100 = user-blind): " +
              "  ".join(f"N_C={c}: {100 * v['sum']:.1f} ± {100 * v['se']:.1f}" for c, v in cells.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
