"""GPU benchmark of an NP-DPO policy at Qwen2.5-0.5B size: training tokens/s and MFU, steered
generation tokens/s at batch 1, 8 and 32, and peak GPU memory of every measurement.

    python3 benchmarks/gpu.py --json $OUT/gpu.json                  # on the device (python3 holds torch)
    python benchmarks/gpu.py --tiny --device cpu --json /tmp/g.json  # a few seconds on a laptop CPU

The base is a *random* Qwen2 decoder with the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14
heads, 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings): nothing is downloaded, and
speed does not depend on the weights' values. The policy is the real `core.policy.SteerablePolicy`
(peft LoRA r=8 on q_proj/v_proj, FiLM on every block, the context encoder); its tokenizer is a
small BPE with a ChatML template (`core.tinylm`), so the token ids are synthetic.

Training runs the trainer's step (`core.train.train_policy`): `policy(DPOInputs)` (context
encoder -> z -> FiLM factors -> response log-probs -> DPO loss), zero_grad, backward, FiLM
factors cleared, grad-norm clipping, AdamW; the CPU-built batch moves to the device every step.
The workload is the trainer's default batch (4 tasks x 8 scored pairs = 64 sequences, context of
6 pairs), each sequence 128 prompt + 128 response tokens, fixed lengths (no padding). It is
measured for each precision (`amp`: fp32 weights under bf16 autocast, which is what core.train
does through accelerate on a GPU; `bf16`: bf16 base weights with fp32 adapters, what the demo
loads), gradient checkpointing off and on, and the reference log-probs cached (trainer default)
or recomputed in the step.

Generation is `policy.generate(prompts, z)` with one z per row, greedy, KV cache, LoRA unmerged
(the demo's path), a 64-token prompt and exactly 128 new tokens (the end of turn is suppressed
until then). tokens/s = batch x new tokens / wall time of the whole call (prefill included).

Every number is the median over timed repeats after untimed warm-up iterations. Peak memory is
`torch.cuda.max_memory_allocated()` since a reset just before the measurement's warm-up (so it
includes the weights); on a CPU it is the process's peak RSS over the measurement.

Model FLOPs (MFU = achieved model FLOP/s / peak dense bf16 FLOP/s). With T tokens in the step's
sequences, M scored (response) tokens, N_f = frozen matmul weights of the decoder blocks,
N_l = LoRA weights, V·d = the (tied, frozen) LM head (applied to scored positions only),
S = sequence length and A = causal attention (QK^T and AV), Σ over sequences of
2·n_layers·n_heads·head_dim·S·(S+1), per step:

    forward    2·N_f·T + 2·N_l·T +   A + 2·V·d·M
    backward   2·N_f·T + 4·N_l·T + 2·A + 2·V·d·M   (frozen weights: input gradient only, no weight gradient)
    reference  2·N_f·T           +   A + 2·V·d·M   (only when recomputed: a forward with adapters off)

so a LoRA step is about 4·N·T, not the 6·N·T of full fine-tuning. The encoder, FiLM, norms,
biases and the optimiser are left out (<0.1 %); so are the FLOPs that gradient checkpointing and
the chunked LM-head recompute spend again (model FLOPs, not hardware FLOPs: checkpointing lowers
MFU). `mfu_6n` in the JSON is the conventional 6·(N_f + N_l + V·d)·T over the same time, for
comparison with full-fine-tuning figures only: it overstates the work of this step.
Peak bf16 TFLOP/s come from `PEAK_BF16_TFLOPS` (vendor datasheets, dense, without structured
sparsity) matched on the GPU's name; `--peak-tflops X` overrides, and without a match MFU is null.

The full run is sized for about 2-3 minutes on an H100 (8 training measurements of 13 steps of
~29 model TFLOP, ~43 with the reference recomputed, then 12 generate calls of 128 steps; an
estimate, not yet timed on one) and an estimated 30-40 GB peak (amp without checkpointing).
A measurement that runs out of GPU memory is recorded with "error" and the run goes on.
`--tiny` (a 2-block Qwen2 of width 64) takes seconds on a CPU; tests/test_benchmarks.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.film import find_decoder_layers, unwrap  # noqa: E402
from core.policy import DPOInputs, PolicyConfig, Sequences, SteerablePolicy  # noqa: E402
from core.tinylm import train_tokenizer  # noqa: E402
from benchmarks.timing import timed  # noqa: E402

# Peak dense (no 2:4 sparsity) bf16 tensor-core TFLOP/s per GPU, from NVIDIA datasheets, at boost
# clock. First match on torch.cuda.get_device_name() wins, so specific names come first.
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    (r"\bGH200\b", 989.4, "GH200 (H100 SXM-class GPU)"),
    (r"\bB200\b", 2250.0, "B200"),
    (r"\bH200 NVL\b", 835.5, "H200 NVL"),
    (r"\bH200\b", 989.4, "H200 SXM"),
    (r"\bH100 NVL\b", 835.5, "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", 756.5, "H100 PCIe"),
    (r"\bH100\b", 989.4, "H100 SXM"),  # "NVIDIA H100 80GB HBM3"
    (r"\bA100\b", 312.0, "A100 (SXM or PCIe)"),
    (r"\bA10\b", 125.0, "A10"),  # not the A10G, whose figure NVIDIA does not publish: use --peak-tflops
    (r"\bL40S\b", 362.05, "L40S"),
    (r"\bL40\b", 181.05, "L40"),
    (r"\bL4\b", 121.0, "L4"),
    (r"\bRTX 4090\b", 165.2, "GeForce RTX 4090 (fp32 accumulate)"),
    (r"\bRTX A6000\b", 154.8, "RTX A6000"),
]

# Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), random init.
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)

# Workload presets; a CLI value that is not None overrides its preset field.
FULL_WORKLOAD = dict(tasks=4, pairs_per_task=8, context_pairs=6, prompt_tokens=128, response_tokens=128,
                     train_steps=10, warmup_steps=3, gen_prompt_tokens=64, new_tokens=128, gen_repeats=3,
                     gen_warmup=1)
TINY_WORKLOAD = dict(tasks=2, pairs_per_task=2, context_pairs=3, prompt_tokens=12, response_tokens=12,
                     train_steps=1, warmup_steps=1, gen_prompt_tokens=8, new_tokens=4, gen_repeats=1,
                     gen_warmup=1)

CORPUS = ["How do I get better sleep at night?", "Keep a regular schedule and a dark, cool room.",
          "Tell me about tea, maps, boats, rain and chess.", "Practise a little every day, then review it."]


PRECISIONS: dict[str, tuple[torch.dtype, bool]] = {  # name -> (weight dtype, bf16 autocast)
    "amp": (torch.float32, True),
    "bf16": (torch.bfloat16, False),
    "fp32": (torch.float32, False),
}


@dataclass
class BenchConfig:
    tiny: bool = False
    device: str = "auto"  # auto | cuda | cpu
    precisions: list[str] = field(default_factory=lambda: ["amp", "bf16"])  # training: amp | bf16 | fp32
    grad_ckpt: list[bool] = field(default_factory=lambda: [False, True])
    references: list[str] = field(default_factory=lambda: ["cached", "recompute"])
    gen_precision: str = "bf16"
    gen_batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    merge_lora: bool = False  # fold LoRA into the weights before generating (not the demo's default)
    skip_train: bool = False
    skip_generate: bool = False
    # workload (None: from the tiny or full preset)
    tasks: int | None = None  # B tasks (users) per step
    pairs_per_task: int | None = None  # scored target pairs per task: 2·B·pairs sequences
    context_pairs: int | None = None
    prompt_tokens: int | None = None
    response_tokens: int | None = None
    train_steps: int | None = None  # timed
    warmup_steps: int | None = None  # untimed
    gen_prompt_tokens: int | None = None
    new_tokens: int | None = None
    gen_repeats: int | None = None
    gen_warmup: int | None = None
    # policy
    lora_r: int = 8
    d_z: int = 32
    d_in: int = 384
    peak_tflops: float | None = None  # override of the datasheet table
    seed: int = 0

    def __post_init__(self) -> None:
        for p in [*self.precisions, self.gen_precision]:
            if p not in PRECISIONS:
                raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {p!r}")
        bad = [r for r in self.references if r not in ("cached", "recompute")]
        if bad:
            raise ValueError(f"reference must be 'cached' or 'recompute', got {bad}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device must be auto, cuda or cpu, got {self.device!r}")
        preset = TINY_WORKLOAD if self.tiny else FULL_WORKLOAD
        for k, v in preset.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if min(self.tasks, self.pairs_per_task, self.prompt_tokens, self.response_tokens, self.train_steps,
               self.gen_prompt_tokens, self.new_tokens, self.gen_repeats, *self.gen_batches, 1) < 1:
            raise ValueError("workload sizes, steps and batches must be >= 1")
        if self.context_pairs < 0 or self.warmup_steps < 0 or self.gen_warmup < 0:
            raise ValueError("context_pairs and warm-up counts must be >= 0")


# -- environment ---------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return name


def peak_bf16_tflops(gpu_name: str) -> tuple[float | None, str | None]:
    """(peak dense bf16 TFLOP/s, which table row) for a GPU name; (None, None) when unknown."""
    for pattern, tflops, label in PEAK_BF16_TFLOPS:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return tflops, label
    return None, None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str, cfg: BenchConfig) -> dict[str, Any]:
    import peft
    import transformers

    env: dict[str, Any] = {"device": device, "python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__,
                           "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu_name=torch.cuda.get_device_name(0), gpu_memory_gb=round(p.total_memory / 2**30, 1),
                   gpu_sm_count=p.multi_processor_count, gpu_capability=f"{p.major}.{p.minor}",
                   cudnn=torch.backends.cudnn.version(), driver=_driver_version(),
                   bf16_supported=torch.cuda.is_bf16_supported())
        peak, row = peak_bf16_tflops(env["gpu_name"])
    else:
        env.update(gpu_name=None, cpu=platform.processor() or platform.machine())
        peak, row = None, None
    if cfg.peak_tflops is not None:
        peak, row = cfg.peak_tflops, "--peak-tflops"
    env.update(peak_tflops=peak, peak_source=row)
    return env


def _rss_mb(name: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS


def peak_memory_mb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mb("VmHWM")


def free_memory(device: str, collect: bool = True) -> None:
    """Return cached GPU blocks so each measurement's peak starts from the live tensors."""
    if collect:
        gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# -- model ---------------------------------------------------------------------------------
def build_tokenizer():
    """A small byte-level BPE with a ChatML template: the token ids are synthetic anyway."""
    return train_tokenizer(CORPUS * 4, vocab_size=320)


def build_policy(cfg: BenchConfig, tok, precision: str, grad_ckpt: bool, device: str) -> SteerablePolicy:
    """The real SteerablePolicy around a random Qwen2 base (0.5B shape, or tiny), on `device`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    dtype, _ = PRECISIONS[precision]
    shape = dict(TINY, vocab_size=len(tok)) if cfg.tiny else QWEN25_05B
    qcfg = Qwen2Config(**shape, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    torch.manual_seed(cfg.seed)
    with torch.device(device):  # initialise on the device: a CPU init of 0.5B weights takes a while
        lm = AutoModelForCausalLM.from_config(qcfg, dtype=dtype).eval()
    pcfg = PolicyConfig(base="random-qwen2-0.5b" if not cfg.tiny else "random-qwen2-tiny", d_in=cfg.d_in,
                        d_z=cfg.d_z, lora_r=cfg.lora_r, lora_alpha=2.0 * cfg.lora_r,
                        max_prompt_tokens=max(cfg.prompt_tokens, cfg.gen_prompt_tokens),
                        max_response_tokens=cfg.response_tokens, gradient_checkpointing=grad_ckpt)
    pol = SteerablePolicy(pcfg, lm, tok).to(device)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.no_grad():  # non-trivial adapters, as after training (B and FiLM start at zero)
        for n, p in pol.named_parameters():
            if p.requires_grad and ("lora_B" in n or n.startswith("film.")):
                p.copy_((0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return pol


@dataclass
class ModelCounts:
    n_params: int  # every parameter of the policy (base, LoRA, FiLM, encoder)
    n_trainable: int
    frozen_matmul: int  # N_f: frozen Linear weights inside the decoder blocks
    lora: int  # N_l: LoRA weights (A and B)
    head: int  # V·d: LM head (tied to the embeddings, frozen)
    n_layers: int
    attn_width: int  # n_heads · head_dim
    weights_mb: float


def model_counts(pol: SteerablePolicy) -> ModelCounts:
    frozen = lora = 0
    for m in find_decoder_layers(pol.lm).modules():
        if isinstance(m, nn.Linear):
            if m.weight.requires_grad:
                lora += m.weight.numel()
            else:
                frozen += m.weight.numel()
    base = unwrap(pol.lm)
    c = base.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*pol.parameters(), *pol.buffers()]}
    return ModelCounts(n_params=sum(p.numel() for p in pol.parameters()),
                       n_trainable=sum(p.numel() for p in pol.parameters() if p.requires_grad),
                       frozen_matmul=frozen, lora=lora, head=base.get_output_embeddings().weight.numel(),
                       n_layers=c.num_hidden_layers, attn_width=c.num_attention_heads * head_dim,
                       weights_mb=sum(storages.values()) / 2**20)


@dataclass
class StepFlops:
    forward: float
    backward: float
    reference: float  # 0 when the reference log-probs are cached
    six_n: float  # the conventional 6·N·T, for comparison only

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.reference


def step_flops(mc: ModelCounts, n_seqs: int, seq_len: int, scored: int, recompute_reference: bool) -> StepFlops:
    """Model FLOPs of one NP-DPO step (see the module docstring for the accounting)."""
    T = n_seqs * seq_len
    attn = n_seqs * 2.0 * mc.n_layers * mc.attn_width * seq_len * (seq_len + 1)  # causal QK^T and AV, forward
    head = 2.0 * mc.head * scored
    fwd = 2.0 * mc.frozen_matmul * T + 2.0 * mc.lora * T + attn + head
    bwd = 2.0 * mc.frozen_matmul * T + 4.0 * mc.lora * T + 2.0 * attn + head
    ref = 2.0 * mc.frozen_matmul * T + attn + head if recompute_reference else 0.0
    return StepFlops(fwd, bwd, ref, 6.0 * (mc.frozen_matmul + mc.lora + mc.head) * T)


# -- measurements --------------------------------------------------------------------------
def _autocast(device: str, precision: str):
    on = PRECISIONS[precision][1]
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def make_inputs(cfg: BenchConfig, vocab: int) -> DPOInputs:
    """One step's batch on the CPU, as PolicyData.inputs builds it: B tasks, C context pairs, R = B·P
    scored pairs -> 2R fixed-length sequences (a rows, then b rows), random token ids."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    B, P, C = cfg.tasks, cfg.pairs_per_task, cfg.context_pairs
    R, Lp, Lr = B * P, cfg.prompt_tokens, cfg.response_tokens
    ids = torch.randint(vocab, (2 * R, Lp + Lr), generator=g)  # (2R, L)
    rmask = torch.zeros(2 * R, Lp + Lr, dtype=torch.bool)
    rmask[:, Lp:] = True
    seqs = Sequences(ids, torch.ones_like(ids), rmask)
    return DPOInputs(context_a=torch.randn(B, C, cfg.d_in, generator=g),
                     context_b=torch.randn(B, C, cfg.d_in, generator=g),
                     context_choice=torch.randint(2, (B, C), generator=g).float(),
                     context_mask=torch.ones(B, C, dtype=torch.bool),
                     row_task=torch.arange(B).repeat_interleave(P),
                     choice=torch.randint(2, (R,), generator=g).float(), seqs=seqs, ref=None)


def bench_train(cfg: BenchConfig, pol: SteerablePolicy, mc: ModelCounts, precision: str, grad_ckpt: bool,
                reference: str, device: str, peak_tflops: float | None) -> dict[str, Any]:
    """Tokens/s, MFU and peak memory of the trainer's NP-DPO step."""
    base = make_inputs(cfg, unwrap(pol.lm).config.vocab_size)
    n_seqs, seq_len = base.seqs.input_ids.shape
    scored = int(base.seqs.response_mask[:, 1:].sum())
    row: dict[str, Any] = {"name": f"{precision}, grad ckpt {'on' if grad_ckpt else 'off'}, {reference} ref",
                           "precision": precision, "grad_ckpt": grad_ckpt, "reference": reference,
                           "sequences": n_seqs, "seq_len": seq_len, "tokens_per_step": n_seqs * seq_len,
                           "scored_tokens_per_step": scored, "warmup_steps": cfg.warmup_steps,
                           "timed_steps": cfg.train_steps}
    opt = torch.optim.AdamW(pol.trainable_parameters(), lr=1e-5)
    free_memory(device, collect=device == "cuda")
    reset_peak_memory(device)
    try:
        if reference == "cached":  # PolicyData.ensure_reference: once per response, outside the step
            with _autocast(device, precision):
                base.ref = pol.reference_logprobs(base.seqs.to(device)).float().cpu()  # (2R,)
        pol.train()

        def step() -> None:
            inp = base.to(device)
            with _autocast(device, precision):
                loss, _ = pol(inp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            pol.film.set_factors(None)
            torch.nn.utils.clip_grad_norm_(pol.trainable_parameters(), 1.0)
            opt.step()

        ts = timed(step, cfg.warmup_steps, cfg.train_steps, device)
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        row.update(error="out of memory", peak_mem_mb=peak_memory_mb(device))
        return row
    finally:
        pol.film.set_factors(None)
        opt.zero_grad(set_to_none=True)
        del opt
        pol.eval()
    s = statistics.median(ts)
    fl = step_flops(mc, n_seqs, seq_len, scored, reference == "recompute")
    row.update(step_s=s, step_s_mean=statistics.fmean(ts), tokens_per_s=n_seqs * seq_len / s,
               flops_per_step=fl.total, achieved_tflops=fl.total / s / 1e12,
               mfu=None if peak_tflops is None else fl.total / s / (peak_tflops * 1e12),
               mfu_6n=None if peak_tflops is None else fl.six_n / s / (peak_tflops * 1e12),
               peak_mem_mb=peak_memory_mb(device))
    return row


def gen_prompt(pol: SteerablePolicy, n_tokens: int) -> str:
    """A prompt whose chat-rendered ids, kept to their last n_tokens, are exactly n_tokens long."""
    text = CORPUS[0]
    while len(pol.chat.prompt_ids(text, 10**9)) < n_tokens:
        text = text + " " + " ".join(CORPUS)
    if len(pol.chat.prompt_ids(text, n_tokens)) != n_tokens:
        raise AssertionError("could not build a prompt of the requested length")
    return text


def bench_generate(cfg: BenchConfig, pol: SteerablePolicy, precision: str, device: str) -> list[dict[str, Any]]:
    """Steered generation tokens/s and peak memory at each batch size (one z per row)."""
    rows = []
    pol.cfg.max_prompt_tokens = cfg.gen_prompt_tokens  # the prompt is cut to exactly this many tokens
    prompt = gen_prompt(pol, cfg.gen_prompt_tokens)
    if cfg.merge_lora:
        pol.merge_for_inference()
    n = cfg.new_tokens
    for b in cfg.gen_batches:
        z = torch.randn(b, cfg.d_z, generator=torch.Generator().manual_seed(cfg.seed + b))  # (b, d_z)
        row: dict[str, Any] = {"name": f"steered generation, batch {b}", "precision": precision, "batch": b,
                               "prompt_tokens": cfg.gen_prompt_tokens, "new_tokens": n,
                               "lora_merged": cfg.merge_lora, "warmup_calls": cfg.gen_warmup,
                               "timed_calls": cfg.gen_repeats}
        got: list[list[int]] = []

        def call() -> None:
            with _autocast(device, precision):
                got[:] = pol.generate([prompt] * b, z, max_new_tokens=n, min_new_tokens=n, return_tokens=True)

        free_memory(device, collect=device == "cuda")
        reset_peak_memory(device)
        try:
            ts = timed(call, cfg.gen_warmup, cfg.gen_repeats, device)
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            row.update(error="out of memory", peak_mem_mb=peak_memory_mb(device))
            rows.append(row)
            continue
        if [len(r) for r in got] != [n] * b:
            raise AssertionError(f"expected {n} new tokens per row, got {[len(r) for r in got]}")
        s = statistics.median(ts)
        row.update(call_s=s, tokens_per_s=b * n / s, ms_per_step=1e3 * s / n, peak_mem_mb=peak_memory_mb(device))
        rows.append(row)
    if cfg.merge_lora:
        pol.lm.unmerge_adapter()
    return rows


# -- report --------------------------------------------------------------------------------
def _fmt(v: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if v is None:
        return "-"
    return format(v * scale, spec) + suffix


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(c if i >= len(w) else c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                         for i, c in enumerate(cells))

    return "\n".join([line(headers), "  ".join("-" * x for x in w), *(line(r) for r in rows)])


def report(res: dict[str, Any]) -> str:
    env, m = res["env"], res["model"]
    where = env["gpu_name"] or f"CPU ({env['cpu_threads']} threads)"
    out = [f"{res['model_name']} on {where}: torch {env['torch']}, CUDA {env['cuda']}, transformers "
           f"{env['transformers']}, peft {env['peft']}; peak {_fmt(env['peak_tflops'], '.4g')} TFLOP/s bf16 "
           f"({env['peak_source'] or 'unknown: pass --peak-tflops'})",
           f"policy: {m['n_params'] / 1e6:.1f} M parameters, {m['n_trainable'] / 1e6:.2f} M trainable "
           f"(LoRA {m['lora'] / 1e6:.3g} M); frozen block matmuls {m['frozen_matmul'] / 1e6:.1f} M, head "
           f"{m['head'] / 1e6:.1f} M"]
    if res["train"]:
        t0 = res["train"][0]
        out += ["", f"NP-DPO training step: {t0['sequences']} sequences x {t0['seq_len']} tokens, median of "
                    f"{t0['timed_steps']} after {t0['warmup_steps']} warm-up"]
        out.append(format_table(
            ["config", "step ms", "tokens/s", "TFLOP/s", "MFU", "MFU(6N)", "peak MB"],
            [[r["name"], _fmt(r.get("step_s"), ".1f", 1e3), _fmt(r.get("tokens_per_s"), ",.0f"),
              _fmt(r.get("achieved_tflops"), ".3g"), _fmt(r.get("mfu"), ".2f", 100, "%"),
              _fmt(r.get("mfu_6n"), ".2f", 100, "%"), _fmt(r.get("peak_mem_mb"), ",.0f")]
             + ([r["error"]] if "error" in r else []) for r in res["train"]]))
    if res["generate"]:
        g0 = res["generate"][0]
        out += ["", f"steered generation ({g0['precision']}, KV cache, one z per row): {g0['prompt_tokens']}-token "
                    f"prompt, {g0['new_tokens']} new tokens, median of {g0['timed_calls']}"]
        out.append(format_table(
            ["batch", "s/call", "ms/step", "tokens/s", "peak MB"],
            [[str(r["batch"]), _fmt(r.get("call_s"), ".3f"), _fmt(r.get("ms_per_step"), ".1f"),
              _fmt(r.get("tokens_per_s"), ",.1f"), _fmt(r.get("peak_mem_mb"), ",.0f")]
             + ([r["error"]] if "error" in r else []) for r in res["generate"]]))
    return "\n".join(out)


# -- driver --------------------------------------------------------------------------------
def run(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every measurement of `cfg`, as a JSON-able dict (see `report`)."""
    device = resolve_device(cfg.device)
    threads = torch.get_num_threads()
    if cfg.tiny and device == "cpu":  # tiny shapes gain nothing from threads, and a busy CPU makes them spin
        torch.set_num_threads(1)
    try:
        return _run(cfg, device, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig, device: str, log: Callable[[str], None]) -> dict[str, Any]:
    env = environment(device, cfg)
    tok = build_tokenizer()
    res: dict[str, Any] = {"benchmark": "benchmarks/gpu.py",
                           "model_name": "tiny random Qwen2" if cfg.tiny else "random Qwen2 (Qwen2.5-0.5B shape)",
                           "config": asdict(cfg), "env": env, "model": None,
                           "flops_formula": {
                               "forward": "2*N_f*T + 2*N_l*T + A + 2*V*d*M",
                               "backward": "2*N_f*T + 4*N_l*T + 2*A + 2*V*d*M",
                               "reference_if_recomputed": "2*N_f*T + A + 2*V*d*M",
                               "A": "sum over sequences of 2*n_layers*n_heads*head_dim*S*(S+1) (causal)",
                               "mfu": "(forward + backward + reference) / step_s / peak",
                               "mfu_6n": "6*(N_f + N_l + V*d)*T / step_s / peak (full fine-tuning convention)",
                               "excluded": "encoder, FiLM, norms, biases, optimiser, recomputation"},
                           "train": [], "generate": []}
    builds = [(p, g) for p in cfg.precisions for g in cfg.grad_ckpt] if not cfg.skip_train else []
    gen_done = cfg.skip_generate or not cfg.gen_batches

    def measure_generation(pol: SteerablePolicy) -> None:
        log(f"generating: {cfg.gen_precision}, batches {cfg.gen_batches}")
        res["generate"] = bench_generate(cfg, pol, cfg.gen_precision, device)

    for precision, gck in builds:
        log(f"building the policy: {precision}, gradient checkpointing {'on' if gck else 'off'}")
        pol = build_policy(cfg, tok, precision, gck, device)
        mc = model_counts(pol)
        if res["model"] is None:
            res["model"] = asdict(mc)
        # The table's peaks are bf16 ones: an fp32 run gets an MFU only against an explicit --peak-tflops.
        peak = env["peak_tflops"] if precision != "fp32" or cfg.peak_tflops is not None else None
        for reference in cfg.references:
            row = bench_train(cfg, pol, mc, precision, gck, reference, device, peak)
            log(f"  {row['name']}: {_fmt(row.get('tokens_per_s'), ',.0f')} tokens/s {row.get('error', '')}")
            res["train"].append(row)
        if not gen_done and precision == cfg.gen_precision and not gck:
            measure_generation(pol)
            gen_done = True
        del pol
        free_memory(device)
    if not gen_done:
        log(f"building the policy: {cfg.gen_precision} for generation")
        pol = build_policy(cfg, tok, cfg.gen_precision, False, device)
        if res["model"] is None:
            res["model"] = asdict(model_counts(pol))
        measure_generation(pol)
        del pol
        free_memory(device)
    return res


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda s: [kind(x.strip()) for x in s.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, Path | None]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random config and workload (CPU, seconds)")
    ap.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    ap.add_argument("--precision", type=_csv(str), default=["amp", "bf16"],
                    help="training precisions, comma-separated: amp (fp32 weights + bf16 autocast, as core.train), "
                         "bf16 (bf16 base weights), fp32 [amp,bf16]")
    ap.add_argument("--grad-ckpt", type=_csv(str), default=["off", "on"], help="gradient checkpointing: off,on [both]")
    ap.add_argument("--reference", type=_csv(str), default=["cached", "recompute"],
                    help="reference log-probs: cached (trainer default), recompute [both]")
    ap.add_argument("--gen-precision", default="bf16", choices=sorted(PRECISIONS))
    ap.add_argument("--gen-batches", type=_csv(int), default=[1, 8, 32])
    ap.add_argument("--merge-lora", action="store_true", help="merge LoRA into the weights before generating")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    for name in FULL_WORKLOAD:
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help=f"[{FULL_WORKLOAD[name]}; tiny {TINY_WORKLOAD[name]}]")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU (overrides the table)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    a = ap.parse_args(argv)
    onoff = {"off": False, "on": True}
    bad = [g for g in a.grad_ckpt if g not in onoff]
    if bad:
        ap.error(f"--grad-ckpt takes off and/or on, got {bad}")
    try:
        cfg = BenchConfig(tiny=a.tiny, device=a.device, precisions=a.precision,
                          grad_ckpt=[onoff[g] for g in a.grad_ckpt], references=a.reference,
                          gen_precision=a.gen_precision, gen_batches=a.gen_batches, merge_lora=a.merge_lora,
                          skip_train=a.skip_train, skip_generate=a.skip_generate, lora_r=a.lora_r,
                          peak_tflops=a.peak_tflops, seed=a.seed,
                          **{k: getattr(a, k) for k in FULL_WORKLOAD})
    except ValueError as e:
        ap.error(str(e))
    return cfg, a.json


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cfg, out = parse_args(argv)
    t = time.perf_counter()
    res = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    res["wall_s"] = time.perf_counter() - t
    print(report(res))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2, allow_nan=True) + "\n")
        print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
