"""Training CLI and loops.

    python -m core.train reward --pairs FILE --model np-btl|np-btl-latent|btl|dpl --out DIR [--config YAML]
    python -m core.train policy --pairs FILE --base MODEL --model np-dpo|dpo --out DIR [--config YAML]

Runs on CPU as is and on one or many GPUs unchanged through `accelerate launch`. AdamW,
gradient clipping, warm-up + cosine schedule, the best checkpoint by predictive loss on a
fixed validation set of tasks, a progress bar, and resume from `DIR.ckpt/` after an
interruption. The output DIR is a reward or policy bundle (core.bundle).
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
from core.config import RunConfig, load_run_config, read_config_file, run_config_from_dict
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


def _read_checkpoint(ckpt: Path, fingerprint: str, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Check a checkpoint against the run, restore the optimiser and RNG; None when there is none.

    Returns the manifest plus "model" and "best" tensors (best is None if not yet chosen).
    """
    if not (ckpt / "bundle.json").is_file():
        return None
    meta = read_manifest(ckpt)
    if meta.get("fingerprint") != fingerprint:
        raise BundleError(f"{ckpt}: checkpoint is from a different config or data (or base model); "
                          f"delete it or use another --out to start over")
    opt.load_state_dict(_opt_state_from(load_bundle_tensors(ckpt, "optim", meta), meta["optim"]))
    rng = load_bundle_tensors(ckpt, "rng", meta)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and "cuda" in rng:
        torch.cuda.set_rng_state_all(list(rng["cuda"]))
    best = load_bundle_tensors(ckpt, "best", meta)
    return {**meta, "model": load_bundle_tensors(ckpt, "model", meta), "best": best or None}


def _write_checkpoint(ckpt: Path, fingerprint: str, step: int, best_val: float, history: list, opt,
                      model_state: dict[str, torch.Tensor], best_state: dict[str, torch.Tensor] | None,
                      extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    otensors, orest = _opt_state_tensors(opt.optimizer if hasattr(opt, "optimizer") else opt)
    save_bundle(ckpt, {"kind": "train-checkpoint", "fingerprint": fingerprint, "step": step,
                       "best_val": best_val, "history": history, "optim": orest},
                {"model": model_state, "optim": otensors, "best": best_state or {}, "rng": _rng_state(),
                 **(extra or {})})


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
    if mcfg.input_norm:
        tr = torch.as_tensor(pairs.indices("train"), device=emb_a.device)
        opts = torch.cat([emb_a[tr], emb_b[tr]])  # (2 n_train, d)
        model.encoder.set_input_stats(opts.mean(0), opts.std(0))
    model.to(acc.device)
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
    restored = _read_checkpoint(ckpt, fingerprint, opt) if resume else None
    if restored is not None:
        load_state_strict(model, restored["model"], f"{ckpt} model")
        start, best_val, history, best_state = (restored["step"], restored["best_val"], restored["history"],
                                                restored["best"])
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
        if acc.is_main_process:
            _write_checkpoint(ckpt, fingerprint, step, best_val, history, opt, raw_model.state_dict(), best_state)

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


POLICY_MODELS = ("np-dpo", "dpo")

# Policy runs start from these instead of the reward defaults; a config file overrides them.
POLICY_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {"steps": 300, "batch_size": 4, "lr": 2e-4, "warmup_steps": 20, "eval_every": 50,
              "val_tasks": 32, "checkpoint_every": 50},
    "tasks": {"n_targets": 8, "max_context": 6},
}


def policy_run_config(d: dict[str, Any] | None, where: str = "config") -> RunConfig:
    """RunConfig for a policy: POLICY_DEFAULTS overridden section by section by `d`."""
    d = dict(d or {})
    merged = {k: {**POLICY_DEFAULTS.get(k, {}), **(d.get(k) or {})} for k in ("train", "tasks")}
    return run_config_from_dict({**d, **merged}, where)


def load_policy_run_config(path: Path | None) -> RunConfig:
    return policy_run_config(None if path is None else read_config_file(path), str(path))


def make_embedder(name: str, policy=None, device: str | torch.device = "cpu"):
    from core.embed import LMEmbedder, MiniLMEmbedder

    if name == "minilm":
        return MiniLMEmbedder(device=device)
    if name == "base":
        if policy is None:
            raise ValueError("embedder 'base' embeds with the policy's base LM: pass the policy")
        return LMEmbedder(policy.lm, policy.tokenizer, f"base:{policy.cfg.base}", context=policy.reference)
    raise ValueError(f"unknown embedder {name!r}; expected minilm or base")


def _text_data_hash(pairs: PairSet) -> str:
    h = hashlib.sha256()
    for i in range(len(pairs)):
        h.update(json.dumps([pairs.prompts[i], pairs.a[i], pairs.b[i]]).encode())
    h.update(pairs.choices.tobytes())
    h.update(pairs.split.astype("U5").tobytes())
    return h.hexdigest()


def train_policy(pairs: PairSet, model_name: str, out: str | Path, run: RunConfig, base: str | tuple,
                 emb: tuple[torch.Tensor, torch.Tensor] | None = None, init_encoder: str | Path | None = None,
                 include_base: bool = False, quiet: bool = False, resume: bool = True,
                 data_meta: dict[str, Any] | None = None, embed_cache: str | Path | None = None) -> dict[str, Any]:
    """Train an NP-DPO or DPO policy and write its bundle to `out`. Returns the bundle metadata.

    base: a spec for core.basemodels.load_base, or an already loaded (model, tokenizer, info).
    init_encoder: an NP-BTL reward bundle whose context encoder starts the policy's.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    from core.bundle import load_reward_bundle, save_policy_bundle
    from core.embed import EmbeddingCache, embed_pairs
    from core.film import hidden_size
    from core.losses import btl_nll
    from core.policy import PolicyConfig, PolicyData, SteerablePolicy

    if model_name not in POLICY_MODELS:
        raise ValueError(f"unknown policy model {model_name!r}; expected one of {', '.join(POLICY_MODELS)}")
    tc = run.train
    cuda = torch.cuda.is_available()
    bf16 = tc.precision == "bf16" or (tc.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if isinstance(base, str):
        from core.basemodels import load_base

        lm, tok, base_info = load_base(base)
        base_info = {**base_info, "spec": base}
    else:
        lm, tok, base_info = base
    pdict = {**run.model, "conditioned": model_name == "np-dpo"}
    pdict.setdefault("base", str(base_info.get("spec", base_info.get("name", "custom"))))
    if pdict["conditioned"] and "d_in" not in pdict:
        pdict["d_in"] = 384 if pdict.get("embedder", "minilm") == "minilm" else hidden_size(lm)
    if "encoder" in pdict and isinstance(pdict["encoder"], dict):
        pdict["encoder"] = {"d_in": pdict.get("d_in", 384), "d_z": pdict.get("d_z", 32), **pdict["encoder"]}
    cfg = PolicyConfig.from_dict(pdict)
    torch.manual_seed(tc.seed)
    policy = SteerablePolicy(cfg, lm, tok).to(acc.device)
    enc_meta: dict[str, Any] = {}
    if init_encoder is not None:
        if policy.encoder is None:
            raise ValueError("--init-encoder: the DPO baseline has no context encoder")
        reward, rmeta = load_reward_bundle(init_encoder)
        if reward.encoder is None or reward.cfg.encoder != cfg.encoder:
            raise ValueError(f"{init_encoder}: its encoder config {reward.cfg.encoder} differs from the policy's "
                             f"{cfg.encoder}; set the policy's model.encoder / d_z / d_in to match")
        policy.encoder.load_state_dict(reward.encoder.state_dict(), strict=True)
        enc_meta = {"init_encoder": str(init_encoder), "init_encoder_model": rmeta.get("model")}
    embedder_name = None
    if cfg.conditioned and emb is None:
        embedder = make_embedder(cfg.embedder, policy, acc.device)
        embedder_name = embedder.name
        cache = EmbeddingCache(embedder, embed_cache)
        emb = embed_pairs(pairs, cache)
        cache.save()
    elif cfg.conditioned:
        embedder_name = "given"
    if emb is not None and emb[0].shape[1] != cfg.d_in:
        raise ValueError(f"context embeddings are {emb[0].shape[1]}-d, the policy expects d_in={cfg.d_in}")
    if policy.encoder is not None and policy.encoder.cfg.input_norm and init_encoder is None:
        tr = torch.as_tensor(pairs.indices("train"))
        opts = torch.cat([emb[0][tr], emb[1][tr]]).float()  # (2 n_train, d)
        policy.encoder.set_input_stats(opts.mean(0).to(acc.device), opts.std(0).to(acc.device))
    data = PolicyData(policy, pairs, None if emb is None else (emb[0].float(), emb[1].float()))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    train_sampler = TaskSampler(pairs, run.tasks, split="train", seed=tc.seed)
    if len(pairs.indices("val")) < run.tasks.n_targets:
        raise ValueError(f"{pairs.source}: {len(pairs.indices('val'))} 'val' pairs; checkpoint selection needs "
                         f"at least n_targets={run.tasks.n_targets}")
    val_batches = TaskSampler(pairs, run.tasks, split="val", seed=tc.seed + 1).fixed_batches(tc.val_tasks, 8)

    out = Path(out)
    ckpt = out.parent / f"{out.name}.ckpt"
    emb_hash = hashlib.sha256(b"" if emb is None else emb[0].numpy().tobytes() + emb[1].numpy().tobytes())
    fingerprint = _fingerprint({"model": cfg.to_dict(), "run": run.to_dict(), "base": base_info,
                                "data": _text_data_hash(pairs), "emb": emb_hash.hexdigest(), **enc_meta})
    start, best_val, best_state, history = 0, float("inf"), None, []
    restored = _read_checkpoint(ckpt, fingerprint, opt) if resume else None
    if restored is not None:
        policy.load_adapter_state(restored["model"], f"{ckpt} model")
        data.ref = load_bundle_tensors(ckpt, "reference", restored)["ref"]
        start, best_val, history, best_state = (restored["step"], restored["best_val"], restored["history"],
                                                restored["best"])
        if not quiet:
            acc.print(f"resuming {out} from step {start}")

    model, opt = acc.prepare(policy, opt)
    raw: SteerablePolicy = acc.unwrap_model(model)
    world, rank = acc.num_processes, acc.process_index
    per_proc = max(1, tc.batch_size // world)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        raw.eval()
        nll_sum = correct_sum = n_loss = n_acc = 0.0
        for vb in val_batches:
            score = vb.unseen_mask & vb.target_mask
            if not score.any():
                continue
            inp = data.inputs(raw, vb, score, True, acc.autocast).to(acc.device)
            with acc.autocast():
                logit = raw.dpo_logits(inp).float()  # (R,)
            nll_sum += btl_nll(logit, inp.choice).sum().item()
            n_loss += len(logit)
            decided = inp.choice != 0.5
            correct_sum += ((logit > 0) == (inp.choice > 0.5))[decided].sum().item()
            n_acc += decided.sum().item()
        raw.train()
        return {"val_loss": nll_sum / max(n_loss, 1), "val_acc": correct_sum / max(n_acc, 1)}

    def save_ckpt(step: int) -> None:
        if acc.is_main_process:
            _write_checkpoint(ckpt, fingerprint, step, best_val, history, opt, raw.adapter_state(), best_state,
                              {"reference": {"ref": data.ref}})

    t0 = time.time()
    model.train()
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=quiet or not acc.is_main_process,
               desc=model_name, dynamic_ncols=True, file=sys.stderr)
    last: dict[str, float] = {}
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = tc.lr_at(step)
        batch = train_sampler.sample(step * world + rank, per_proc)
        inp = data.inputs(raw, batch, batch.target_mask, cfg.cache_reference, acc.autocast).to(acc.device)
        loss, last = model(inp)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if raw.film is not None:
            raw.film.set_factors(None)
        if tc.grad_clip:
            acc.clip_grad_norm_(raw.trainable_parameters(), tc.grad_clip)
        opt.step()
        done = step + 1
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['acc']:.2f}")
        if done % tc.eval_every == 0 or done == tc.steps:
            v = validate()
            history.append({"step": done, "train_loss": last["loss"], **v})
            if v["val_loss"] < best_val:
                best_val = v["val_loss"]
                best_state = {k: t.detach().clone() for k, t in raw.adapter_state().items()}
            bar.set_postfix(loss=f"{last['loss']:.3f}", val_loss=f"{v['val_loss']:.3f}", val_acc=f"{v['val_acc']:.3f}")
        if done % tc.checkpoint_every == 0 and done < tc.steps:
            save_ckpt(done)
    bar.close()

    if best_state is not None:
        raw.load_adapter_state(best_state, "best checkpoint")
    final = validate()
    meta = {
        "model": model_name,
        "base": base_info,
        "embedder": {"name": embedder_name, "dim": cfg.d_in} if cfg.conditioned else None,
        "data": data_meta or {"source": pairs.source, "n_pairs": len(pairs)},
        "user_types": pairs.user_types,
        "attribute_names": pairs.attribute_names,
        "run_config": run.to_dict(),
        **enc_meta,
        "metrics": {"best_val_loss": final["val_loss"], "val_acc": final["val_acc"], "steps": tc.steps,
                    "train_seconds": round(time.time() - t0, 2), "history": history},
    }
    if acc.is_main_process:
        save_policy_bundle(out, raw, meta, include_base=include_base)
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
    p = sub.add_parser("policy", help="train an NP-DPO or DPO policy (LoRA + FiLM) on a text pairs file")
    p.add_argument("--pairs", required=True, type=Path, help="JSONL pairs file with prompts and text options")
    p.add_argument("--base", required=True, help="base LM: smollm2-135m-instruct, a local folder, or a hub id")
    p.add_argument("--model", required=True, choices=POLICY_MODELS)
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write")
    p.add_argument("--config", type=Path, help="YAML with train / tasks / model sections")
    p.add_argument("--init-encoder", type=Path, help="NP-BTL reward bundle to start the context encoder from")
    p.add_argument("--embed-cache", type=Path, help="safetensors file caching context embeddings")
    p.add_argument("--include-base", action="store_true", help="store the base weights in the bundle (small models)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing OUT.ckpt and start over")
    p.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "policy":
        return _main_policy(args)
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


def _main_policy(args: argparse.Namespace) -> int:
    from core.basemodels import BaseModelError
    from core.embed import EmbedderError

    try:
        run = load_policy_run_config(args.config)
        if args.steps is not None:
            run.train.steps = args.steps
        if args.seed is not None:
            run.train.seed = args.seed
        pairs = load_pairs(args.pairs)
        if args.no_resume:
            shutil.rmtree(args.out.parent / f"{args.out.name}.ckpt", ignore_errors=True)
        meta = train_policy(pairs, args.model, args.out, run, args.base, init_encoder=args.init_encoder,
                            include_base=args.include_base, quiet=args.quiet, data_meta=file_meta(args.pairs),
                            embed_cache=args.embed_cache)
    except (PairsFormatError, BundleError, BaseModelError, EmbedderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = meta["metrics"]
    print(f"wrote {args.out}: val_loss {m['best_val_loss']:.4f}, implicit-reward val_acc {m['val_acc']:.4f}, "
          f"{m['train_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
