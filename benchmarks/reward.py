"""Reward-model speed on this machine: one posterior update (what a click costs), a
prediction for the next pair, and a training step, for each model. Prints a table.

    python benchmarks/reward.py [--d-in 384] [--threads 2]

--d-in 384 matches the MiniLM sentence embeddings a text demo would use; 1 matches the
synthetic task. Latency budget for a click (posterior + prediction): p95 <= 100 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.reward import PairFeatures, PreferenceModel, config_from_dict  # noqa: E402


def feats(B: int, T: int, C: int, d: int) -> PairFeatures:
    r = torch.randn
    return PairFeatures(r(B, T, d), r(B, T, d), torch.randint(0, 2, (B, T)).float(), torch.ones(B, T, dtype=torch.bool),
                        torch.ones(B, T, dtype=torch.bool), r(B, C, d), r(B, C, d),
                        torch.randint(0, 2, (B, C)).float(), torch.ones(B, C, dtype=torch.bool))


def timeit(fn, n: int) -> list[float]:
    fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    return out


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-in", type=int, default=384)
    ap.add_argument("--d-hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, d_in={args.d_in}, d_hidden={args.d_hidden}")
    head = f"{'model':<15}{'N_C':>5}{'click p50 ms':>14}{'click p95 ms':>14}{'train step ms (64 tasks x 20)':>32}"
    print(head)
    print("-" * len(head))
    for name in ("btl", "dpl", "np-btl", "np-btl-latent"):
        torch.manual_seed(0)
        m = PreferenceModel(config_from_dict({"model": name, "d_in": args.d_in, "d_hidden": args.d_hidden}))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        fb = feats(64, 20, 10, args.d_in)

        def step() -> None:
            loss, _ = m.loss(fb)
            opt.zero_grad()
            loss.backward()
            opt.step()

        train_ms = statistics.median(timeit(step, max(10, args.repeats // 5)))
        m.eval()
        for n_c in (1, 10, 50):
            f = feats(1, 1, n_c, args.d_in)  # one user: encode their clicks, predict the next pair

            @torch.no_grad()
            def click() -> None:
                m.predict(f)

            t = timeit(click, args.repeats)
            print(f"{name:<15}{n_c:>5}{statistics.median(t):>14.2f}{p95(t):>14.2f}{train_ms:>32.1f}")


if __name__ == "__main__":
    main()
