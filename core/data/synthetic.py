"""Synthetic preference data from the paper, as PairSets in the JSONL contract.

- `one_d_pairs` (Ex. 4.1): scalar options y. Reward r(y) = y for y <= 0.5; above 0.5 it is
  2y for user type "up" (z* = 0) and 1 − y for "tent" (z* = 1). Deterministic choices. The
  domain is stated explicitly: U[0, 1]² as in the authors' code, U[−1, 1]² as in the paper.
  Half of the pairs conflict on U[0, 1]², so a user-blind model tops out at 75 %.
- `gaussian_pairs` (Ex. 4.3): options y = [h0, h1] ~ N(0, [[1, ρ], [ρ, 1]]), user types "h0"
  (r = h0) and "h1" (r = h1). The conflict rate is 1/2 − arcsin(ρ)/π and the Bayes error of
  identifying the type from one pair is E = 1/4 + arcsin(ρ)/(2π).
"""

from __future__ import annotations

import math

import numpy as np

from core.data.pairs import PairSet

ONE_D_TYPES = ("up", "tent")
GAUSS_TYPES = ("h0", "h1")


def one_d_reward(y: np.ndarray, user: int) -> np.ndarray:
    """r(y, z*) of Ex. 4.1 for user 0 ("up") or 1 ("tent"). y: any shape."""
    high = 2 * y if user == 0 else 1 - y
    return np.where(y <= 0.5, y, high)


def _split_labels(n: int, fractions: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    labels = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val), dtype="<U5")
    return labels[rng.permutation(n)]


def _choice(ra: np.ndarray, rb: np.ndarray) -> np.ndarray:
    return np.where(rb > ra, 1.0, np.where(rb < ra, 0.0, 0.5)).astype(np.float32)


def one_d_pairs(n: int = 20_000, domain: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> PairSet:
    """Ex. 4.1 pairs on U[lo, hi]². Options are 1-d numeric vectors."""
    lo, hi = domain
    if not hi > lo:
        raise ValueError(f"domain must have hi > lo, got {domain}")
    rng = np.random.default_rng(seed)
    y = rng.uniform(lo, hi, size=(n, 2)).astype(np.float32)  # (n, 2): options a, b
    choices = np.stack([_choice(one_d_reward(y[:, 0], u), one_d_reward(y[:, 1], u)) for u in (0, 1)], 1)  # (n, 2)
    return PairSet(
        ids=[f"s{seed}-{i:06d}" for i in range(n)], prompts=[None] * n,
        a=y[:, :1].copy(), b=y[:, 1:].copy(), user_types=list(ONE_D_TYPES), choices=choices,
        split=_split_labels(n, fractions, rng), source=f"synthetic-1d[{lo:g},{hi:g}]",
    )


def gaussian_pairs(n: int, rho: float, seed: int = 0,
                   fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)) -> PairSet:
    """Ex. 4.3 pairs: 2-d options ~ N(0, [[1, ρ], [ρ, 1]]); types "h0" and "h1"."""
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [-1, 1], got {rho}")
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, 2, 2))  # (n, option, 2)
    h0 = g[..., 0]
    h1 = rho * g[..., 0] + math.sqrt(max(0.0, 1 - rho * rho)) * g[..., 1]
    opts = np.stack([h0, h1], -1).astype(np.float32)  # (n, 2 options, 2 dims)
    choices = np.stack([_choice(opts[:, 0, k], opts[:, 1, k]) for k in (0, 1)], 1)  # (n, 2 types)
    return PairSet(
        ids=[f"g{seed}-{i:06d}" for i in range(n)], prompts=[None] * n,
        a=opts[:, 0].copy(), b=opts[:, 1].copy(), user_types=list(GAUSS_TYPES), choices=choices,
        split=_split_labels(n, fractions, rng), source=f"synthetic-gauss[rho={rho:g}]",
    )


def bayes_error_one_pair(rho: float) -> float:
    """Bayes error of identifying the user type from one context pair: 1/4 + arcsin(ρ)/(2π)."""
    return 0.25 + math.asin(rho) / (2 * math.pi)


def conflict_rate(rho: float) -> float:
    """Probability that the two Gaussian user types disagree on a pair: 1/2 − arcsin(ρ)/π."""
    return 0.5 - math.asin(rho) / math.pi
