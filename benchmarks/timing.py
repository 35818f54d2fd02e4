"""Wall-clock timing shared by the benchmark scripts (CUDA work is synchronised around each call)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], warmup: int, repeats: int, device: str) -> list[float]:
    """Seconds of each of `repeats` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return ts


def timed_many(fns: dict[str, Callable[[], Any]], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each function after one warm-up, measured in interleaved rounds so drift
    hits all alike."""
    for fn in fns.values():
        fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            ts[k].extend(timed(fn, 0, 1, device))
    return {k: statistics.median(v) for k, v in ts.items()}
