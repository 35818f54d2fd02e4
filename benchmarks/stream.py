"""Steered streaming speed at batch 1, the way the demo streams one answer: time to the first
token and tokens/s after it, per dtype, for a policy on a given base (LoRA merged + FiLM, with
the non-trivial random adapters of benchmarks/policy.py's `build_policy`).

    PYTHONPATH=. python benchmarks/stream.py [--base smollm2-135m-instruct] [--dtypes fp32 bf16]
        [--threads 1] [--tokens 128] [--repeats 3] [--repetition-penalty 1.1] [--json OUT]

Budget (DESIGN.md): ≥ 25 tokens/s of steered streaming for the SmolLM2 bundle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.policy import DTYPES, PROMPT, build_policy  # noqa: E402


def measure(base: str, dtype: str, tokens: int, repeats: int, repetition_penalty: float = 1.0) -> dict[str, float]:
    policy = build_policy(base, DTYPES[dtype], "cpu")
    policy.merge_for_inference()
    z = torch.randn(1, policy.cfg.d_z, generator=torch.Generator().manual_seed(1))
    ttft, rate = [], []
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        first = None
        n = 0
        it = policy.stream([PROMPT], z, max_new_tokens=tokens, min_new_tokens=tokens, repetition_penalty=repetition_penalty)
        for n, _texts in enumerate(it, 1):
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        ttft.append(first - t0)
        rate.append((n - 1) / max(end - first, 1e-9))
    return {"ttft_ms": 1000 * statistics.median(ttft[1:]), "tokens_per_s": statistics.median(rate[1:]),
            "tokens_per_s_min": min(rate[1:]), "tokens": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct", help="core.basemodels spec or a local folder")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the demo's default is 1)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per answer (forced)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="decode as a bundle with this penalty does (persona-smol: 1.1); 1 = none")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {d: measure(args.base, d, args.tokens, args.repeats, args.repetition_penalty) for d in args.dtypes}
    from demo.handlers import cpu_has_native_bf16

    cpu = {"capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16()}
    print(f"steered streaming, batch 1, {args.base}, {args.threads} thread(s), {args.tokens} tokens, "
          f"repetition penalty {args.repetition_penalty}, median of {args.repeats}; "
          f"CPU {cpu['capability']}, native bf16: {cpu['native_bf16']} "
          "(the demo loads SmolLM2 in bf16 only then)")
    print("| dtype | time to first token | tokens/s (min) | budget |\n|---|---|---|---|")
    for d, r in rows.items():
        print(f"| {d} | {r['ttft_ms']:.0f} ms | {r['tokens_per_s']:.1f} ({r['tokens_per_s_min']:.1f}) | ≥ 25 (SmolLM2) |")
    if args.json:
        args.json.write_text(json.dumps({"base": args.base, "threads": args.threads, "repetition_penalty": args.repetition_penalty,
                                              "cpu": cpu, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
