"""Training CLI and loop.

    python -m core.train reward --pairs FILE --model np-btl|np-btl-latent|btl|dpl --out DIR [--config YAML]

Runs on CPU as is and on one or many GPUs unchanged through `accelerate launch`. AdamW,
gradient clipping, warm-up + cosine schedule, the best checkpoint by predictive loss on a
fixed validation set of tasks, a progress bar, and resume from `DIR.ckpt/` after an
interruption. The output DIR is a reward bundle (core.bundle).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from core.bundle import (BundleError, load_bundle_tensors, load_state_strict, read_manifest, save_bundle,
                         save_reward_bundle)
from core.config import RunConfig, load_run_config
from core.data.pairs import PairSet, PairsFormatError, load_pairs
from core.data.tasks import TaskSampler
from core.reward import MODELS, PreferenceModel, config_from_dict, gather_features


def option_embeddings(pairs: PairSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Option features for every pair: (n, d) tensors for a and b.

    Numeric options are their own features. Text options need an embedder (core.embed),
    which this loop does not choose for you.
    """
    if pairs.is_numeric:
        return torch.from_numpy(pairs.a), torch.from_numpy(pairs.b)
    raise ValueError(f"{pairs.source}: text options must be embedded first; numeric options train directly. "
                     "Pass precomputed embeddings to train_reward(emb=...).")


def _opt_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors and a JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _opt_state_from(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(rest["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    """Torch RNG states (CPU, and every CUDA device) so a resumed run draws what it would have."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def _fingerprint(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def train_reward(pairs: PairSet, model_name: str, out: str | Path, run: RunConfig,
                 emb: tuple[torch.Tensor, torch.Tensor] | None = None, quiet: bool = False,
                 resume: bool = True, data_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one reward model and write its bundle to `out`. Returns the bundle metadata."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    tc = run.train
    torch.manual_seed(tc.seed)
    # Parameters such as the learned prior only get gradients when a task has an empty context.
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    emb_a, emb_b = emb if emb is not None else option_embeddings(pairs)
    emb_a, emb_b = emb_a.float().to(acc.device), emb_b.float().to(acc.device)
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {', '.join(MODELS)}")
    mcfg = config_from_dict({"model": model_name, "d_in": int(emb_a.shape[1]), **run.model})
    model = PreferenceModel(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    train_sampler = TaskSampler(pairs, run.tasks, split="train", seed=tc.seed)
    if len(pairs.indices("val")) < run.tasks.n_targets:
        raise ValueError(f"{pairs.source}: {len(pairs.indices('val'))} 'val' pairs; checkpoint selection needs "
                         f"at least n_targets={run.tasks.n_targets}")
    val_batches = TaskSampler(pairs, run.tasks, split="val", seed=tc.seed + 1).fixed_batches(tc.val_tasks, 256)

    out = Path(out)
    ckpt = out.parent / f"{out.name}.ckpt"
    data_hash = hashlib.sha256()  # what was trained on, whatever the caller says about it
    for arr in (emb_a.cpu().numpy(), emb_b.cpu().numpy(), pairs.choices, pairs.split.astype("U5")):
        data_hash.update(arr.tobytes())
    fingerprint = _fingerprint({"model": mcfg.to_dict(), "run": run.to_dict(), "data": data_meta or {},
                                "data_sha256": data_hash.hexdigest()})
    start, best_val, best_state, history = 0, float("inf"), None, []
    if resume and (ckpt / "bundle.json").is_file():
        meta = read_manifest(ckpt)
        if meta.get("fingerprint") != fingerprint:
            raise BundleError(f"{ckpt}: checkpoint is from a different config or data; "
                              f"delete it or use another --out to start over")
        load_state_strict(model, load_bundle_tensors(ckpt, "model", meta), f"{ckpt} model")
        opt.load_state_dict(_opt_state_from(load_bundle_tensors(ckpt, "optim", meta), meta["optim"]))
        best = load_bundle_tensors(ckpt, "best", meta)
        best_state = best if best else None
        start, best_val, history = meta["step"], meta["best_val"], meta["history"]
        rng = load_bundle_tensors(ckpt, "rng", meta)
        torch.set_rng_state(rng["cpu"])
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state_all(list(rng["cuda"]))
        if not quiet:
            acc.print(f"resuming {out} from step {start}")

    model, opt = acc.prepare(model, opt)
    raw_model = acc.unwrap_model(model)
    world, rank = acc.num_processes, acc.process_index
    per_proc = max(1, tc.batch_size // world)

    def validate() -> dict[str, float]:
        raw_model.eval()
        g = torch.Generator(device=acc.device).manual_seed(tc.seed + 7)
        nll_sum = correct_sum = n = 0.0
        for vb in val_batches:
            r = raw_model.evaluate(gather_features(vb, emb_a, emb_b, acc.device), g)
            s = r["scored"].float()
            nll_sum += (r["nll"] * s).sum().item()
            correct_sum += (r["correct"] * s).sum().item()
            n += s.sum().item()
        raw_model.train()
        return {"val_nll": nll_sum / max(n, 1), "val_acc": correct_sum / max(n, 1)}

    def save_ckpt(step: int) -> None:
        if not acc.is_main_process:
            return
        otensors, orest = _opt_state_tensors(opt.optimizer if hasattr(opt, "optimizer") else opt)
        save_bundle(ckpt, {"kind": "train-checkpoint", "fingerprint": fingerprint, "step": step,
                           "best_val": best_val, "history": history, "optim": orest},
                    {"model": raw_model.state_dict(), "optim": otensors, "best": best_state or {},
                     "rng": _rng_state()})

    t0 = time.time()
    model.train()
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=quiet or not acc.is_main_process,
               desc=f"{model_name}", dynamic_ncols=True, file=sys.stderr)
    last: dict[str, float] = {}
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = tc.lr_at(step)
        batch = train_sampler.sample(step * world + rank, per_proc)
        loss, last = model(gather_features(batch, emb_a, emb_b, acc.device))
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if tc.grad_clip:
            acc.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        done = step + 1
        if done % tc.eval_every == 0 or done == tc.steps:
            v = validate()
            history.append({"step": done, "train_loss": last["loss"], **v})
            if v["val_nll"] < best_val:
                best_val = v["val_nll"]
                best_state = {k: t.detach().clone() for k, t in raw_model.state_dict().items()}
            bar.set_postfix(loss=f"{last['loss']:.3f}", val_nll=f"{v['val_nll']:.3f}", val_acc=f"{v['val_acc']:.3f}")
        if done % tc.checkpoint_every == 0 and done < tc.steps:
            save_ckpt(done)
    bar.close()

    if best_state is not None:
        raw_model.load_state_dict(best_state)
    final = validate()
    meta = {
        "model": model_name,
        "data": data_meta or {"source": pairs.source, "n_pairs": len(pairs)},
        "user_types": pairs.user_types,
        "attribute_names": pairs.attribute_names,
        "run_config": run.to_dict(),
        "metrics": {"best_val_nll": final["val_nll"], "val_acc": final["val_acc"],
                    "steps": tc.steps, "train_seconds": round(time.time() - t0, 2), "history": history},
    }
    if acc.is_main_process:
        save_reward_bundle(out, raw_model.cpu(), meta)
        shutil.rmtree(ckpt, ignore_errors=True)
    acc.wait_for_everyone()
    return meta


def file_meta(path: Path) -> dict[str, Any]:
    return {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("reward", help="train a BTL / DPL / NP-BTL reward model on a pairs file")
    r.add_argument("--pairs", required=True, type=Path, help="JSONL pairs file (the data contract)")
    r.add_argument("--model", required=True, choices=MODELS)
    r.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    r.add_argument("--config", type=Path, help="YAML with train / tasks / model sections")
    r.add_argument("--steps", type=int, help="override train.steps")
    r.add_argument("--seed", type=int, help="override train.seed")
    r.add_argument("--no-resume", action="store_true", help="ignore an existing OUT.ckpt and start over")
    r.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        run = load_run_config(args.config)
        if args.steps is not None:
            run.train.steps = args.steps
        if args.seed is not None:
            run.train.seed = args.seed
        pairs = load_pairs(args.pairs)
        if args.no_resume:
            shutil.rmtree(args.out.parent / f"{args.out.name}.ckpt", ignore_errors=True)
        meta = train_reward(pairs, args.model, args.out, run, quiet=args.quiet, data_meta=file_meta(args.pairs))
    except (PairsFormatError, BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = meta["metrics"]
    print(f"wrote {args.out}: val_nll {m['best_val_nll']:.4f}, val_acc {m['val_acc']:.4f}, "
          f"{m['train_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
