"""Small language models built from scratch: a byte-level BPE tokenizer with a ChatML chat
template, and tiny configs of the Llama, Qwen2 and GPT-2 families.

Used by the tests (no downloads) and by the persona-tiny bundle, which trains one of these
on the persona corpus.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE tokenizer trained on `texts`, with ChatML specials and chat template.

    eos = <|im_end|> (the end of an assistant turn), pad = <|endoftext|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(list(texts), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token=None, unk_token=None)
    tok.chat_template = CHATML
    return tok


Family = Literal["llama", "qwen2", "gpt2"]


def tiny_config(family: Family, vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                max_positions: int = 512, tokenizer=None, dropout: float | None = None, activation: str | None = None):
    """A transformers config for a small decoder of `family` (random init, tied embeddings).
    dropout: every dropout rate of the family (None keeps transformers' defaults, 0.1 for GPT-2).
    activation: the MLP's activation, a transformers ACT2FN name (None keeps the family's default)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {}
    if tokenizer is not None:
        ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                   bos_token_id=tokenizer.pad_token_id)
    if family == "gpt2":
        drop = {} if dropout is None else dict(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        act = {} if activation is None else dict(activation_function=activation)
        return GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                          n_positions=max_positions, tie_word_embeddings=True, **drop, **act, **ids)
    common = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4 * d_model,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=True, **ids,
                  **({} if dropout is None else {"attention_dropout": dropout}),
                  **({} if activation is None else {"hidden_act": activation}))
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny family {family!r}; expected llama, qwen2 or gpt2")


def tiny_model(family: Family, tokenizer, seed: int = 0, **kw):
    """A randomly initialised tiny *ForCausalLM for `tokenizer`, in eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, len(tokenizer), tokenizer=tokenizer, **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def length_bucketed_batches(lengths: list[int], batch_size: int, n_batches: int, buckets: int,
                            g: torch.Generator) -> list[list[int]]:
    """`n_batches` batches of row indices drawn uniformly with replacement, as `batch_size` x
    `n_batches` independent draws; each group of `buckets` batches is drawn at once, sorted by length
    and cut into batches, whose order is then shuffled. Rows of similar length share a batch, so
    little of a padded batch is padding (on the persona corpus, 91 % real tokens with 8 buckets
    against 54 % for plain random batches). buckets=1 gives plain random batches."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    out: list[list[int]] = []
    while len(out) < n_batches:
        k = min(buckets, n_batches - len(out))
        idx = torch.randint(len(lengths), (batch_size * k,), generator=g).tolist()
        idx.sort(key=lambda i: lengths[i])  # stable: equal lengths keep their draw order
        group = [idx[j * batch_size:(j + 1) * batch_size] for j in range(k)]
        out.extend(group[j] for j in torch.randperm(k, generator=g).tolist())
    return out


def train_lm(model, tokenizer, examples: list[tuple[str, str]], steps: int = 600, batch_size: int = 32,
             lr: float = 3e-3, seed: int = 0, max_tokens: int = 256, quiet: bool = True,
             log_every: int = 100, length_buckets: int = 1) -> list[dict]:
    """Supervised fine-tuning of `model` on (prompt, response) pairs: the loss is the NLL of the
    response tokens (and end of turn) after the chat-rendered prompt. Returns the loss history.

    length_buckets > 1 batches rows of similar length together (`length_bucketed_batches`): the
    same number of examples per step, with far fewer padded positions to compute."""
    import math

    from core.policy import ChatFormat, collate

    chat = ChatFormat(tokenizer)
    responses = chat.responses_ids([r for _, r in examples], max_tokens)
    rows = [(chat.prompt_ids(p, max_tokens), r) for (p, _), r in zip(examples, responses, strict=True)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else chat.stop_ids[0]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    body, head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    model.train()
    history, run = [], 0.0
    lengths = [len(p) + len(r) for p, r in rows]
    batches = length_bucketed_batches(lengths, batch_size, steps, length_buckets, g) if length_buckets > 1 else None
    for step in range(steps):
        warm = min(1.0, (step + 1) / max(1, steps // 20))
        for grp in opt.param_groups:
            grp["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = batches[step] if batches is not None else torch.randint(len(rows), (batch_size,), generator=g).tolist()
        s = collate([rows[i] for i in idx], pad)
        h = body(input_ids=s.input_ids, attention_mask=s.attention_mask).last_hidden_state  # (B, L, H)
        tmask = s.response_mask[:, 1:]  # (B, L-1): position t-1 predicts response token t
        logits = head(h[:, :-1][tmask])  # (M, V): only the scored positions go through the head
        loss = torch.nn.functional.cross_entropy(logits, s.input_ids[:, 1:][tmask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run = loss.item() if step == 0 else 0.95 * run + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": round(run, 4)})
            if not quiet:
                print(f"  lm step {step + 1}/{steps}: loss {run:.3f}", flush=True)
    model.eval()
    return history
