"""Policy speed and memory: steered generation vs the plain base, batched sweeps, NP-DPO steps
with a cached vs recomputed reference, and peak memory of training vs inference.

    python benchmarks/policy.py [--base smollm2-135m-instruct] [--dtype bf16|fp32] [--tokens 48] [--repeats 3]

Every comparison is made in the same run, in interleaved rounds. RSS is measured in fresh
subprocesses (one for inference, one for training): after loading, and the peak of the workload. With a
GPU present it also runs on the GPU and adds generation throughput at batch 1 and 32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.basemodels import load_base  # noqa: E402
from core.data.pairs import pairs_from_records  # noqa: E402
from core.data.tasks import TaskConfig, TaskSampler  # noqa: E402
from core.policy import PolicyConfig, PolicyData, SteerablePolicy  # noqa: E402
from benchmarks.timing import timed, timed_many  # noqa: E402

PROMPT = "How can I get better sleep?"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _timed(fn, repeats: int, device: str) -> float:
    """Median seconds of fn over `repeats` calls after one warm-up."""
    return statistics.median(timed(fn, 1, repeats, device))


def build_policy(base: str, dtype: torch.dtype, device: str, **kw) -> SteerablePolicy:
    lm, tok, _ = load_base(base, dtype=dtype, device=device)
    cfg = PolicyConfig(base=base, d_in=384, d_z=32, lora_r=8, lora_alpha=16, **kw)
    pol = SteerablePolicy(cfg, lm, tok).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial adapters, as after training
        for n, p in pol.named_parameters():
            if p.requires_grad and ("lora_B" in n or n.startswith("film.")):
                p.copy_((0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return pol.eval()


def bench_generation(args, device: str) -> list[tuple[str, float, str]]:
    dtype = DTYPES[args.dtype]
    rows = []
    n = args.tokens
    plain, tok, _ = load_base(args.base, dtype=dtype, device=device)
    pol = build_policy(args.base, dtype, device)
    z = torch.randn(1, 32, generator=torch.Generator().manual_seed(1))
    x, am = pol._prompt_batch([PROMPT])

    def gen_plain():
        plain.generate(input_ids=x, attention_mask=am, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=pol.pad_id)

    def gen_steered(zz=z, prompts=(PROMPT,)):
        return lambda: pol.generate(list(prompts), zz, max_new_tokens=n, min_new_tokens=n)

    zs = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    t = timed_many({"plain": gen_plain, "steered": gen_steered(), "sweep": gen_steered(zs, [PROMPT] * 5)},
                    args.repeats, device)
    pol.merge_for_inference()
    t_merged = timed_many({"merged": gen_steered()}, args.repeats, device)["merged"]
    pol.lm.unmerge_adapter()
    rows.append(("plain base, batch 1", n / t["plain"], "tokens/s"))
    rows.append(("LoRA + FiLM (unmerged), batch 1", n / t["steered"], "tokens/s"))
    rows.append(("  overhead vs plain", 100 * (t["steered"] / t["plain"] - 1), "%"))
    rows.append(("LoRA merged + FiLM, batch 1", n / t_merged, "tokens/s"))
    rows.append(("  overhead vs plain", 100 * (t_merged / t["plain"] - 1), "%"))
    rows.append(("5-point sweep, one batched call", t["sweep"], "s"))
    rows.append(("  vs one generation", t["sweep"] / t["steered"], "x"))
    if device == "cuda":
        for b in (1, 32):
            zb = torch.randn(b, 32)
            t = _timed(gen_steered(zb, [PROMPT] * b), args.repeats, device)
            rows.append((f"steered throughput, batch {b}", b * n / t, "tokens/s"))
    return rows


def toy_text_pairs(n_prompts: int = 12):
    recs = []
    for i in range(n_prompts):
        p = f"Give me a tip about topic number {i}."
        short = f"Keep topic {i} simple."
        long = (f"Here is a fuller answer about topic {i}. Start small, practise a little every day, "
                f"and review what worked at the end of each week so you keep improving.")
        recs.append({"id": f"t{i}", "prompt": p, "a": short, "b": long, "choices": {"terse": 0, "thorough": 1},
                     "split": "train" if i < 10 else "val"})
    return pairs_from_records(recs, "bench")


def bench_training(args, device: str, variants=(True, False)) -> list[tuple[str, float, str]]:
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pairs = toy_text_pairs()
    emb = (torch.randn(len(pairs), 384), torch.randn(len(pairs), 384))
    pol = build_policy(args.base, dtype, device)
    pol.train()
    data = PolicyData(pol, pairs, emb)
    sampler = TaskSampler(pairs, TaskConfig(n_targets=4, max_context=3, min_context=1), "train", 0)
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-4)
    batch = sampler.sample(0, 2)
    data.ensure_reference(pol, batch.target_idx[batch.target_mask])

    def step(cached: bool):
        def run():
            inp = data.inputs(pol, batch, batch.target_mask, cached).to(device)
            loss, _ = pol(inp)
            opt.zero_grad()
            loss.backward()
            pol.film.set_factors(None)
            opt.step()
        return run

    names = {True: "cached", False: "recomputed"}
    t = timed_many({names[c]: step(c) for c in variants}, args.repeats, device)
    rows = [(f"NP-DPO step, 2 tasks x 4 pairs, {k} reference", v, "s") for k, v in t.items()]
    if len(rows) == 2:
        rows.append(("  cached / recomputed", t["cached"] / t["recomputed"], "x"))
    return rows


def peak_rss(mode: str, args) -> dict[str, float]:
    """RSS (MB) of a fresh process after loading the policy, and its peak while running `mode`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--base", args.base, "--dtype", args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(mode: str, args) -> None:
    pol = build_policy(args.base, torch.float32, "cpu")
    loaded = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    if mode == "inference":
        pol.generate([PROMPT], torch.zeros(1, 32), max_new_tokens=16)
    else:
        pairs = toy_text_pairs()
        data = PolicyData(pol, pairs, (torch.randn(len(pairs), 384), torch.randn(len(pairs), 384)))
        batch = TaskSampler(pairs, TaskConfig(n_targets=4, max_context=3, min_context=1), "train", 0).sample(0, 2)
        opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-4)
        pol.train()
        for _ in range(2):
            loss, _ = pol(data.inputs(pol, batch, batch.target_mask))
            opt.zero_grad()
            loss.backward()
            opt.step()
    storages = {}
    for t in list(pol.parameters()) + list(pol.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    print(json.dumps({"loaded_mb": loaded, "peak_mb": _rss_mb("VmHWM"), "weights_mb": sum(storages.values()) / 2**20}))


def table(title: str, rows: list[tuple[str, float, str]]) -> str:
    w = max(len(r[0]) for r in rows) + 2
    lines = [title, "-" * (w + 20)]
    lines += [f"{name:<{w}}{value:>12.3g}  {unit}" for name, value, unit in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per generation (forced)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=("inference", "training"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, base {args.base}, {args.dtype}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
        print()
        print(table(f"generation on {name}, {args.tokens} new tokens, greedy, median of {args.repeats}",
                    bench_generation(args, device)))
        print()
        print(table(f"training on {name} (fp32 on CPU, bf16 on GPU)", bench_training(args, device)))
        if device == "cuda":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB")
    if not args.skip_rss:
        inf, tr = peak_rss("inference", args), peak_rss("training", args)
        print()
        print(table("RSS, fp32, a fresh process each (base weights alone: 538 MB)", [
            ("all parameter storage in the training process", tr["weights_mb"], "MB"),
            ("after loading the policy", inf["loaded_mb"], "MB"),
            ("peak while generating 16 tokens", inf["peak_mb"], "MB"),
            ("peak while taking 2 NP-DPO steps", tr["peak_mb"], "MB"),
            ("  training peak - inference peak (activations)", tr["peak_mb"] - inf["peak_mb"], "MB")]))


if __name__ == "__main__":
    main()
