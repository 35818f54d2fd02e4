"""Training CLI and loops.

    python -m core.train reward --pairs FILE --model np-btl|np-btl-latent|btl|dpl --out DIR [--config YAML]
    python -m core.train policy --pairs FILE --base MODEL --model np-dpo|dpo --out DIR [--config YAML]
    accelerate launch [--config_file recipes/accelerate/ddp.yaml] -m core.train policy --config recipes/X.yaml

A config file's optional `job:` section holds the flags (pairs, model, out, base, ...), so
`--config FILE` alone can describe a run; a flag on the command line wins over the file.

Runs on CPU as is and on one or many GPUs unchanged through `accelerate launch` (DDP; FSDP2
for policies). AdamW, gradient clipping, warm-up + cosine schedule, the best checkpoint by
predictive loss on a fixed validation set of tasks, a progress bar, and resume from
`DIR.ckpt/` after an interruption. The output DIR is a reward or policy bundle (core.bundle).

Several processes give the same run as one process with the same global batch:

- step s trains on global batch s of the task sampler (a pure function of the seed and s);
  process r takes tasks [r·B/W, (r+1)·B/W) of it, so train.batch_size must divide by W;
- every other draw of step s (dropout, latent samples) comes from a seed made of (seed, s, r);
- validation batches are split over the processes and their sums added up;
- only process 0 writes checkpoints and the bundle, atomically (core.bundle).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from core.bundle import (BundleError, load_bundle_tensors, load_state_strict, read_manifest, save_bundle,
                         save_reward_bundle)
from core.config import JobConfig, RunConfig, read_config_file, run_config_from_dict, split_job
from core.data.pairs import PairSet, PairsFormatError, load_pairs
from core.data.tasks import TaskBatch, TaskSampler
from core.embed import TEXT_EMBEDDERS, text_embedder_dim
from core.reward import MODELS, PreferenceModel, config_from_dict, gather_features


def option_embeddings(pairs: PairSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Option features for every pair: (n, d) tensors for a and b.

    Numeric options are their own features. Text options need an embedder (core.embed):
    `--embedder` / job.embedder on the CLI, `embedder=` or `emb=` in train_reward.
    """
    if pairs.is_numeric:
        return torch.from_numpy(pairs.a), torch.from_numpy(pairs.b)
    raise ValueError(f"{pairs.source}: text options must be embedded first; numeric options train directly. "
                     "Training: `core.train reward --embedder minilm` (or job.embedder in the config); "
                     "in Python: precomputed embeddings, emb=(a, b).")


# -- processes ------------------------------------------------------------------------------

def _step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of training step `step` on process `rank`: resumable without RNG state."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(f"train.batch_size={batch_size} is the global batch (tasks per step) and must be "
                         f"divisible by the number of processes ({world})")


def _rank_share(batch: TaskBatch, rank: int, world: int) -> TaskBatch:
    """This process's tasks [rank·B/W, (rank+1)·B/W) of a global batch (padding widths kept)."""
    if world == 1:
        return batch
    n = len(batch) // world
    sl = slice(rank * n, (rank + 1) * n)
    return dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[sl] for f in dataclasses.fields(batch)
                                         if getattr(batch, f.name) is not None})


def _sum_over_processes(acc, values: list[float]) -> list[float]:
    """Element-wise sums over all processes (float64, so the order of addition hardly matters)."""
    if acc.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.reduce(t, reduction="sum").tolist()


def _mean_over_processes(acc, metrics: dict[str, float]) -> dict[str, float]:
    """The mean over processes of each process's step metrics (each process has B/W tasks)."""
    keys = sorted(metrics)
    sums = _sum_over_processes(acc, [float(metrics[k]) for k in keys])
    return {k: v / acc.num_processes for k, v in zip(keys, sums)}


def _is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _warn_one_cpu_process(acc) -> None:
    """`accelerate launch --cpu --num_processes N` starts ONE process unless given an MPI hostfile
    (accelerate's simple launcher); say so rather than train on 1 process as if on N."""
    import os

    env = os.environ
    if (acc.num_processes == 1 and env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env
            and "WORLD_SIZE" not in env and not any(k in env for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))):
        print("warning: accelerate launch --cpu asked for several processes but started one (its --cpu launcher "
              "needs an MPI hostfile). For N CPU processes over gloo on a machine without GPUs use "
              "`accelerate launch --multi_gpu --num_processes N` (or CUDA_VISIBLE_DEVICES= to hide GPUs).",
              file=sys.stderr)


def _check_stop_at(stop_at: int | None, start: int, steps: int) -> None:
    if stop_at is None:
        return
    if not start < stop_at < steps:
        raise ValueError(f"--stop-at {stop_at}: must lie after the step this run starts from ({start}) "
                         f"and before train.steps ({steps})")


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2-sharded one (a collective: every process must call it); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` sharded as `ref` is, when `ref` is an FSDP2 DTensor (a collective); else `full` on ref's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(ref, DTensor):
        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device)


# -- checkpoints ----------------------------------------------------------------------------

def _opt_state_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat whole tensors and a JSON-able rest (all processes call it)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid in sorted(sd["state"]):
        for k in sorted(sd["state"][pid]):
            v = sd["state"][pid][k]
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = _full(v)
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_opt_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    """Restore an optimizer from _opt_state_tensors output; state shaped like its parameter is sharded like it."""
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    # sorted: sharding is a collective, so every process must go in the same order (safetensors' is not fixed)
    for key, v in sorted(tensors.items()) + sorted(rest["scalars"].items()):
        pid, name = key.split(".", 1)
        pid = int(pid)
        if pid >= len(params):
            raise BundleError(f"checkpoint optimizer state names parameter {pid}, the optimizer has {len(params)}")
        if torch.is_tensor(v) and v.shape == params[pid].shape and v.ndim > 0:
            v = _like(v, params[pid].detach())
        state.setdefault(pid, {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def _fingerprint(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _read_checkpoint(ckpt: Path, fingerprint: str) -> dict[str, Any] | None:
    """Check a checkpoint against the run; None when there is none.

    Returns the manifest plus "model", "optim" and "best" tensors (best is None if not yet chosen).
    """
    if not (ckpt / "bundle.json").is_file():
        return None
    meta = read_manifest(ckpt)
    if meta.get("fingerprint") != fingerprint:
        raise BundleError(f"{ckpt}: checkpoint is from a different config or data (or base model); "
                          f"delete it or use another --out to start over")
    best = load_bundle_tensors(ckpt, "best", meta)
    return {**meta, "model": load_bundle_tensors(ckpt, "model", meta),
            "optim_tensors": load_bundle_tensors(ckpt, "optim", meta), "best": best or None}


def _open_checkpoint(acc, out: Path, fingerprint: str, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    """OUT.ckpt beside the output, and what it holds for this run (None: start fresh). Without
    resume, process 0 deletes it first; every process waits for that before reading."""
    ckpt = out.parent / f"{out.name}.ckpt"
    if not resume and acc.is_main_process:
        shutil.rmtree(ckpt, ignore_errors=True)
    acc.wait_for_everyone()
    return ckpt, _read_checkpoint(ckpt, fingerprint) if resume else None


def _write_checkpoint(acc, ckpt: Path, fingerprint: str, step: int, best_val: float, history: list, opt,
                      model_state: dict[str, torch.Tensor], best_state: dict[str, torch.Tensor] | None,
                      extra: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Every process calls this (FSDP2 gathers shards); process 0 writes the folder atomically."""
    otensors, orest = _opt_state_tensors(opt.optimizer if hasattr(opt, "optimizer") else opt)
    model_state = {k: _full(model_state[k]) for k in sorted(model_state)}  # sorted: the same order everywhere
    best_state = {k: _full(best_state[k]) for k in sorted(best_state or {})}
    if acc.is_main_process:
        save_bundle(ckpt, {"kind": "train-checkpoint", "fingerprint": fingerprint, "step": step,
                           "best_val": best_val, "history": history, "optim": orest,
                           "processes": acc.num_processes},
                    {"model": model_state, "optim": otensors, "best": best_state, **(extra or {})})
    acc.wait_for_everyone()


# -- embeddings -----------------------------------------------------------------------------

def make_embedder(name: str, policy=None, device: str | torch.device = "cpu"):
    """A text embedder by name: minilm, style, words or joined by "+" (core.embed.TEXT_EMBEDDERS),
    base (a policy's own base LM, adapters off), or lm:SPEC."""
    from core.embed import LMEmbedder, make_text_embedder

    if name in TEXT_EMBEDDERS:
        return make_text_embedder(name, device=device)
    if name == "base":
        if policy is None:
            raise ValueError("embedder 'base' embeds with the policy's base LM: pass the policy")
        return LMEmbedder(policy.lm, policy.tokenizer, f"base:{policy.cfg.base}", context=policy.reference)
    if name.startswith("lm:") and len(name) > 3:
        from core.basemodels import load_base

        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        lm, tok, _ = load_base(name[3:], dtype=dtype, device=device)
        return LMEmbedder(lm, tok, name)
    raise ValueError(f"unknown embedder {name!r}; expected {', '.join(TEXT_EMBEDDERS)}, base (policies) or lm:SPEC")


def _embed_once(acc, pairs: PairSet, make: Callable[[], Any], cache_path: str | Path | None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], str]:
    """Embed every pair's options on process 0 (through the cache file, if any) and share them.

    Returns ((n, d) a, (n, d) b) on the CPU and the embedder's name.
    """
    from core.embed import EmbeddingCache, embed_pairs

    emb, name = None, None
    if acc.is_main_process:
        cache = EmbeddingCache(make(), cache_path)
        emb = embed_pairs(pairs, cache)
        cache.save()
        name = cache.embedder.name
    if acc.num_processes > 1:
        from accelerate.utils import broadcast, broadcast_object_list

        info = [name, None if emb is None else int(emb[0].shape[1])]
        broadcast_object_list(info, from_process=0)
        name, d = info
        n = len(pairs)
        both = torch.cat(emb).float().to(acc.device) if emb is not None else torch.empty(2 * n, d, device=acc.device)
        both = broadcast(both, from_process=0).cpu()  # (2n, d): a rows, then b rows
        emb = (both[:n], both[n:])
    return emb, name


# -- reward models --------------------------------------------------------------------------

def _fit_input_stats(encoder, pairs: PairSet, emb_a: torch.Tensor, emb_b: torch.Tensor,
                     device: torch.device | str) -> None:
    """Standardise the encoder's inputs with the train split's option statistics (input_norm)."""
    tr = torch.as_tensor(pairs.indices("train"), device=emb_a.device)
    opts = torch.cat([emb_a[tr], emb_b[tr]]).float()  # (2 n_train, d)
    encoder.set_input_stats(opts.mean(0).to(device), opts.std(0).to(device))


def _task_samplers(pairs: PairSet, run: RunConfig, val_batch: int) -> tuple[TaskSampler, list[TaskBatch]]:
    """The training task stream and the fixed validation batches used for checkpoint selection."""
    tc = run.train
    if len(pairs.indices("val")) < run.tasks.n_targets:
        raise ValueError(f"{pairs.source}: {len(pairs.indices('val'))} 'val' pairs; checkpoint selection needs "
                         f"at least n_targets={run.tasks.n_targets}")
    # validation scores the clicks, so it draws no teacher-only pairs: its tasks are the same with or without them
    val_tasks = dataclasses.replace(run.tasks, teacher_context=0)
    val_batches = TaskSampler(pairs, val_tasks, split="val", seed=tc.seed + 1).fixed_batches(tc.val_tasks, val_batch)
    return TaskSampler(pairs, run.tasks, split="train", seed=tc.seed), val_batches


def train_reward(pairs: PairSet, model_name: str, out: str | Path, run: RunConfig,
                 emb: tuple[torch.Tensor, torch.Tensor] | None = None, quiet: bool = False,
                 resume: bool = True, data_meta: dict[str, Any] | None = None, embedder: str | None = None,
                 embed_cache: str | Path | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Train one reward model and write its bundle to `out`. Returns the bundle metadata.

    Option features: `emb` if given; else numeric options themselves; else text options embedded
    with `embedder` (minilm or lm:SPEC, cached in `embed_cache`).
    stop_at: stop after this step, leaving the checkpoint `out.ckpt/` to resume from (e.g. to fit
      a job-time limit); returns {"stopped_at", "checkpoint", "history"} and writes no bundle.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    tc = run.train
    torch.manual_seed(tc.seed)
    # Parameters such as the learned prior only get gradients when a task has an empty context.
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    _warn_one_cpu_process(acc)
    if _is_fsdp(acc):
        raise ValueError("reward models are small MLPs: train them with DDP (recipes/accelerate/ddp.yaml), "
                         "not FSDP")
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {', '.join(MODELS)}")
    world, rank = acc.num_processes, acc.process_index
    _check_batch(tc.batch_size, world)
    embedder_meta = None
    if emb is not None and embedder is not None:
        raise ValueError("pass precomputed embeddings (emb=) or an embedder name, not both")
    if emb is None and embedder is not None:
        if pairs.is_numeric:
            raise ValueError(f"{pairs.source}: numeric options are their own features; drop the embedder "
                             f"({embedder!r})")
        emb, ename = _embed_once(acc, pairs, lambda: make_embedder(embedder, device=acc.device), embed_cache)
        embedder_meta = {"name": ename, "spec": embedder, "dim": int(emb[0].shape[1])}
    emb_a, emb_b = emb if emb is not None else option_embeddings(pairs)
    emb_a, emb_b = emb_a.float().to(acc.device), emb_b.float().to(acc.device)
    mcfg = config_from_dict({"model": model_name, "d_in": int(emb_a.shape[1]), **run.model})
    if run.tasks.teacher_context:
        raise ValueError(f"tasks.teacher_context={run.tasks.teacher_context} is for a policy's teacher; a reward "
                         "model has none (set it to 0)")
    torch.manual_seed(tc.seed)  # loading an embedder draws from the RNG: the init must not depend on it
    model = PreferenceModel(mcfg)
    if mcfg.input_norm:
        _fit_input_stats(model.encoder, pairs, emb_a, emb_b, emb_a.device)
    model.to(acc.device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    train_sampler, val_batches = _task_samplers(pairs, run, 256)

    out = Path(out)
    data_hash = hashlib.sha256()  # what was trained on, whatever the caller says about it
    for arr in (emb_a.cpu().numpy(), emb_b.cpu().numpy(), pairs.choices, pairs.split.astype("U5")):
        data_hash.update(arr.tobytes())
    fingerprint = _fingerprint({"model": mcfg.to_dict(), "run": run.to_dict(), "data": data_meta or {},
                                "data_sha256": data_hash.hexdigest()})
    start, best_val, best_state, history = 0, float("inf"), None, []
    ckpt, restored = _open_checkpoint(acc, out, fingerprint, resume)
    if restored is not None:
        load_state_strict(model, restored["model"], f"{ckpt} model")
        start, best_val, history, best_state = (restored["step"], restored["best_val"], restored["history"],
                                                restored["best"])
        if not quiet:
            acc.print(f"resuming {out} from step {start}")
    _check_stop_at(stop_at, start, tc.steps)

    model, opt = acc.prepare(model, opt)
    raw_model = acc.unwrap_model(model)
    if restored is not None:
        _load_opt_state(opt.optimizer, restored["optim_tensors"], restored["optim"])

    def validate() -> dict[str, float]:
        raw_model.eval()
        nll_sum = correct_sum = n = 0.0
        for k in range(rank, len(val_batches), world):
            g = torch.Generator(device=acc.device).manual_seed(tc.seed + 7 + k)  # per batch: any split agrees
            r = raw_model.evaluate(gather_features(val_batches[k], emb_a, emb_b, acc.device), g)
            s = r["scored"].float()
            nll_sum += (r["nll"] * s).sum().item()
            correct_sum += (r["correct"] * s).sum().item()
            n += s.sum().item()
        raw_model.train()
        nll_sum, correct_sum, n = _sum_over_processes(acc, [nll_sum, correct_sum, n])
        return {"val_nll": nll_sum / max(n, 1), "val_acc": correct_sum / max(n, 1)}

    t0 = time.time()
    model.train()
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=quiet or not acc.is_main_process,
               desc=f"{model_name}", dynamic_ncols=True, file=sys.stderr)
    last: dict[str, float] = {}
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = tc.lr_at(step)
        torch.manual_seed(_step_seed(tc.seed, step, rank))
        batch = _rank_share(train_sampler.sample(step, tc.batch_size), rank, world)
        loss, last = model(gather_features(batch, emb_a, emb_b, acc.device))
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if tc.grad_clip:
            acc.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        done = step + 1
        if done % tc.eval_every == 0 or done == tc.steps:
            step_metrics = _mean_over_processes(acc, last)
            v = validate()
            history.append({"step": done, "train_loss": step_metrics["loss"], **v})
            if v["val_nll"] < best_val:
                best_val = v["val_nll"]
                best_state = {k: t.detach().clone() for k, t in raw_model.state_dict().items()}
            bar.set_postfix(loss=f"{step_metrics['loss']:.3f}", val_nll=f"{v['val_nll']:.3f}",
                            val_acc=f"{v['val_acc']:.3f}")
        if (done % tc.checkpoint_every == 0 or done == stop_at) and done < tc.steps:
            _write_checkpoint(acc, ckpt, fingerprint, done, best_val, history, opt, raw_model.state_dict(),
                              best_state)
        if done == stop_at:
            bar.close()
            return {"stopped_at": done, "checkpoint": str(ckpt), "history": history}
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
                    "steps": tc.steps, "processes": world, "train_seconds": round(time.time() - t0, 2),
                    "history": history},
    }
    if embedder_meta is not None:
        meta["embedder"] = embedder_meta
    if acc.is_main_process:
        save_reward_bundle(out, raw_model.cpu(), meta)
        shutil.rmtree(ckpt, ignore_errors=True)
    acc.wait_for_everyone()
    return meta


# -- policies -------------------------------------------------------------------------------

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
    """The train / tasks / model sections of a policy config file (its `job` section is checked, then set aside)."""
    if path is None:
        return policy_run_config(None)
    _, rest = split_job(read_config_file(path), "policy", str(path))
    return policy_run_config(rest, str(path))


def _text_data_hash(pairs: PairSet) -> str:
    h = hashlib.sha256()
    for i in range(len(pairs)):
        h.update(json.dumps([pairs.prompts[i], pairs.a[i], pairs.b[i]]).encode())
    h.update(pairs.choices.tobytes())
    h.update(pairs.split.astype("U5").tobytes())
    return h.hexdigest()


def policy_config(model: dict[str, Any], model_name: str, base: str, hidden: Callable[[], int] | None = None,
                  init_reward_config: dict[str, Any] | None = None):
    """The PolicyConfig of a run from its `model` section.

    model_name: np-dpo (conditioned) or dpo. hidden: the base's hidden size, asked for only when
    the context embedder is the base itself and model.d_in is not given. init_reward_config: the
    reward_config of an --init-encoder bundle; when the section gives no encoder, the policy takes
    the bundle's encoder config (and its d_in, d_z).
    """
    from core.policy import PolicyConfig

    pdict = {**model, "conditioned": model_name == "np-dpo"}
    pdict.setdefault("base", base)
    if init_reward_config is not None and pdict["conditioned"] and "encoder" not in pdict:
        renc = init_reward_config["encoder"]
        for key in ("d_in", "d_z"):
            if key in pdict and pdict[key] != renc[key]:
                raise ValueError(f"model.{key}={pdict[key]} but the --init-encoder bundle's encoder has "
                                 f"{key}={renc[key]}; drop model.{key} or make them match")
        pdict.update(encoder=dict(renc), d_in=renc["d_in"], d_z=renc["d_z"])
    if pdict["conditioned"] and "d_in" not in pdict:
        if pdict.get("embedder", "minilm") in TEXT_EMBEDDERS:
            pdict["d_in"] = text_embedder_dim(pdict.get("embedder", "minilm"))
        elif hidden is None:
            raise ValueError("model.embedder 'base' needs the base's hidden size (or model.d_in)")
        else:
            pdict["d_in"] = hidden()
    if "encoder" in pdict and isinstance(pdict["encoder"], dict):
        pdict["encoder"] = {"d_in": pdict.get("d_in", 384), "d_z": pdict.get("d_z", 32), **pdict["encoder"]}
    return PolicyConfig.from_dict(pdict)


class PolicyStep(nn.Module):
    """The module handed to `accelerate.prepare` for a policy: every use of the policy's weights
    during training goes through this forward, because FSDP gathers sharded weights only there.

    forward("loss", DPOInputs) -> (loss, metrics); ("logits", DPOInputs) -> (R,) DPO logits;
    ("reference", Sequences) -> (N,) reference log-probs.
    """

    def __init__(self, policy) -> None:
        super().__init__()
        from core.film import unwrap

        self.policy = policy
        # FSDP's transformer-based auto wrap reads this: one unit per decoder block, for any family.
        self._no_split_modules = list(getattr(unwrap(policy.lm), "_no_split_modules", None) or [])

    def forward(self, mode: str, x):
        if mode == "loss":
            return self.policy(x)
        if mode == "logits":
            return self.policy.dpo_logits(x)
        if mode == "reference":
            return self.policy.reference_logprobs(x)
        raise ValueError(f"unknown PolicyStep mode {mode!r}")


def _precompute_reference(acc, call: Callable, data, pairs: PairSet, splits: tuple[str, ...] = ("train", "val"),
                          rows_per_call: int = 16) -> None:
    """Reference log-probs of every pair of `splits` not yet cached, split over the processes in
    lockstep (equal numbers of forward calls, as FSDP needs), then shared with every process."""
    from core.policy import collate

    idx = np.concatenate([pairs.indices(s) for s in splits])
    todo = [int(i) for i in idx if torch.isnan(data.ref[int(i)]).any()]
    # similar lengths in a call waste little on padding
    todo.sort(key=lambda i: -(sum(map(len, data.tok_a[i])) + sum(map(len, data.tok_b[i]))))
    world, rank = acc.num_processes, acc.process_index
    mine = todo[rank::world]
    calls = math.ceil(math.ceil(len(todo) / world) / rows_per_call) if todo else 0
    for c in range(calls):
        rows = mine[c * rows_per_call:(c + 1) * rows_per_call]
        dummy = not rows  # this process has run out: a throwaway call keeps FSDP's collectives in step
        rows = rows or todo[:1]
        s = collate([data.tok_a[i] for i in rows] + [data.tok_b[i] for i in rows], data.pad_id).to(acc.device)
        with torch.no_grad(), acc.autocast():
            lp = call("reference", s).float().cpu()  # (2m,)
        if not dummy:
            data.ref[rows] = torch.stack(lp.chunk(2), 1)
    _share_reference(acc, data)


REFERENCE_SPLITS = ("train", "val")  # the pairs whose reference log-probs training and validation use


def weights_hash(module: nn.Module) -> str:
    """sha256 of a module's state (names, dtypes, bytes): which weights a reference cache belongs to."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}\x00{t.dtype}\x00".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _reference_fingerprint(weights: str, data, pairs: PairSet, precision: str) -> str:
    """What a table of reference log-probs depends on: the base weights, every scored pair's tokens
    (tokenizer, chat template, truncation) and the arithmetic."""
    h = hashlib.sha256()
    for i in np.concatenate([pairs.indices(s) for s in REFERENCE_SPLITS]):
        h.update(json.dumps([int(i), data.tok_a[int(i)], data.tok_b[int(i)]]).encode())
    return _fingerprint({"weights": weights, "tokens": h.hexdigest(), "precision": precision, "n_pairs": len(pairs),
                         "splits": list(REFERENCE_SPLITS)})


def _write_reference(path: Path, fingerprint: str, base_info: dict[str, Any], ref: torch.Tensor) -> None:
    save_bundle(path, {"kind": "reference-logprobs", "fingerprint": fingerprint, "base": base_info,
                       "splits": list(REFERENCE_SPLITS)}, {"reference": {"ref": ref}})


def _fill_reference(acc, call: Callable, data, pairs: PairSet, path: Path, fingerprint: str,
                    base_info: dict[str, Any], restored: bool = False) -> None:
    """Fill data.ref for every train/val pair: loaded from `path` when it was made for `fingerprint`,
    else computed and written there. restored: data.ref came from a checkpoint, which wins (the
    missing rows are computed, nothing is written)."""
    cached = None if restored else _read_reference(path, fingerprint, len(pairs))
    if cached is not None:
        data.ref = cached
    _precompute_reference(acc, call, data, pairs, REFERENCE_SPLITS)
    if cached is None and not restored and acc.is_main_process:
        _write_reference(path, fingerprint, base_info, data.ref)
    acc.wait_for_everyone()


def _read_reference(path: Path, fingerprint: str, n: int) -> torch.Tensor | None:
    """The (n, 2) table kept in `path` if it was made for this fingerprint; None (with a note why) if not."""
    if not path.exists():
        return None
    try:
        meta = read_manifest(path)
        if meta.get("kind") != "reference-logprobs" or meta.get("fingerprint") != fingerprint:
            print(f"{path}: reference log-probs for another base, tokenisation or precision; recomputing",
                  file=sys.stderr)
            return None
        ref = load_bundle_tensors(path, "reference", meta)["ref"]
    except (BundleError, KeyError) as e:
        print(f"{path}: unreadable reference cache ({e}); recomputing", file=sys.stderr)
        return None
    if ref.shape != (n, 2):
        print(f"{path}: reference table is {tuple(ref.shape)}, expected ({n}, 2); recomputing", file=sys.stderr)
        return None
    return ref.float()


def _share_reference(acc, data) -> None:
    """Merge the reference caches of all processes (the first process that has a value gives it)."""
    if acc.num_processes == 1:
        return
    every = acc.gather(data.ref.to(acc.device)[None])  # (W, n, 2)
    first = (~torch.isnan(every)).float().argmax(0)  # (n, 2): first process with a value
    data.ref = every.gather(0, first[None])[0].cpu()  # (n, 2)


class _GatheredPolicy:
    """What save_policy_bundle reads from a policy, with the trained tensors already gathered whole."""

    def __init__(self, policy, state: dict[str, torch.Tensor]) -> None:
        self.cfg, self.lm, self.tokenizer, self._state = policy.cfg, policy.lm, policy.tokenizer, state

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self._state


def _use_bf16(tc) -> bool:
    """Whether a policy run computes in bf16: asked for, or auto on a GPU that has it."""
    cuda = torch.cuda.is_available()
    return tc.precision == "bf16" or (tc.precision == "auto" and cuda and torch.cuda.is_bf16_supported())


def _load_policy_base(base: str | tuple, base_dtype: str, bf16: bool) -> tuple:
    """(model, tokenizer, info) of a policy's base: a core.basemodels spec, or already loaded."""
    if not isinstance(base, str):
        return base
    from core.basemodels import load_base

    want_bf16 = base_dtype == "bfloat16" or (base_dtype == "auto" and bf16)
    lm, tok, info = load_base(base, dtype=torch.bfloat16 if want_bf16 else torch.float32)
    return lm, tok, {**info, "spec": base}


def precompute_reference(pairs: PairSet, run: RunConfig, base: str | tuple, path: str | Path,
                         base_dtype: str = "auto") -> Path:
    """Write train_policy's `reference_cache` for this base and run before any policy trains.

    Policies trained later on the same base and tokenisation (max_prompt_tokens,
    max_response_tokens) load it, however they are scheduled: side by side in two processes, or one
    after the other, they see the same values. A folder that already matches is left as it is.
    base: as in train_policy (a loaded model is wrapped in place, as training does). One process.
    """
    from accelerate import Accelerator

    from core.policy import PolicyData, SteerablePolicy

    bf16 = _use_bf16(run.train)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="bf16" if bf16 else "no")
    if acc.num_processes > 1:
        raise ValueError("precompute_reference runs in one process; train_policy fills the cache under accelerate")
    lm, tok, base_info = _load_policy_base(base, base_dtype, bf16)
    tokens = {k: run.model[k] for k in ("max_prompt_tokens", "max_response_tokens") if k in run.model}
    cfg = policy_config(tokens, "dpo", str(base_info.get("spec", base_info.get("name", "custom"))))
    weights = weights_hash(lm)  # before LoRA is added, as train_policy hashes it
    policy = SteerablePolicy(cfg, lm, tok).to(acc.device).eval()
    data = PolicyData(policy, pairs, None)
    path = Path(path)
    _fill_reference(acc, lambda mode, s: policy.reference_logprobs(s), data, pairs, path,
                    _reference_fingerprint(weights, data, pairs, "bf16" if bf16 else "fp32"), base_info)
    return path


@torch.no_grad()
def _teacher_rewards(teacher: PreferenceModel, data, batch: TaskBatch, score: torch.Tensor,
                     device: torch.device) -> torch.Tensor:
    """A reward model's rewards, given each task's context, of the responses of the targets where
    score (B, T) is True, in the row order of PolicyData.inputs' sequences (a's, then b's): (2R,).
    z is the mean of q(z | C), as the policy's is; p(b ≻ a | context) = σ(r_b − r_a). With
    TaskConfig.teacher_context > 0 the teacher's C is the task's context and that many more clicks."""
    task, pos = score.nonzero(as_tuple=True)  # (R,), (R,)
    task, pos = task.to(device), pos.to(device)
    view = batch.teacher_view()  # its context has TaskConfig.teacher_context more pairs, if any
    r_a, r_b = teacher.option_rewards(gather_features(view, data.emb_a, data.emb_b, device))  # (B, T) each
    return torch.cat([r_a[task, pos], r_b[task, pos]]).float()  # (2R,)


def train_policy(pairs: PairSet, model_name: str, out: str | Path, run: RunConfig, base: str | tuple,
                 emb: tuple[torch.Tensor, torch.Tensor] | None = None, init_encoder: str | Path | None = None,
                 include_base: bool = False, quiet: bool = False, resume: bool = True,
                 data_meta: dict[str, Any] | None = None, embed_cache: str | Path | None = None,
                 base_dtype: str = "auto", stop_at: int | None = None,
                 reference_cache: str | Path | None = None, teacher: str | Path | None = None) -> dict[str, Any]:
    """Train an NP-DPO or DPO policy and write its bundle to `out`. Returns the bundle metadata.

    base: a spec for core.basemodels.load_base, or an already loaded (model, tokenizer, info).
    init_encoder: an NP-BTL reward bundle whose context encoder starts the policy's; when the
      config gives no model.encoder, the policy takes the bundle's encoder config (and d_in, d_z).
    base_dtype: the frozen base weights' dtype when `base` is a spec: float32, bfloat16, or auto
      (bfloat16 when training in bf16).
    stop_at: as in train_reward.
    reference_cache: a folder for the reference log-probs of every train and val pair. Where it
      holds them for this base (same weights, tokens and precision) they are loaded; otherwise they
      are computed up front, in length-sorted batches, and written there. NP-DPO and its DPO
      baseline on one base then share one computation, and each gets the same values whichever
      trains first. Without it one process computes them lazily, as pairs are drawn.
    teacher: an NP reward bundle (NP-BTL) that gives p(b ≻ a | context) for the loss's target when
      the config's teacher_weight is > 0 (PolicyConfig.teacher_weight); needed then, refused otherwise.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from tqdm.auto import tqdm

    from core.bundle import load_reward_bundle, save_policy_bundle
    from core.film import hidden_size
    from core.losses import btl_nll
    from core.policy import PolicyData, SteerablePolicy

    if model_name not in POLICY_MODELS:
        raise ValueError(f"unknown policy model {model_name!r}; expected one of {', '.join(POLICY_MODELS)}")
    if base_dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"base_dtype must be auto, float32 or bfloat16, got {base_dtype!r}")
    tc = run.train
    cuda = torch.cuda.is_available()
    bf16 = _use_bf16(tc)
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no",
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    _warn_one_cpu_process(acc)
    fsdp = _is_fsdp(acc)
    if fsdp and acc.state.fsdp_plugin.fsdp_version != 2:
        raise ValueError("policies train under FSDP version 2 only (fsdp_version: 2, as in "
                         "recipes/accelerate/fsdp.yaml); FSDP1 flat parameters would mix the frozen base with "
                         "the trained LoRA/FiLM tensors")
    if fsdp and include_base:
        raise ValueError("include_base stores the whole base model, which FSDP keeps sharded; "
                         "train with DDP, or leave include_base off")
    world, rank = acc.num_processes, acc.process_index
    _check_batch(tc.batch_size, world)
    lm, tok, base_info = _load_policy_base(base, base_dtype, bf16)
    init_cfg = None
    if init_encoder is not None and model_name == "np-dpo":
        init_cfg = read_manifest(init_encoder).get("reward_config") or {}
        if not isinstance(init_cfg.get("encoder"), dict):
            raise ValueError(f"{init_encoder}: not an NP reward bundle (its reward_config has no encoder)")
    cfg = policy_config(run.model, model_name, str(base_info.get("spec", base_info.get("name", "custom"))),
                        lambda: hidden_size(lm), init_cfg)
    base_weights = weights_hash(lm) if reference_cache is not None and cfg.cache_reference else None
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
        want = (rmeta.get("embedder") or {}).get("spec")
        if want is not None and want != cfg.embedder:
            raise ValueError(f"{init_encoder}: its encoder read {want!r} embeddings, the policy's model.embedder "
                             f"is {cfg.embedder!r}; they must be the same")
    teacher_model = None
    if (teacher is None) != (cfg.teacher_weight == 0):
        raise ValueError("model.teacher_weight > 0 needs a teacher reward bundle (--teacher), and a teacher needs "
                         f"teacher_weight > 0; got teacher_weight {cfg.teacher_weight} and teacher {teacher}")
    if run.tasks.teacher_context and teacher is None:
        raise ValueError(f"tasks.teacher_context={run.tasks.teacher_context} adds clicks only a teacher reads, and "
                         "there is no teacher (model.teacher_weight > 0 with --teacher)")
    if teacher is not None:
        teacher_model, tmeta = load_reward_bundle(teacher)
        if teacher_model.encoder is None:
            raise ValueError(f"{teacher}: a teacher must read the context: an NP reward model, not {tmeta.get('model')!r}")
        want = (tmeta.get("embedder") or {}).get("spec")
        if teacher_model.cfg.d_in != cfg.d_in or (want is not None and want != cfg.embedder):
            raise ValueError(f"{teacher}: the teacher reads {want or 'unnamed'} {teacher_model.cfg.d_in}-d embeddings, "
                             f"the policy {cfg.embedder!r} {cfg.d_in}-d; they must be the same")
        teacher_model = teacher_model.to(acc.device).eval()
        enc_meta["teacher"] = str(teacher)
    embedder_name = None
    if cfg.conditioned and emb is None:
        emb, embedder_name = _embed_once(acc, pairs, lambda: make_embedder(cfg.embedder, policy, acc.device),
                                         embed_cache)
    elif cfg.conditioned:
        embedder_name = "given"
    if emb is not None and emb[0].shape[1] != cfg.d_in:
        raise ValueError(f"context embeddings are {emb[0].shape[1]}-d, the policy expects d_in={cfg.d_in}")
    if policy.encoder is not None and policy.encoder.cfg.input_norm and init_encoder is None:
        _fit_input_stats(policy.encoder, pairs, emb[0], emb[1], acc.device)
    data = PolicyData(policy, pairs, None if emb is None else (emb[0].float(), emb[1].float()))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    train_sampler, val_batches = _task_samplers(pairs, run, 8)

    out = Path(out)
    emb_hash = hashlib.sha256(b"" if emb is None else emb[0].numpy().tobytes() + emb[1].numpy().tobytes())
    fingerprint = _fingerprint({"model": cfg.to_dict(), "run": run.to_dict(), "base": base_info,
                                "data": _text_data_hash(pairs), "emb": emb_hash.hexdigest(), **enc_meta})
    start, best_val, best_state, history = 0, float("inf"), None, []
    ckpt, restored = _open_checkpoint(acc, out, fingerprint, resume)
    if restored is not None:
        policy.load_adapter_state(restored["model"], f"{ckpt} model")
        data.ref = load_bundle_tensors(ckpt, "reference", restored)["ref"]
        start, best_val, history = restored["step"], restored["best_val"], restored["history"]
        if not quiet:
            acc.print(f"resuming {out} from step {start}")
    _check_stop_at(stop_at, start, tc.steps)

    model, opt = acc.prepare(PolicyStep(policy), opt)
    raw: SteerablePolicy = acc.unwrap_model(model).policy
    # FSDP gathers sharded weights only inside the prepared module's forward; DDP and one process
    # call the policy directly (no DDP hooks or buffer broadcasts outside training steps).
    call = model if fsdp else acc.unwrap_model(model)
    if restored is not None:
        _load_opt_state(opt.optimizer, restored["optim_tensors"], restored["optim"])
        if restored["best"] is not None:  # kept as the live tensors are (sharded under FSDP2)
            live = raw.adapter_state()
            best_state = {k: _like(restored["best"][k], live[k]) if k in live else restored["best"][k]
                          for k in sorted(restored["best"])}  # sorted: the same order on every process
    if base_weights is not None:
        _fill_reference(acc, call, data, pairs, Path(reference_cache),
                        _reference_fingerprint(base_weights, data, pairs, "bf16" if bf16 else "fp32"), base_info,
                        restored=restored is not None)
    elif (world > 1 or fsdp) and cfg.cache_reference:  # one process computes them lazily, as it goes
        _precompute_reference(acc, call, data, pairs, REFERENCE_SPLITS)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        raw.eval()
        nll_sum = correct_sum = n_loss = n_acc = 0.0
        mine = list(range(rank, len(val_batches), world))
        rounds = math.ceil(len(val_batches) / world) if fsdp else len(mine)
        for j in range(rounds):
            k = mine[j] if j < len(mine) else None  # None: a throwaway call that keeps FSDP in step
            vb = val_batches[0 if k is None else k]
            score = vb.unseen_mask & vb.target_mask
            if not score.any():
                if not fsdp:
                    continue
                score, k = vb.target_mask, None
            inp = data.inputs(raw, vb, score, True, acc.autocast).to(acc.device)
            with acc.autocast():
                logit = call("logits", inp).float()  # (R,)
            if k is None:
                continue
            nll_sum += btl_nll(logit, inp.choice).sum().item()
            n_loss += len(logit)
            decided = inp.choice != 0.5
            correct_sum += ((logit > 0) == (inp.choice > 0.5))[decided].sum().item()
            n_acc += decided.sum().item()
        raw.train()
        nll_sum, correct_sum, n_loss, n_acc = _sum_over_processes(acc, [nll_sum, correct_sum, n_loss, n_acc])
        return {"val_loss": nll_sum / max(n_loss, 1), "val_acc": correct_sum / max(n_acc, 1)}

    def gathered_state() -> dict[str, torch.Tensor]:
        """The trained tensors, whole (all processes call it: FSDP2 gathers shards)."""
        state = raw.adapter_state()
        return {k: _full(state[k]) for k in sorted(state)}

    t0 = time.time()
    model.train()
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=quiet or not acc.is_main_process,
               desc=model_name, dynamic_ncols=True, file=sys.stderr)
    last: dict[str, float] = {}
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = tc.lr_at(step)
        torch.manual_seed(_step_seed(tc.seed, step, rank))
        batch = _rank_share(train_sampler.sample(step, tc.batch_size), rank, world)
        inp = data.inputs(raw, batch, batch.target_mask, cfg.cache_reference, acc.autocast).to(acc.device)
        if teacher_model is not None:
            r = _teacher_rewards(teacher_model, data, batch, batch.target_mask, acc.device)  # (2R,)
            r_a, r_b = r.chunk(2)  # 2 x (R,)
            inp.target = (1 - cfg.teacher_weight) * inp.choice + cfg.teacher_weight * torch.sigmoid(r_b - r_a)
            if cfg.teacher_all_pairs:
                ia, ib = data.cross_pairs(batch, batch.target_mask)  # (E,), (E,)
                inp.cross_a, inp.cross_b = ia.to(acc.device), ib.to(acc.device)
                inp.cross_target = torch.sigmoid(r[inp.cross_b] - r[inp.cross_a])  # (E,)
        loss, last = model("loss", inp)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if raw.film is not None:
            raw.film.set_factors(None)
        if tc.grad_clip:
            acc.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        done = step + 1
        bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['acc']:.2f}")
        if done % tc.eval_every == 0 or done == tc.steps:
            step_metrics = _mean_over_processes(acc, last)
            v = validate()
            history.append({"step": done, "train_loss": step_metrics["loss"], "train_acc": step_metrics["acc"],
                            **v})
            if v["val_loss"] < best_val:
                best_val = v["val_loss"]
                best_state = {k: t.detach().clone() for k, t in raw.adapter_state().items()}
            bar.set_postfix(loss=f"{step_metrics['loss']:.3f}", val_loss=f"{v['val_loss']:.3f}",
                            val_acc=f"{v['val_acc']:.3f}")
        if (done % tc.checkpoint_every == 0 or done == stop_at) and done < tc.steps:
            _share_reference(acc, data)
            _write_checkpoint(acc, ckpt, fingerprint, done, best_val, history, opt, raw.adapter_state(),
                              best_state, {"reference": {"ref": data.ref}})
        if done == stop_at:
            bar.close()
            return {"stopped_at": done, "checkpoint": str(ckpt), "history": history}
    bar.close()

    if best_state is not None:
        raw.load_adapter_state(best_state, "best checkpoint")
    final = validate()
    meta = {
        "model": model_name,
        "base": base_info,
        "embedder": {"name": embedder_name, "spec": cfg.embedder, "dim": cfg.d_in} if cfg.conditioned else None,
        "data": data_meta or {"source": pairs.source, "n_pairs": len(pairs)},
        "user_types": pairs.user_types,
        "attribute_names": pairs.attribute_names,
        "run_config": run.to_dict(),
        **enc_meta,
        "metrics": {"best_val_loss": final["val_loss"], "val_acc": final["val_acc"], "steps": tc.steps,
                    "processes": world, "train_seconds": round(time.time() - t0, 2), "history": history},
    }
    state = gathered_state()
    if acc.is_main_process:
        save_policy_bundle(out, raw if not fsdp else _GatheredPolicy(raw, state), meta, include_base=include_base)
        shutil.rmtree(ckpt, ignore_errors=True)
    acc.wait_for_everyone()
    return meta


# -- CLI ------------------------------------------------------------------------------------

def file_meta(path: Path) -> dict[str, Any]:
    return {"source": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _job(args: argparse.Namespace, kind: str) -> tuple[JobConfig, RunConfig]:
    """The job (file `job:` section under the flags) and the run config of a CLI call."""
    where = str(args.config) if args.config else "command line"
    d = read_config_file(args.config) if args.config else {}
    job, rest = split_job(d, kind, where)
    run = run_config_from_dict(rest, where) if kind == "reward" else policy_run_config(rest, where)
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
             if k in {f.name for f in dataclasses.fields(JobConfig)}}
    job = job.merged(**flags)
    # "none" unsets an optional path of the file's job section, e.g. --model dpo --init-encoder none
    job = dataclasses.replace(job, **{k: None for k in ("init_encoder", "embed_cache", "embedder", "reference_cache",
                                                        "teacher")
                                      if str(getattr(job, k)).lower() == "none"})
    job.require("pairs", "model", "out", *(("base",) if kind == "policy" else ()))
    models = MODELS if kind == "reward" else POLICY_MODELS
    if job.model not in models:
        raise ValueError(f"{where}: model {job.model!r} is not a {kind} model; expected one of {', '.join(models)}")
    if args.steps is not None:
        run.train.steps = args.steps
    if args.seed is not None:
        run.train.seed = args.seed
    return job, run


def _is_main() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


def _stopped(meta: dict[str, Any], job: JobConfig) -> bool:
    if "stopped_at" not in meta:
        return False
    if _is_main():
        print(f"stopped after step {meta['stopped_at']}: checkpoint {meta['checkpoint']}; "
              "run the same command again to go on")
    return True


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m core.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("reward", help="train a BTL / DPL / NP-BTL reward model on a pairs file")
    p = sub.add_parser("policy", help="train an NP-DPO or DPO policy (LoRA + FiLM) on a text pairs file")
    for q, models in ((r, MODELS), (p, POLICY_MODELS)):
        q.add_argument("--config", type=Path, help="YAML with job / train / tasks / model sections")
        q.add_argument("--pairs", type=Path, help="JSONL pairs file (the data contract); or job.pairs")
        q.add_argument("--model", choices=models, help="or job.model")
        q.add_argument("--out", type=Path, help="bundle folder to write; or job.out")
        q.add_argument("--embed-cache", type=Path, help="safetensors file caching option embeddings ('none': no cache)")
        q.add_argument("--steps", type=int, help="override train.steps")
        q.add_argument("--seed", type=int, help="override train.seed")
        q.add_argument("--no-resume", action="store_true", help="ignore an existing OUT.ckpt and start over")
        q.add_argument("--stop-at", type=int, metavar="STEP",
                       help="stop after STEP, leaving OUT.ckpt; run the same command again to go on")
        q.add_argument("--quiet", action="store_true")
    r.add_argument("--embedder", help="text pairs: minilm, or lm:SPEC (a causal LM's last-token state)")
    p.add_argument("--base", help="base LM: smollm2-135m-instruct, a local folder, or a hub id; or job.base")
    p.add_argument("--base-dtype", choices=("auto", "float32", "bfloat16"),
                   help="dtype of the frozen base weights (auto: bfloat16 when training in bf16)")
    p.add_argument("--init-encoder", type=Path,
                   help="NP-BTL reward bundle to start the context encoder from ('none' unsets job.init_encoder)")
    p.add_argument("--include-base", action=argparse.BooleanOptionalAction, default=None,
                   help="store the base weights in the bundle (small models)")
    p.add_argument("--teacher", type=Path,
                   help="NP-BTL reward bundle whose p(b > a | context) blends into NP-DPO's targets "
                        "(with model.teacher_weight > 0; 'none' unsets job.teacher)")
    p.add_argument("--reference-cache", type=Path,
                   help="folder keeping the reference log-probs of every train/val pair: a second policy on the "
                        "same base (NP-DPO and its DPO baseline) loads them instead of recomputing ('none': unset)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "policy":
        return _main_policy(args)
    try:
        job, run = _job(args, "reward")
        pairs = load_pairs(Path(job.pairs))
        meta = train_reward(pairs, job.model, Path(job.out), run, quiet=args.quiet, resume=not args.no_resume,
                            data_meta=file_meta(Path(job.pairs)), embedder=job.embedder,
                            embed_cache=job.embed_cache, stop_at=args.stop_at)
    except (PairsFormatError, BundleError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _stopped(meta, job):
        return 0
    m = meta["metrics"]
    if _is_main():
        print(f"wrote {job.out}: val_nll {m['best_val_nll']:.4f}, val_acc {m['val_acc']:.4f}, "
              f"{m['train_seconds']:.1f} s")
    return 0


def _main_policy(args: argparse.Namespace) -> int:
    from core.basemodels import BaseModelError
    from core.embed import EmbedderError

    try:
        job, run = _job(args, "policy")
        pairs = load_pairs(Path(job.pairs))
        meta = train_policy(pairs, job.model, Path(job.out), run, job.base, init_encoder=job.init_encoder,
                            include_base=job.include_base, quiet=args.quiet, resume=not args.no_resume,
                            data_meta=file_meta(Path(job.pairs)), embed_cache=job.embed_cache,
                            base_dtype=job.base_dtype, stop_at=args.stop_at, reference_cache=job.reference_cache,
                            teacher=job.teacher)
    except (PairsFormatError, BundleError, BaseModelError, EmbedderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if _stopped(meta, job):
        return 0
    m = meta["metrics"]
    if _is_main():
        print(f"wrote {job.out}: val_loss {m['best_val_loss']:.4f}, implicit-reward val_acc {m['val_acc']:.4f}, "
              f"{m['train_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
