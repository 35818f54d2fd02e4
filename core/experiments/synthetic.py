"""Paper Ex. 4.1: BTL, DPL and NP-BTL (deterministic and latent) on the 1-d synthetic task.

Both domains are run: U[0, 1]² (the authors' code) and U[−1, 1]² (the paper's text). Writes
`synthetic.json` and `synthetic.html` (accuracy by N_C, and the learned reward curves of
both user types: paper Fig. 1a) into the output folder and prints the tables.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.bundle import load_reward_bundle
from core.config import RunConfig, TrainConfig
from core.data.synthetic import ONE_D_TYPES, one_d_pairs, one_d_reward
from core.data.tasks import TaskConfig, TaskSampler
from core.encoder import Gaussian
from core.evaluate import evaluate_reward, format_table
from core.experiments import figures as F
from core.reward import PreferenceModel, gather_features
from core.train import train_reward

DOMAINS = {"U[0,1]": (0.0, 1.0), "U[-1,1]": (-1.0, 1.0)}
CONTEXTS = (0, 1, 3, 5, 10)
# Steps per model: the NP models need longer to learn the context -> z map.
STEPS = {"btl": 600, "dpl": 600, "np-btl": 1500, "np-btl-latent": 1200}
TARGETS = {"1": 0.86, "3": 0.94, "5": 0.97, "10": 0.985}  # issue targets for NP-BTL on U[0,1]


def run_config(model: str, steps: int, seed: int) -> RunConfig:
    return RunConfig(
        train=TrainConfig(steps=steps, lr=2e-3, warmup_steps=50, eval_every=250, val_tasks=256,
                          checkpoint_every=10**9, seed=seed),
        tasks=TaskConfig(n_targets=20, max_context=10),
        model={"d_hidden": 64, **({"encoder": {"d_z": 16}} if model.startswith("np-") else {})},
    )


@torch.no_grad()
def reward_curves(models: dict[str, PreferenceModel], pairs, domain: tuple[float, float], n_ctx: int = 10,
                  n_tasks: int = 16, seed: int = 0) -> dict[str, Any]:
    """Min-max normalised reward curves r(y) on a grid: true, BTL, DPL (μ ± σ), NP given n_ctx contexts."""
    grid = np.linspace(domain[0], domain[1], 121, dtype=np.float32)
    x = torch.from_numpy(grid)[None, :, None]  # (1, G, 1)

    def norm(v: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
        ref = v if ref is None else ref
        return (v - ref.min()) / max(float(ref.max() - ref.min()), 1e-9)

    out: dict[str, Any] = {"y": grid.tolist(), "true": {}, "models": {}}
    for u, name in enumerate(ONE_D_TYPES):
        out["true"][name] = norm(one_d_reward(grid, u)).tolist()
    emb = (torch.from_numpy(pairs.a), torch.from_numpy(pairs.b))
    sampler = TaskSampler(pairs, TaskConfig(n_targets=n_ctx, max_context=n_ctx), split="test", seed=seed)
    for mname, model in models.items():
        model.eval()
        if mname == "dpl":
            mu, sd = (t[0].numpy() for t in model.dpl_stats(x))
            out["models"][mname] = {"mean": norm(mu).tolist(), "lo": norm(mu - sd, mu).tolist(),
                                    "hi": norm(mu + sd, mu).tolist()}
        elif not model.cfg.is_np:
            out["models"][mname] = {"all": norm(model.reward(x)[0].numpy()).tolist()}
        else:
            per_type = {}
            for name in ONE_D_TYPES:
                b = sampler.sample(0, n_tasks, n_context=n_ctx, user_type=name)
                z = model.posterior(gather_features(b, *emb))
                z = z.mean if isinstance(z, Gaussian) else z  # (n_tasks, d_z)
                r = model.reward(x.expand(n_tasks, -1, -1), z).numpy()  # (n_tasks, G)
                curves = np.stack([norm(row) for row in r])
                per_type[name] = {"mean": curves.mean(0).tolist(), "lo": curves.min(0).tolist(),
                                  "hi": curves.max(0).tolist()}
            out["models"][mname] = per_type
    return out


def _figures(result: dict[str, Any]) -> list[F.Figure]:
    figs = []
    names = list(STEPS)
    for dom, res in result["domains"].items():
        traces = []
        for i, m in enumerate(names):
            overall = res["accuracy"][m]["overall"]
            traces.append(F.line(list(CONTEXTS), [100 * overall[str(c)]["mean"] for c in CONTEXTS], m,
                                 F.PALETTE[i], error=[100 * overall[str(c)]["se"] for c in CONTEXTS]))
        ceiling = 100 * res["user_blind_ceiling"]
        traces.append(F.line(list(CONTEXTS), [ceiling] * len(CONTEXTS), f"user-blind ceiling ({ceiling:.1f}%)",
                             "#999", dash="dot", mode="lines"))
        figs.append(F.figure(traces, f"Accuracy on unseen pairs, {dom}", "context pairs N_C", "accuracy (%)",
                             yaxis={"title": {"text": "accuracy (%)"}, "range": [min(60, ceiling - 10), 101]}))
        c = res["curves"]
        traces = []
        for u, name in enumerate(ONE_D_TYPES):
            col = F.PALETTE[3 + u]
            traces.append(F.line(c["y"], c["true"][name], f"true, {name}", col, dash="dot", mode="lines"))
            for m in ("np-btl", "np-btl-latent"):
                cm = c["models"][m][name]
                traces.append(F.line(c["y"], cm["mean"], f"{m}, {name} (N_C=10)", col,
                                     dash=None if m == "np-btl" else "dash", mode="lines"))
        traces.append(F.line(c["y"], c["models"]["btl"]["all"], "btl", "#333", mode="lines"))
        d = c["models"]["dpl"]
        traces.append(F.band(c["y"], d["lo"], d["hi"], "dpl μ ± σ"))
        traces.append(F.line(c["y"], d["mean"], "dpl μ", "#777", mode="lines"))
        figs.append(F.figure(traces, f"Learned rewards (min-max normalised), {dom}", "option y", "reward"))
    return figs


def run(out: Path, seed: int = 0, scale: float = 1.0, n_eval_tasks: int = 500, quiet: bool = False) -> dict[str, Any]:
    """Train and evaluate every model on both domains. `scale` multiplies training steps (tests use < 1)."""
    t_start = time.time()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    result: dict[str, Any] = {"experiment": "synthetic", "seed": seed, "contexts": list(CONTEXTS), "domains": {}}
    for dom, bounds in DOMAINS.items():
        pairs = one_d_pairs(20_000, bounds, seed=seed)
        emb = (torch.from_numpy(pairs.a), torch.from_numpy(pairs.b))
        conflict = float(pairs.conflicting(*ONE_D_TYPES)[pairs.indices("test")].mean())
        # A user-blind model can at best get half of the conflicting pairs right.
        res: dict[str, Any] = {"n_pairs": len(pairs), "conflict_rate": conflict, "user_blind_ceiling": 1 - conflict / 2,
                               "accuracy": {}, "train_seconds": {}}
        models = {}
        for m, steps in STEPS.items():
            bundle = out / "bundles" / dom.replace("[", "").replace("]", "").replace(",", "_") / m
            meta = train_reward(pairs, m, bundle, run_config(m, max(20, int(steps * scale)), seed), quiet=True,
                                resume=False, data_meta={"generator": "one_d_pairs", "domain": list(bounds),
                                                         "seed": seed, "n": len(pairs)})
            models[m], _ = load_reward_bundle(bundle)
            res["train_seconds"][m] = meta["metrics"]["train_seconds"]
            res["accuracy"][m] = evaluate_reward(models[m], pairs, emb, "test", CONTEXTS, n_eval_tasks, seed=seed)
            if not quiet:
                print(format_table(res["accuracy"][m], f"[{dom}] {m}: accuracy on unseen test pairs (%), "
                                                       f"trained in {meta['metrics']['train_seconds']:.0f} s"))
                print()
        res["curves"] = reward_curves(models, pairs, bounds, seed=seed)
        result["domains"][dom] = res
    np_acc = result["domains"]["U[0,1]"]["accuracy"]["np-btl"]["overall"]
    result["targets"] = {f"np-btl U[0,1] N_C={c}": {"target": t, "measured": np_acc[c]["mean"],
                                                     "met": bool(np_acc[c]["mean"] >= t)} for c, t in TARGETS.items()}
    result["seconds"] = round(time.time() - t_start, 1)
    F.write_json(out / "synthetic.json", result)
    F.write_html(out / "synthetic.html", _figures(result), "Synthetic preferences (paper Ex. 4.1)",
                 "Accuracy on unseen test pairs by context size, and learned reward curves given 10 context pairs.")
    if not quiet:
        print(summary(result))
        print(f"wrote {out / 'synthetic.json'} and {out / 'synthetic.html'} in {result['seconds']:.0f} s")
    return result


def summary(result: dict[str, Any]) -> str:
    lines = ["overall accuracy on unseen pairs (%) by N_C; user-blind ceiling: " + ", ".join(
        f"{d} {100 * r['user_blind_ceiling']:.1f}" for d, r in result["domains"].items())]
    head = f"{'domain':<9}{'model':<15}" + "".join(f"{c:>8}" for c in CONTEXTS)
    lines += [head, "-" * len(head)]
    for dom, res in result["domains"].items():
        for m, r in res["accuracy"].items():
            lines.append(f"{dom:<9}{m:<15}" + "".join(f"{100 * r['overall'][str(c)]['mean']:>8.1f}" for c in CONTEXTS))
    for name, t in result["targets"].items():
        lines.append(f"target {name}: >= {100 * t['target']:.1f}, measured {100 * t['measured']:.1f} "
                     f"({'met' if t['met'] else 'MISSED'})")
    return "\n".join(lines)
