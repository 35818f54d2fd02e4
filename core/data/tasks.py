"""Tasks for neural-process training and evaluation.

A task is one user and their pairs: N_T target pairs, of which N_C (drawn per task, so one
batch mixes context sizes through masks) are also shown as context. The context is a subset
of the targets by default (as in the paper) or disjoint from them. The sampler returns the
context positions so that evaluation scores exactly the unseen targets: the authors' code
scored fixed positions `range(N_C, N_T)` instead (PAPER.md §4.A.3).

Batch `i` of a sampler is a pure function of (seed, i): training resumes and splits across
processes without carrying RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
import torch

from core.data.pairs import PairSet


@dataclass
class TaskConfig:
    n_targets: int = 20  # N_T
    max_context: int = 10  # N_C ~ U{min_context .. max_context}
    min_context: int = 0
    context_mode: Literal["subset", "disjoint"] = "subset"
    users: Literal["types", "continuous"] = "types"
    user_types: list[str] | None = None  # None: every type in the data
    weight_prior: Literal["dirichlet", "sphere"] = "dirichlet"  # continuous users' weight vectors
    dirichlet_alpha: float = 1.0
    choice_temperature: float = 0.0  # continuous users: 0 = deterministic, > 0 = BTL noise
    # > 1: a task's targets come in groups of this many pairs on one prompt (N_T / prompt_group
    # prompts, each with at least this many pairs in the target pool), so that every response to a
    # prompt can be compared with the others (PolicyConfig.teacher_all_pairs); 1 = any target pairs
    prompt_group: int = 1
    # > 0 (disjoint mode, for a policy's teacher, PolicyConfig.teacher_weight): each task also draws this many
    # more pairs of the same user outside its targets and context, clicked by that user, which only the teacher
    # reads: its context is the task's plus these (TaskBatch.teacher_view), the policy's is the task's alone
    teacher_context: int = 0

    def __post_init__(self) -> None:
        if self.n_targets < 1:
            raise ValueError(f"n_targets must be >= 1, got {self.n_targets}")
        if not 0 <= self.min_context <= self.max_context:
            raise ValueError(f"need 0 <= min_context <= max_context, got {self.min_context}, {self.max_context}")
        if self.context_mode not in ("subset", "disjoint"):
            raise ValueError(f"context_mode must be 'subset' or 'disjoint', got {self.context_mode!r}")
        if self.context_mode == "subset" and self.max_context > self.n_targets:
            raise ValueError(f"subset mode needs max_context <= n_targets, got {self.max_context} > {self.n_targets}")
        if self.users not in ("types", "continuous"):
            raise ValueError(f"users must be 'types' or 'continuous', got {self.users!r}")
        if self.weight_prior not in ("dirichlet", "sphere"):
            raise ValueError(f"weight_prior must be 'dirichlet' or 'sphere', got {self.weight_prior!r}")
        if self.prompt_group < 1 or self.n_targets % self.prompt_group:
            raise ValueError(f"prompt_group must be >= 1 and divide n_targets ({self.n_targets}), "
                             f"got {self.prompt_group}")
        if self.teacher_context < 0 or (self.teacher_context and self.context_mode != "disjoint"):
            raise ValueError(f"teacher_context must be >= 0, and > 0 only in disjoint mode; got {self.teacher_context} "
                             f"in {self.context_mode} mode")

    @classmethod
    def from_dict(cls, d: dict) -> "TaskConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown task option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


@dataclass
class TaskBatch:
    """Index tensors into a PairSet; B tasks, T = max N_T, C = max N_C in the batch."""

    target_idx: torch.Tensor  # (B, T) long, pair rows
    target_choice: torch.Tensor  # (B, T) float in {0, 0.5, 1}; 1 = b preferred
    target_mask: torch.Tensor  # (B, T) bool
    context_idx: torch.Tensor  # (B, C) long (0 where padded)
    context_choice: torch.Tensor  # (B, C) float
    context_mask: torch.Tensor  # (B, C) bool
    unseen_mask: torch.Tensor  # (B, T) bool: targets that are not in the context
    user_type: torch.Tensor  # (B,) long index into user_types, -1 for continuous users
    user_weights: torch.Tensor | None = None  # (B, A) continuous users' weights over attributes
    # TaskConfig.teacher_context > 0: the context plus the extra pairs only a teacher reads, (B, C') each, C' >= C
    teacher_context_idx: torch.Tensor | None = None
    teacher_context_choice: torch.Tensor | None = None
    teacher_context_mask: torch.Tensor | None = None

    def teacher_view(self) -> "TaskBatch":
        """The batch a teacher reads: its context has the extra pairs (itself when there are none)."""
        if self.teacher_context_idx is None:
            return self
        return replace(self, context_idx=self.teacher_context_idx, context_choice=self.teacher_context_choice,
                       context_mask=self.teacher_context_mask, teacher_context_idx=None, teacher_context_choice=None,
                       teacher_context_mask=None)

    @property
    def n_context(self) -> torch.Tensor:
        return self.context_mask.sum(1)  # (B,)

    def __len__(self) -> int:
        return self.target_idx.shape[0]


class TaskSampler:
    """Draws tasks from fixed pools of pair rows of one PairSet.

    `target_pool` / `context_pool` default to the rows of `split`. In subset mode the context
    is drawn from the task's own targets; in disjoint mode from `context_pool` minus them.
    """

    def __init__(self, pairs: PairSet, cfg: TaskConfig, split: str | None = "train", seed: int = 0,
                 target_pool: np.ndarray | None = None, context_pool: np.ndarray | None = None) -> None:
        self.pairs, self.cfg, self.seed = pairs, cfg, seed
        base = pairs.indices(split)
        self.target_pool = np.asarray(base if target_pool is None else target_pool, dtype=np.int64)
        self.context_pool = np.asarray(base if context_pool is None else context_pool, dtype=np.int64)
        if cfg.users == "types":
            types = cfg.user_types if cfg.user_types is not None else pairs.user_types
            if not types:
                raise ValueError(f"{pairs.source}: no user types to draw from (choices are empty)")
            self.type_ids = [pairs.type_index(t) for t in types]
        else:
            if pairs.attributes is None:
                raise ValueError(f"{pairs.source}: continuous users need per-option attributes")
            self.type_ids = []
        need_t = cfg.n_targets
        if len(self.target_pool) < need_t:
            raise ValueError(f"{pairs.source}: {len(self.target_pool)} target pairs available, a task needs {need_t}")
        self.prompt_rows: list[np.ndarray] = []  # prompt_group > 1: the target pool's rows of each usable prompt
        if cfg.prompt_group > 1:
            by_prompt: dict[str, list[int]] = {}
            for r in self.target_pool.tolist():
                prompt = pairs.prompts[r]
                if prompt is None:
                    raise ValueError(f"{pairs.source}: pair {pairs.ids[r]} has no prompt; prompt_group needs one per pair")
                by_prompt.setdefault(prompt, []).append(r)
            self.prompt_rows = [np.asarray(v, np.int64) for v in by_prompt.values() if len(v) >= cfg.prompt_group]
            need_p = cfg.n_targets // cfg.prompt_group
            if len(self.prompt_rows) < need_p:
                raise ValueError(f"{pairs.source}: {len(self.prompt_rows)} prompts have {cfg.prompt_group} or more "
                                 f"target pairs, a task needs {need_p}")
        if cfg.context_mode == "disjoint" and len(self.context_pool) < cfg.max_context + cfg.teacher_context:
            raise ValueError(f"{pairs.source}: {len(self.context_pool)} context pairs available, "
                             f"max_context + teacher_context is {cfg.max_context + cfg.teacher_context}")

    def sample(self, batch_index: int, batch_size: int, n_context: int | None = None,
               user_type: str | None = None) -> TaskBatch:
        """Batch number `batch_index` (deterministic in seed and index).

        n_context fixes N_C for every task (evaluation); user_type fixes the user.
        """
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, int(batch_index)])
        if n_context is not None:
            if n_context < 0 or (cfg.context_mode == "subset" and n_context > cfg.n_targets):
                raise ValueError(f"n_context={n_context} out of range for n_targets={cfg.n_targets}")
            n_cs = np.full(batch_size, n_context)
        else:
            n_cs = rng.integers(cfg.min_context, cfg.max_context + 1, size=batch_size)
        fixed_type = None if user_type is None else self.pairs.type_index(user_type)
        if fixed_type is not None and cfg.users != "types":
            raise ValueError("user_type can only be fixed when users='types'")

        T, C = cfg.n_targets, int(n_cs.max(initial=0))
        target_idx = np.zeros((batch_size, T), np.int64)
        target_choice = np.zeros((batch_size, T), np.float32)
        context_idx = np.zeros((batch_size, C), np.int64)
        context_choice = np.zeros((batch_size, C), np.float32)
        context_mask = np.zeros((batch_size, C), bool)
        unseen = np.ones((batch_size, T), bool)
        user_type_out = np.full(batch_size, -1, np.int64)
        A = len(self.pairs.attribute_names)
        weights = np.zeros((batch_size, A), np.float32) if cfg.users == "continuous" else None
        X = cfg.teacher_context
        C2 = C + X
        t_idx = np.zeros((batch_size, C2), np.int64) if X else None
        t_choice = np.zeros((batch_size, C2), np.float32) if X else None
        t_mask = np.zeros((batch_size, C2), bool) if X else None

        for i, n_c in enumerate(n_cs):
            tgt = self._draw_targets(rng, T)
            if cfg.context_mode == "subset":
                pos = rng.choice(T, size=n_c, replace=False)
                ctx = tgt[pos]
                unseen[i, pos] = False
            else:
                ctx = self._draw_outside(rng, tgt, n_c + X)  # (n_c + X,): the task's context, then the teacher's extra
            rows = np.concatenate([tgt, ctx])
            if cfg.users == "types":
                u = fixed_type if fixed_type is not None else self.type_ids[rng.integers(len(self.type_ids))]
                user_type_out[i] = u
                ch = self.pairs.choices[rows, u]
            else:
                w = self._draw_weights(rng, A)
                weights[i] = w
                ch = self._continuous_choices(rng, rows, w)
            if cfg.context_mode == "subset":
                ch = np.concatenate([ch[:T], ch[:T][pos]])  # context choices are the targets' own
            target_idx[i], target_choice[i] = tgt, ch[:T]
            context_idx[i, :n_c], context_choice[i, :n_c] = ctx[:n_c], ch[T:T + n_c]
            context_mask[i, :n_c] = True
            if X:
                t_idx[i, :n_c + X], t_choice[i, :n_c + X], t_mask[i, :n_c + X] = ctx, ch[T:], True

        return TaskBatch(
            target_idx=torch.from_numpy(target_idx),
            target_choice=torch.from_numpy(target_choice),
            target_mask=torch.ones(batch_size, T, dtype=torch.bool),
            context_idx=torch.from_numpy(context_idx),
            context_choice=torch.from_numpy(context_choice),
            context_mask=torch.from_numpy(context_mask),
            unseen_mask=torch.from_numpy(unseen),
            user_type=torch.from_numpy(user_type_out),
            user_weights=None if weights is None else torch.from_numpy(weights),
            teacher_context_idx=None if t_idx is None else torch.from_numpy(t_idx),
            teacher_context_choice=None if t_choice is None else torch.from_numpy(t_choice),
            teacher_context_mask=None if t_mask is None else torch.from_numpy(t_mask),
        )

    def _draw_targets(self, rng: np.random.Generator, T: int) -> np.ndarray:
        """T distinct target rows: any rows, or prompt_group rows from each of T / prompt_group prompts."""
        g = self.cfg.prompt_group
        if g == 1:
            return rng.choice(self.target_pool, size=T, replace=False)
        chosen = rng.choice(len(self.prompt_rows), size=T // g, replace=False)
        return np.concatenate([rng.choice(self.prompt_rows[k], size=g, replace=False) for k in chosen])  # (T,)

    def _draw_outside(self, rng: np.random.Generator, exclude: np.ndarray, n: int) -> np.ndarray:
        """n distinct rows of the context pool that are not in `exclude` (a task's targets)."""
        k = min(len(self.context_pool), n + len(exclude))  # enough candidates even if all targets are drawn
        cand = rng.choice(self.context_pool, size=k, replace=False)
        cand = cand[~np.isin(cand, exclude)]
        if len(cand) < n:
            raise ValueError(f"only {len(cand)} context pairs outside this task's targets, need {n}")
        return cand[:n]

    def _draw_weights(self, rng: np.random.Generator, A: int) -> np.ndarray:
        if self.cfg.weight_prior == "dirichlet":
            return rng.dirichlet(np.full(A, self.cfg.dirichlet_alpha)).astype(np.float32)
        w = rng.standard_normal(A)
        return (w / np.linalg.norm(w)).astype(np.float32)

    def _continuous_choices(self, rng: np.random.Generator, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
        attrs = self.pairs.attributes[rows]  # (R, 2, A)
        delta = attrs[:, 1] @ w - attrs[:, 0] @ w  # (R,) utility of b minus a
        if self.cfg.choice_temperature > 0:
            p_b = 1.0 / (1.0 + np.exp(-delta / self.cfg.choice_temperature))
            return (rng.random(len(rows)) < p_b).astype(np.float32)
        return np.where(delta > 0, 1.0, np.where(delta < 0, 0.0, 0.5)).astype(np.float32)

    def fixed_batches(self, n_tasks: int, batch_size: int, offset: int = 1_000_000, **kw) -> list[TaskBatch]:
        """A fixed list of batches (validation sets): indices far from the training stream."""
        out, left, k = [], n_tasks, 0
        while left > 0:
            b = min(batch_size, left)
            out.append(self.sample(offset + k, b, **kw))
            left, k = left - b, k + 1
        return out
