"""SteerablePolicy: a causal LM + peft LoRA + FiLM(z) + the context encoder (NP-DPO).

- The LM's weights stay frozen; LoRA (rank, alpha, targets configurable), FiLM and the
  context encoder train. The DPO baseline is the same class with `conditioned=False`: no
  encoder, no FiLM, identical LoRA and optimiser.
- The reference policy is the same modules with LoRA and FiLM switched off
  (`policy.reference()`), never a copy of the weights.
- Sequence log-probs are response-only with exact spans: the prompt is rendered with the
  chat template's generation prompt (`add_generation_prompt=True`) and tokenised on its own;
  the response is followed by the template's end-of-turn marker, and every response token,
  that marker included, is scored. The authors' code scored the prompt instead (paper era)
  or skipped two response tokens (later).
- `generate(prompts, z)` takes a different z per row (a continuum sweep is one call), stops
  at the end of turn, and `stream()` yields the growing texts of every row token by token.

Implicit reward: r(y) = β·log π(y | x, z) / π_ref(y | x); logit = r(b) − r(a) (1 = b preferred).
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from core.embed import TEXT_EMBEDDERS
from core.encoder import ContextEncoder, EncoderConfig, Gaussian
from core.film import FiLM, FiLMConfig, find_decoder_layers, hidden_size, unwrap
from core.losses import btl_nll

DEFAULT_LORA_TARGETS = {"gpt2": ["c_attn"]}  # everything else in core.film.LAYER_PATHS: q_proj, v_proj


@dataclass
class PolicyConfig:
    base: str = "smollm2-135m-instruct"  # base model spec (core.basemodels), or "bundled"
    conditioned: bool = True  # NP-DPO (encoder + FiLM); False = the DPO baseline
    d_in: int = 384  # width of the context option embeddings (set from the embedder)
    embedder: str = "minilm"  # minilm | minilm+style | style (core.embed) | base (the LM itself, adapters and FiLM off)
    d_z: int = 32
    encoder: EncoderConfig | None = None  # None: built from d_in and d_z
    film_layers: list[int] | None = None  # None = every block
    film_final_norm: bool = False  # FiLM also on the final norm's output: a z-dependent bias on every logit
    film_hidden: int = 0  # > 0: FiLM's factors get a hidden layer of this width (core.film.FiLMConfig.generator_hidden)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # None: q_proj, v_proj (c_attn for GPT-2)
    lora_gates: bool = False  # NP-DPO: z also gates LoRA's rank components (core.film.FiLM); no merging
    lora_gate_init_std: float = 0.0  # core.film.FiLMConfig.gate_init_std
    beta: float = 0.05
    max_prompt_tokens: int = 256  # longer prompts keep their last tokens
    max_response_tokens: int = 256  # longer responses keep their first tokens (and lose the end marker)
    cache_reference: bool = True  # reference log-probs computed once per response
    gradient_checkpointing: bool = False
    # > 0: score a batch's sequences (training and evaluation) in length-sorted groups of this many
    # rows, so short answers are not padded to the longest one (the same log-probs, less compute). Off
    # (0) under gradient checkpointing, whose recomputation needs one FiLM state for the whole batch.
    length_group_rows: int = 0
    freeze_encoder: bool = False  # e.g. after a warm start from an NP-BTL bundle
    sft_weight: float = 0.0  # > 0 adds λ·(per-token NLL of the chosen response | z) to the DPO loss
    # NP-DPO: > 0 trains on (1 − w)·click + w·p_teacher(b ≻ a | context) instead of the click alone,
    # p_teacher from an NP-BTL reward model given the same context (train_policy's `teacher`): a
    # graded target that says how sure a user with this context would be, not one noisy draw
    teacher_weight: float = 0.0
    # NP-DPO with a teacher: besides each target pair, every other pair of distinct responses to one
    # prompt within a task, targeted at the teacher's p(b ≻ a | context) (no extra LM passes: the
    # same sequences' log-ratios). Only adds much with targets grouped by prompt (TaskConfig.prompt_group).
    teacher_all_pairs: bool = False
    # Length-normalised implicit reward: β·L̄·(mean per-token log-ratio) instead of β·(sum). The sum
    # lets a policy win on every pair with a longer rejected answer by lowering all log-probs a
    # little, a bias toward short answers that a user's z then has to fight; L̄ keeps β's scale.
    length_normalize: bool = False
    length_scale: float = 64.0  # L̄, in response tokens
    # The normaliser is (n / L̄)^length_power: 1 = the mean per-token log-ratio (times L̄), 0 = the
    # sum; in between, a longer answer keeps part of the sum's weight.
    length_power: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        if self.conditioned and self.encoder is None:
            self.encoder = EncoderConfig(d_in=self.d_in, d_z=self.d_z)
        if self.conditioned and (self.encoder.d_in != self.d_in or self.encoder.d_z != self.d_z):
            raise ValueError(f"encoder (d_in {self.encoder.d_in}, d_z {self.encoder.d_z}) does not match the "
                             f"policy (d_in {self.d_in}, d_z {self.d_z})")
        if self.embedder not in (*TEXT_EMBEDDERS, "base"):
            raise ValueError(f"embedder must be {', '.join(TEXT_EMBEDDERS)} or base, got {self.embedder!r}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.film_final_norm and not self.conditioned:
            raise ValueError("film_final_norm needs a conditioned policy (NP-DPO): the DPO baseline has no z")
        if self.film_hidden and not self.conditioned:
            raise ValueError("film_hidden needs a conditioned policy (NP-DPO): the DPO baseline has no z")
        if self.film_hidden < 0:
            raise ValueError(f"film_hidden must be >= 0, got {self.film_hidden}")
        if self.lora_gates and not self.conditioned:
            raise ValueError("lora_gates needs a conditioned policy (NP-DPO): the DPO baseline has no z")
        if not 0 <= self.length_power <= 1:
            raise ValueError(f"length_power must be in [0, 1], got {self.length_power}")
        if self.length_group_rows < 0:
            raise ValueError(f"length_group_rows must be >= 0, got {self.length_group_rows}")
        if not 0 <= self.teacher_weight <= 1:
            raise ValueError(f"teacher_weight must be in [0, 1], got {self.teacher_weight}")
        if self.teacher_all_pairs and not (self.conditioned and self.teacher_weight > 0):
            raise ValueError("teacher_all_pairs needs NP-DPO with a teacher (teacher_weight > 0): only the teacher "
                             "can label pairs that nobody clicked on")
        if self.teacher_weight and not self.conditioned:
            raise ValueError("teacher_weight needs a conditioned policy (NP-DPO): the teacher reads the user's context")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PolicyConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown policy option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


class ChatFormat:
    """Renders prompts and responses with a tokenizer's chat template and finds exact spans."""

    PROBE = "xq7respx"
    PROMPT_MEMO = 4096  # rendered prompts kept by prompt_ids

    def __init__(self, tok) -> None:
        self.tok = tok
        self._prompt_memo: dict[tuple[str, int], tuple[int, ...]] = {}
        self.has_template = bool(getattr(tok, "chat_template", None))
        if self.has_template:
            p = self.prompt_text("hi")
            full = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": self.PROBE}], tokenize=False)
            if not full.startswith(p) or self.PROBE not in full[len(p):]:
                raise ValueError("chat template: a rendered conversation does not start with the rendered "
                                 "generation prompt, so response spans can't be found exactly")
            rest = full[len(p):]
            i = rest.index(self.PROBE)
            self.response_prefix = rest[:i]  # e.g. an empty think block the model must also write
            self.end = rest[i + len(self.PROBE):].rstrip() or (tok.eos_token or "")
        else:
            self.response_prefix, self.end = "", tok.eos_token or ""
        if not self.end:
            raise ValueError("tokenizer has neither a chat template end-of-turn marker nor an eos token")
        end_ids = tok(self.end, add_special_tokens=False).input_ids
        stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        if len(end_ids) == 1:
            stops.add(end_ids[0])
        self.stop_ids = sorted(stops)

    def prompt_text(self, prompt: str) -> str:
        if self.has_template:
            return self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
        return f"User: {prompt}\nAssistant:"

    def response_text(self, response: str) -> str:
        r = response.strip()
        return self.response_prefix + (r if self.has_template else " " + r) + self.end

    def prompt_ids(self, prompt: str, max_tokens: int) -> list[int]:
        # A pair set or corpus repeats each prompt for many answers, and rendering the chat template
        # is the slow part: each (prompt, max_tokens) is rendered once (a bounded memo; a fresh list out).
        key = (prompt, max_tokens)
        ids = self._prompt_memo.get(key)
        if ids is None:
            ids = tuple(self.tok(self.prompt_text(prompt), add_special_tokens=not self.has_template).input_ids[-max_tokens:])
            if len(self._prompt_memo) >= self.PROMPT_MEMO:
                self._prompt_memo.clear()
            self._prompt_memo[key] = ids
        return list(ids)

    def response_ids(self, response: str, max_tokens: int) -> list[int]:
        return self.tok(self.response_text(response), add_special_tokens=False).input_ids[:max_tokens]

    def responses_ids(self, responses: Sequence[str], max_tokens: int) -> list[list[int]]:
        """response_ids of many responses in one batched tokenizer call (the same ids, far fewer calls)."""
        if not responses:
            return []
        enc = self.tok([self.response_text(r) for r in responses], add_special_tokens=False).input_ids
        return [ids[:max_tokens] for ids in enc]


@dataclass
class Sequences:
    """Right-padded prompt+response token rows. N rows, L positions."""

    input_ids: torch.Tensor  # (N, L) long
    attention_mask: torch.Tensor  # (N, L) long
    response_mask: torch.Tensor  # (N, L) bool: positions holding response tokens (scored)

    def to(self, device) -> "Sequences":
        return Sequences(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Sequences:
    """(prompt_ids, response_ids) per row -> right-padded Sequences."""
    L = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # (N, L)
    am = torch.zeros((len(rows), L), dtype=torch.long)
    rm = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        am[i, :len(p) + len(r)] = 1
        rm[i, len(p):len(p) + len(r)] = True
    return Sequences(ids, am, rm)


@dataclass
class DPOInputs:
    """One NP-DPO step. B tasks, C context slots, R scored target pairs (rows of 2R sequences: a's then b's)."""

    context_a: torch.Tensor | None  # (B, C, d)
    context_b: torch.Tensor | None  # (B, C, d)
    context_choice: torch.Tensor | None  # (B, C)
    context_mask: torch.Tensor | None  # (B, C) bool
    row_task: torch.Tensor  # (R,) long: the task of each target pair
    choice: torch.Tensor  # (R,) float, 1 = b preferred
    seqs: Sequences  # 2R rows: a responses, then b responses
    ref: torch.Tensor | None  # (2R,) reference log-probs, or None to compute them in forward
    # (R,) the loss's target P(b preferred) when it is not the click itself (a teacher's blend,
    # PolicyConfig.teacher_weight); the accuracy still counts against the click
    target: torch.Tensor | None = None
    # Extra pairs of the same 2R sequences (PolicyConfig.teacher_all_pairs): E pairs of rows
    # (cross_a[e], cross_b[e]) with the loss's target P(cross_b ≻ cross_a), (E,) each
    cross_a: torch.Tensor | None = None
    cross_b: torch.Tensor | None = None
    cross_target: torch.Tensor | None = None

    def to(self, device) -> "DPOInputs":
        def mv(x):
            return None if x is None else x.to(device)
        return DPOInputs(mv(self.context_a), mv(self.context_b), mv(self.context_choice), mv(self.context_mask),
                         self.row_task.to(device), self.choice.to(device), self.seqs.to(device), mv(self.ref),
                         mv(self.target), mv(self.cross_a), mv(self.cross_b), mv(self.cross_target))


class BatchStreamer:
    """A `TextIteratorStreamer`-style streamer for a whole batch: iterating yields the list of
    every row's text so far after each generated token; rows stop growing at their end of turn."""

    def __init__(self, tok, batch_size: int, stop_ids: Sequence[int], timeout: float | None = 120.0) -> None:
        self.tok, self.stop_ids, self.timeout = tok, set(stop_ids), timeout
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.q: queue.Queue = queue.Queue()
        self._prompt_seen = False
        self.error: BaseException | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first sends the prompt
            self._prompt_seen = True
            return
        for i, t in enumerate(value.reshape(len(self.tokens), -1)[:, -1].tolist()):
            if self.done[i]:
                continue
            if t in self.stop_ids:
                self.done[i] = True
            else:
                self.tokens[i].append(t)
        self.q.put(self.texts())

    def texts(self) -> list[str]:
        return [self.tok.decode(t, skip_special_tokens=True) for t in self.tokens]

    def end(self) -> None:
        self.q.put(None)

    def fail(self, e: BaseException) -> None:
        self.error = e
        self.q.put(None)

    def __iter__(self) -> Iterator[list[str]]:
        while True:
            item = self.q.get(timeout=self.timeout)
            if item is None:
                if self.error is not None:
                    raise self.error
                return
            yield item


def disable_dropout(model: nn.Module) -> None:
    """Switch off every dropout of a frozen base, in train mode too.

    DPO compares log π with log π_ref of the same weights: with dropout on, both are random
    draws (and the cached reference is one frozen draw), which adds noise to every log-ratio.
    Covers nn.Dropout modules (GPT-2's attn/resid/embd), the float `attention_dropout` that
    Llama-style attention passes to SDPA, and the config fields that rebuild them.
    """
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        for key, value in list(cfg.to_dict().items()):
            if isinstance(value, float) and (key.endswith("dropout") or key.endswith("pdrop")):
                setattr(cfg, key, 0.0)


class SteerablePolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig, lm: nn.Module, tokenizer) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.chat = ChatFormat(tokenizer)
        find_decoder_layers(lm)  # fail early, with the supported list, on an unknown family
        model_type = lm.config.model_type
        for p in lm.parameters():
            p.requires_grad_(False)
        disable_dropout(lm)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                          target_modules=cfg.lora_targets or DEFAULT_LORA_TARGETS.get(model_type, ["q_proj", "v_proj"]),
                          fan_in_fan_out=model_type == "gpt2", task_type="CAUSAL_LM")
        self.lm = get_peft_model(lm, lora)
        if cfg.gradient_checkpointing:
            self.lm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.lm.get_base_model().enable_input_require_grads()
        if cfg.conditioned:
            layers = find_decoder_layers(self.lm)
            lora_a = [m["default"] for n, m in self.lm.named_modules() if n.endswith(".lora_A")] if cfg.lora_gates else []
            self.film: FiLM | None = FiLM(FiLMConfig(cfg.d_z, hidden_size(lm), len(layers), cfg.film_layers,
                                                     lora_gates=len(lora_a), lora_rank=cfg.lora_r if lora_a else 0,
                                                     gate_init_std=cfg.lora_gate_init_std if lora_a else 0.0,
                                                     final_norm=cfg.film_final_norm,
                                                     generator_hidden=cfg.film_hidden))
            self.film.attach(self.lm, lora_a)
            self.encoder: ContextEncoder | None = ContextEncoder(cfg.encoder)
            if cfg.freeze_encoder:
                self.encoder.requires_grad_(False)
        else:
            self.film, self.encoder = None, None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.chat.stop_ids[0]
        self._lock = threading.RLock()

    # -- modes -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within the block the model is the plain base: LoRA and FiLM switched off."""
        with self._lock:
            merged = self.merged
            if merged:  # merged LoRA lives in the base weights: take it out for the duration
                self.lm.unmerge_adapter()
            try:
                with self.lm.disable_adapter(), (self.film.disabled() if self.film else contextlib.nullcontext()):
                    yield
            finally:
                if merged:
                    self.lm.merge_adapter()

    @property
    def merged(self) -> bool:
        return any(getattr(m, "merged", False) for m in self.lm.modules() if hasattr(m, "merged_adapters"))

    def merge_for_inference(self) -> "SteerablePolicy":
        """Fold LoRA into the base weights (reversibly) for faster generation; training and the
        reference still work (the reference unmerges for its duration). A policy whose z gates
        LoRA keeps it unmerged: its update differs per row."""
        with self._lock:
            if not self.merged and not (self.film is not None and self.film.gated):
                self.lm.merge_adapter()
        return self

    @contextlib.contextmanager
    def conditioned(self, z: torch.Tensor | None) -> Iterator[None]:
        """Within the block the policy runs with latent z (B, d_z) per row; None = FiLM off."""
        if z is not None and self.film is None:
            raise ValueError("this policy is unconditioned (DPO): it takes no z")
        with self._lock, (self.film.condition(z) if self.film else contextlib.nullcontext()):
            yield

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Everything trained on top of the base: lora.*, film.*, encoder.* tensors."""
        from peft import get_peft_model_state_dict

        state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(self.lm).items()}
        for name, mod in (("film", self.film), ("encoder", self.encoder)):
            if mod is not None:
                state.update({f"{name}.{k}": v for k, v in mod.state_dict().items()})
        return state

    def load_adapter_state(self, state: dict[str, torch.Tensor], what: str = "policy state") -> None:
        """Load adapter_state() tensors strictly: missing, unexpected or mis-shaped keys are named."""
        from peft import set_peft_model_state_dict

        from core.bundle import check_state

        check_state(self.adapter_state(), state, what)
        set_peft_model_state_dict(self.lm, {k[5:]: v for k, v in state.items() if k.startswith("lora.")})
        for name, mod in (("film", self.film), ("encoder", self.encoder)):
            if mod is not None:
                mod.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")},
                                    strict=True)

    # -- latents ---------------------------------------------------------------------------
    def latent(self, a: torch.Tensor, b: torch.Tensor, choice: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z (B, d_z) from context option embeddings (a latent encoder gives its posterior mean)."""
        if self.encoder is None:
            raise ValueError("this policy is unconditioned (DPO): it has no context encoder")
        z = self.encoder(a, b, choice, mask)
        return z.mean if isinstance(z, Gaussian) else z

    # -- log-probs -------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        c = self.cfg
        return [(self.chat.prompt_ids(p, c.max_prompt_tokens), r)
                for p, r in zip(prompts, self.chat.responses_ids(responses, c.max_response_tokens), strict=True)]

    def _body_head(self) -> tuple[nn.Module, nn.Module]:
        base = unwrap(self.lm)
        return getattr(base, base.base_model_prefix), base.get_output_embeddings()

    def sequence_logprobs(self, s: Sequences) -> torch.Tensor:
        """Σ log π(response tokens | everything before), (N,), in the current mode."""
        body, head = self._body_head()
        h = body(input_ids=s.input_ids, attention_mask=s.attention_mask, use_cache=False).last_hidden_state  # (N, L, H)
        tmask = s.response_mask[:, 1:]  # (N, L-1): position t-1 predicts response token t
        hs = h[:, :-1][tmask]  # (M, H)
        tgt = s.input_ids[:, 1:][tmask]  # (M,)
        cap = getattr(unwrap(self.lm).config, "final_logit_softcapping", None)

        def token_lp(hc: torch.Tensor, tc: torch.Tensor) -> torch.Tensor:
            logits = head(hc).float()  # (m, V)
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return logits.gather(-1, tc[:, None])[:, 0] - logits.logsumexp(-1)  # (m,)

        # Small batches keep their (tokens, vocab) logits for backward; large ones recompute them
        # chunk by chunk in backward, which bounds memory at the price of one more head pass.
        recompute = torch.is_grad_enabled() and hs.shape[0] * head.weight.shape[0] > 2 ** 26
        chunks = []
        for i in range(0, hs.shape[0], 512):
            hc, tc = hs[i:i + 512], tgt[i:i + 512]
            chunks.append(checkpoint(token_lp, hc, tc, use_reentrant=False) if recompute else token_lp(hc, tc))
        lp = torch.cat(chunks) if chunks else hs.new_zeros(0, dtype=torch.float32)  # (M,)
        row = torch.arange(s.input_ids.shape[0], device=lp.device)[:, None].expand_as(tmask)[tmask]  # (M,)
        return torch.zeros(s.input_ids.shape[0], device=lp.device, dtype=lp.dtype).index_add(0, row, lp)  # (N,)

    @torch.no_grad()
    def reference_logprobs(self, s: Sequences, batch_size: int = 32) -> torch.Tensor:
        """Log-probs (N,) under the reference (the base with LoRA and FiLM off)."""
        out = []
        with self.reference():
            for i in range(0, s.input_ids.shape[0], batch_size):
                sub = Sequences(s.input_ids[i:i + batch_size], s.attention_mask[i:i + batch_size],
                                s.response_mask[i:i + batch_size])
                out.append(self.sequence_logprobs(_trim(sub)))
        return torch.cat(out)

    # -- NP-DPO ----------------------------------------------------------------------------
    def forward(self, inp: DPOInputs) -> tuple[torch.Tensor, dict[str, float]]:
        """DPO loss over the scored target pairs (+ optional SFT on the chosen); forward() so DDP syncs."""
        d, lp = self.log_ratios(inp)  # (2R,), (2R,)
        logit = self._target_logits(d)  # (R,)
        nll = btl_nll(logit, inp.choice if inp.target is None else inp.target)  # (R,)
        if inp.cross_a is not None and len(inp.cross_a):
            cross = self.cfg.beta * (d[inp.cross_b] - d[inp.cross_a])  # (E,)
            nll = torch.cat([nll, btl_nll(cross, inp.cross_target)])  # (R + E,)
        loss = nll.mean()
        decided = inp.choice != 0.5
        acc = ((logit > 0) == (inp.choice > 0.5))[decided].float().mean() if decided.any() else logit.new_tensor(0.0)
        metrics = {"acc": acc.item()}
        if self.cfg.sft_weight > 0 and decided.any():
            n_tok = inp.seqs.response_mask.sum(1).clamp_min(1).to(lp.dtype)  # (2R,)
            per_tok = (lp / n_tok).view(2, -1)  # (2, R): a rows, b rows
            chosen = torch.where(inp.choice > 0.5, per_tok[1], per_tok[0])  # (R,)
            sft = -chosen[decided].mean()
            metrics["sft_nll"] = sft.item()
            loss = loss + self.cfg.sft_weight * sft
        metrics["loss"] = loss.item()
        return loss, metrics

    def dpo_logits(self, inp: DPOInputs, return_logprobs: bool = False):
        """β[(log π_b − log ref_b) − (log π_a − log ref_a)] per target pair, (R,)
        (and the policy's log-probs (2R,) with return_logprobs)."""
        d, lp = self.log_ratios(inp)  # (2R,), (2R,)
        logit = self._target_logits(d)  # (R,)
        return (logit, lp) if return_logprobs else logit

    def _target_logits(self, d: torch.Tensor) -> torch.Tensor:
        """β(d_b − d_a) per target pair, (R,), from log_ratios' (2R,) rows (a's, then b's)."""
        d_a, d_b = d.chunk(2)  # 2 x (R,)
        return self.cfg.beta * (d_b - d_a)

    def log_ratios(self, inp: DPOInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's log π − log ref (length-normalised where configured; the implicit reward
        over β) and its log π, (2R,) each."""
        ref = inp.ref if inp.ref is not None else self.reference_logprobs(inp.seqs)  # (2R,)
        factors = None
        if self.film is not None:
            z = self.latent(inp.context_a, inp.context_b, inp.context_choice, inp.context_mask)  # (B, d_z)
            zr = z[inp.row_task]  # (R, d_z)
            factors = self.film.factors(torch.cat([zr, zr]))  # (2R, F)
        group = self.cfg.length_group_rows if not self.cfg.gradient_checkpointing else 0
        try:
            if group and 0 < group < inp.seqs.input_ids.shape[0]:
                lp = self._grouped_logprobs(inp.seqs, factors, group)  # (2R,)
            else:
                if factors is not None:
                    # Set, not a context block: gradient checkpointing re-runs the hooks during backward.
                    self.film.set_factors(factors)
                lp = self.sequence_logprobs(inp.seqs)  # (2R,)
        finally:
            if self.film is not None and not (self.training and self.cfg.gradient_checkpointing):
                self.film.set_factors(None)
        d = lp - ref  # (2R,)
        if self.cfg.length_normalize:
            n_tok = inp.seqs.response_mask.sum(1).clamp_min(1).to(d.dtype)  # (2R,)
            d = d / (n_tok / self.cfg.length_scale) ** self.cfg.length_power  # (2R,)
        return d, lp

    def _grouped_logprobs(self, s: Sequences, factors: torch.Tensor | None, group: int) -> torch.Tensor:
        """sequence_logprobs of s (N,), computed over length-sorted groups of `group` rows, each
        trimmed to its own longest row and conditioned on its rows' FiLM factors (N, F)."""
        order = torch.argsort(s.attention_mask.sum(1), stable=True)  # (N,) shortest first
        parts = []
        for i in range(0, len(order), group):
            rows = order[i:i + group]  # (g,)
            if factors is not None:
                self.film.set_factors(factors[rows])  # (g, F)
            parts.append(self.sequence_logprobs(_trim(Sequences(s.input_ids[rows], s.attention_mask[rows],
                                                                s.response_mask[rows]))))  # (g,)
        return torch.cat(parts).index_select(0, torch.argsort(order))  # (N,) back in the batch's order

    # -- generation ------------------------------------------------------------------------
    def _prompt_batch(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.chat.prompt_ids(p, self.cfg.max_prompt_tokens) for p in prompts]
        L = max(len(i) for i in ids)
        x = torch.full((len(ids), L), self.pad_id, dtype=torch.long)  # (B, L), left-padded
        am = torch.zeros((len(ids), L), dtype=torch.long)
        for r, i in enumerate(ids):
            x[r, L - len(i):] = torch.tensor(i)
            am[r, L - len(i):] = 1
        return x.to(self.device), am.to(self.device)

    def _z_rows(self, z: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if z is None:
            return None
        z = z.to(self.device, torch.float32)
        if z.ndim == 1:
            z = z.expand(n, -1)
        if z.shape[0] != n:
            raise ValueError(f"{z.shape[0]} latents for {n} prompts")
        return z

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], z: torch.Tensor | None = None, max_new_tokens: int = 128,
                 do_sample: bool = False, temperature: float = 0.8, top_p: float = 0.95, seed: int | None = None,
                 base: bool = False, use_cache: bool = True, streamer: BatchStreamer | None = None,
                 return_tokens: bool = False, min_new_tokens: int = 0, repetition_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0) -> list[str] | list[list[int]]:
        """Responses for a batch of prompts; z is (B, d_z) (one per row), (d_z,) for all, or None.

        base=True generates with the plain base model (LoRA and FiLM off). return_tokens gives
        the generated token ids up to (not including) the end of turn instead of text.
        repetition_penalty > 1 applies CTRL's penalty to the tokens this answer has already generated
        (`AnswerRepetitionPenalty`: not the prompt's, never the end of turn); no_repeat_ngram_size = n > 0
        forbids any token n-gram twice in a row, prompt included (transformers' processor).
        """
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        if no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be ≥ 0, got {no_repeat_ngram_size}")
        prompts = list(prompts)
        if not prompts:
            return []
        x, am = self._prompt_batch(prompts)
        zr = self._z_rows(z, len(prompts))
        mode = self.reference() if base else self.conditioned(zr)
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens or None,
                                  do_sample=False, use_cache=use_cache,
                                  eos_token_id=self.chat.stop_ids, pad_token_id=self.pad_id, streamer=streamer,
                                  no_repeat_ngram_size=int(no_repeat_ngram_size) or None)
        procs: list[Any] = []
        if repetition_penalty != 1.0:
            procs.append(AnswerRepetitionPenalty(repetition_penalty, x.shape[1], [*self.chat.stop_ids, self.pad_id]))
        if do_sample:  # our own sampler with a private generator: seeded runs are thread-safe
            procs.append(SeededSampler(temperature, top_p, seed))
        if procs:  # after transformers' own processors (no-repeat n-grams, min_new_tokens)
            from transformers import LogitsProcessorList
            kw["logits_processor"] = LogitsProcessorList(procs)
        was_training = self.training
        self.eval()
        try:
            with mode:
                out = self.lm.generate(input_ids=x, attention_mask=am, **kw)  # (B, L + new)
        finally:
            self.train(was_training)
        texts = []
        for row in out[:, x.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.chat.stop_ids), len(row))
            if return_tokens:
                texts.append(row[:cut])
                continue
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

    def stream(self, prompts: Sequence[str], z: torch.Tensor | None = None, **kw) -> Iterator[list[str]]:
        """Yield every row's text so far after each new token (generation runs in a thread)."""
        streamer = BatchStreamer(self.tokenizer, len(prompts), self.chat.stop_ids)

        def run() -> None:
            try:
                self.generate(prompts, z, streamer=streamer, **kw)
            except BaseException as e:  # surfaced to the consumer
                streamer.fail(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        for texts in streamer:
            yield [s.strip() for s in texts]
        t.join()


class AnswerRepetitionPenalty:
    """CTRL's repetition penalty (Keskar et al. 2019) over the tokens generated so far: a positive
    logit is divided by `penalty`, a negative one multiplied by it.

    transformers' own processor also penalises every prompt token, and the chat template's prompt
    holds the end-of-turn token, so with it every answer is pushed to run longer; and it discourages
    an answer from reusing the question's words. This one reads only the answer's tokens (columns from
    `prompt_len` on, the left-padded prompt batch's width) and leaves the `exempt` ids (end of turn,
    padding) alone.
    """

    def __init__(self, penalty: float, prompt_len: int, exempt: Sequence[int] = ()) -> None:
        if not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        self.penalty, self.prompt_len = float(penalty), int(prompt_len)
        self.exempt = torch.tensor(sorted({int(t) for t in exempt}), dtype=torch.long)  # (E,) moved once, below

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = input_ids[:, self.prompt_len:]  # (B, t) the answer so far
        if seen.shape[1] == 0:
            return scores
        picked = scores.gather(1, seen)  # (B, t)
        picked = torch.where(picked > 0, picked / self.penalty, picked * self.penalty)
        out = scores.scatter(1, seen, picked)  # (B, V); a repeated id writes the same value
        if self.exempt.numel():
            if self.exempt.device != scores.device:  # the first step only: not a host-to-device copy per token
                self.exempt = self.exempt.to(scores.device)
            out[:, self.exempt] = scores[:, self.exempt]
        return out


class SeededSampler:
    """A logits processor that samples the next token itself (temperature, then nucleus top_p)
    with a private torch.Generator and leaves only that token finite, so greedy decoding emits it.

    Sampling through transformers draws from torch's process-wide generator, so two generations
    seeded at once in two threads (the demo streams steered and baseline together) interleave
    their draws; this one depends only on its own seed. seed=None draws one from the global RNG.
    """

    def __init__(self, temperature: float, top_p: float = 1.0, seed: int | None = None) -> None:
        if not temperature > 0:
            raise ValueError(f"sampling temperature must be > 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.gen: torch.Generator | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.gen is None:  # made at the first step, on the logits' device; seeded once per generation
            self.gen = torch.Generator(device=scores.device).manual_seed(self.seed)
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        if self.top_p < 1:
            p_sorted, order = probs.sort(dim=-1, descending=True)  # (B, V)
            drop = p_sorted.cumsum(-1) - p_sorted >= self.top_p  # the mass before a token already covers top_p
            probs = probs.scatter(-1, order, p_sorted.masked_fill(drop, 0.0))
        tok = torch.multinomial(probs, 1, generator=self.gen)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter(-1, tok, 0.0)  # (B, V)


def _trim(s: Sequences) -> Sequences:
    """Drop all-padding columns at the right (a sub-batch may be shorter than the batch)."""
    L = int(s.attention_mask.sum(1).max().item()) if s.attention_mask.numel() else 0
    return Sequences(s.input_ids[:, :L], s.attention_mask[:, :L], s.response_mask[:, :L])


class PolicyData:
    """A PairSet tokenised for a policy, its context embeddings, and the reference log-prob cache."""

    def __init__(self, policy: SteerablePolicy, pairs, emb: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        if pairs.is_numeric:
            raise ValueError(f"{pairs.source}: a policy needs text options (prompt + responses), not numbers")
        missing = [pairs.ids[i] for i, p in enumerate(pairs.prompts) if not p]
        if missing:
            raise ValueError(f"{pairs.source}: pairs {missing[:5]} have no prompt; a policy needs one per pair")
        self.pairs = pairs
        self.tok_a = policy.encode(pairs.prompts, pairs.a)
        self.tok_b = policy.encode(pairs.prompts, pairs.b)
        self.emb_a, self.emb_b = emb if emb is not None else (None, None)
        if policy.film is not None and self.emb_a is None:
            raise ValueError("a conditioned policy needs context embeddings (emb=)")
        self.ref = torch.full((len(pairs), 2), float("nan"))  # (n, 2): reference log-probs of a, b
        self.pad_id = policy.pad_id

    def ensure_reference(self, policy: SteerablePolicy, idx: torch.Tensor, autocast=contextlib.nullcontext) -> None:
        todo = sorted(set(idx[torch.isnan(self.ref[idx]).any(1)].tolist()))
        if not todo:
            return
        s = collate([self.tok_a[i] for i in todo] + [self.tok_b[i] for i in todo], self.pad_id).to(policy.device)
        with autocast():
            lp = policy.reference_logprobs(s).float().cpu()  # (2m,)
        self.ref[todo] = torch.stack(lp.chunk(2), 1)

    def inputs(self, policy: SteerablePolicy, batch, score: torch.Tensor, cache_reference: bool = True,
               autocast=contextlib.nullcontext) -> DPOInputs:
        """DPOInputs for the targets of `batch` where score (B, T) is True (on CPU; move with .to)."""
        task, pos = score.nonzero(as_tuple=True)  # (R,), (R,)
        idx = batch.target_idx[task, pos]  # (R,)
        ref = None
        if cache_reference:
            self.ensure_reference(policy, idx, autocast)
            ref = torch.cat([self.ref[idx, 0], self.ref[idx, 1]])  # (2R,)
        seqs = collate([self.tok_a[i] for i in idx.tolist()] + [self.tok_b[i] for i in idx.tolist()], self.pad_id)
        ctx = (None,) * 4
        if policy.film is not None:
            ctx = (self.emb_a[batch.context_idx], self.emb_b[batch.context_idx], batch.context_choice,
                   batch.context_mask)
        return DPOInputs(*ctx, row_task=task, choice=batch.target_choice[task, pos].float(), seqs=seqs, ref=ref)

    def cross_pairs(self, batch, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs of inputs()'s 2R sequences (a's, then b's) that answer one prompt within one task
        and are not a target pair itself: row indices (E,), (E,). Each unordered pair of distinct
        response texts appears once per task."""
        task, pos = score.nonzero(as_tuple=True)  # (R,), (R,)
        idx = batch.target_idx[task, pos].tolist()  # (R,)
        R = len(idx)
        texts = [self.pairs.a[i] for i in idx] + [self.pairs.b[i] for i in idx]  # (2R,)
        groups: dict[tuple[int, str], list[int]] = {}
        for k in range(2 * R):
            groups.setdefault((int(task[k % R]), self.pairs.prompts[idx[k % R]]), []).append(k)
        seen: set[tuple[int, str, str]] = {(int(task[k]), *sorted((texts[k], texts[k + R]))) for k in range(R)}
        ia: list[int] = []
        ib: list[int] = []
        for (t, _), rows in groups.items():
            for n, i in enumerate(rows):
                for j in rows[n + 1:]:
                    key = (t, *sorted((texts[i], texts[j])))
                    if texts[i] != texts[j] and key not in seen:
                        seen.add(key)
                        ia.append(i)
                        ib.append(j)
        return torch.tensor(ia, dtype=torch.long), torch.tensor(ib, dtype=torch.long)


__all__ = ["PolicyConfig", "ChatFormat", "Sequences", "collate", "DPOInputs", "BatchStreamer", "SteerablePolicy",
           "PolicyData"]
