"""Thin adapters between the web page / API and core: validate input, call core.session and the
policies, return JSON-able dicts. One `DemoApp` per process; per-user state is passed in and out
(a dict), so concurrent users never share anything mutable.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import unicodedata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from core.data import personas as P
from core.persona import PersonaBundle, default_bundle_dir, load_persona_bundle
from core.session import Engine, SessionError, SessionState

MAX_PROMPT_CHARS = 2000
BUNDLE_ENV = "FSA_BUNDLE"
DECODINGS = ("greedy", "sample")
SAMPLE_TEMPERATURE = 0.7  # the steering experiment's sampled setting (core.experiments.steering --decoding sample)
SAMPLE_TOP_P = 0.95
MAX_SEED = 2**31 - 1


class DemoError(ValueError):
    """Bad input from the page or an API client: the message is shown as is; nothing changed."""


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise DemoError("the prompt must be text")
    p = prompt.strip()
    if not p:
        raise DemoError("the prompt is empty: pick one from the list or type a question")
    if len(p) > MAX_PROMPT_CHARS:
        raise DemoError(f"the prompt has {len(p):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    bad = sorted({f"U+{ord(ch):04X}" for ch in p if unicodedata.category(ch) in ("Cc", "Cs") and ch not in "\n\t"})
    if bad:
        raise DemoError(f"the prompt contains control characters ({', '.join(bad[:5])}); remove them and try again")
    return p


def map_point(x: Any, y: Any, step: float = 0.05, limit: float = 1.0) -> list[float]:
    """A point picked on the behaviour map (a click or the sliders) as [x, y]: clipped to
    [-limit, limit] and rounded to a multiple of `step`, the sliders' resolution."""
    try:
        v = [float(x), float(y)]
    except (TypeError, ValueError):
        raise DemoError(f"a map point needs two numbers, got x={x!r}, y={y!r}") from None
    if not all(math.isfinite(a) for a in v):
        raise DemoError(f"a map point needs two finite numbers, got x={x!r}, y={y!r}")
    return [round(round(min(max(a, -limit), limit) / step) * step, 6) + 0.0 for a in v]


def resolve_bundle(arg: str | os.PathLike | None = None) -> Path:
    """--bundle, else $FSA_BUNDLE, else persona-smol when SmolLM2 is installed, else persona-tiny."""
    if arg:
        return Path(arg)
    if os.environ.get(BUNDLE_ENV):
        return Path(os.environ[BUNDLE_ENV])
    return default_bundle_dir()


DTYPE_ENV = "FSA_DTYPE"  # auto (default) | float32 | bfloat16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX tiles). Without it
    torch emulates bf16 on the CPU, which is slower than fp32: SmolLM2-135M at batch 1, one thread,
    gave 12.2 tokens/s in bf16 against 13.3 in fp32 (first token 1.34 s against 0.34 s) on an
    AVX2-only AMD EPYC, where a CPU with AVX512-BF16 gave 28.9 against 21.3 (benchmarks/stream.py)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(torch.cpu, probe, None)
        try:
            if f is not None and f():
                return True
        except Exception:  # a private torch probe: any failure means "not known to be native"
            continue
    return False


def model_dtype(bundle_dir: str | os.PathLike, device: str) -> torch.dtype | None:
    """The dtype the app loads a bundle in; None keeps the bundle's own (fp32).

    $FSA_DTYPE (float32 | bfloat16) decides when set. Otherwise: bf16 on a GPU that supports it,
    and for SmolLM2 on a CPU with native bf16 (cpu_has_native_bf16); the tiny model, and SmolLM2
    on other CPUs, stay fp32."""
    forced = os.environ.get(DTYPE_ENV, "auto").strip().lower()
    if forced in DTYPES:
        return DTYPES[forced]
    if forced != "auto":
        raise DemoError(f"${DTYPE_ENV} must be auto, float32 or bfloat16, got {forced!r}")
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    from core.bundle import BundleError, read_manifest

    try:
        base = (read_manifest(bundle_dir).get("recipe") or {}).get("base")
    except BundleError:
        return None  # load_persona_bundle reports what is wrong with the folder
    return torch.bfloat16 if base == "smol" and cpu_has_native_bf16() else None


class DemoApp:
    def __init__(self, bundle_dir: str | os.PathLike | None = None, device: str | None = None,
                 max_new_tokens: int | None = None) -> None:
        self.bundle_dir = resolve_bundle(bundle_dir)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = model_dtype(self.bundle_dir, self.device)
        t = time.time()
        self.bundle: PersonaBundle = load_persona_bundle(self.bundle_dir, device=self.device, dtype=dtype)
        self.bundle.policy.merge_for_inference()
        self.bundle.dpo.merge_for_inference()
        self.load_seconds = time.time() - t
        self.engine = Engine.from_bundle(self.bundle)
        self.map = self.bundle.map
        self.max_new_tokens = max_new_tokens or (200 if self.bundle.meta.get("recipe", {}).get("base") == "smol" else 160)
        self.prompts = sorted({r["prompt"] for r in self.bundle.pool if r.get("prompt")})
        self._lock = threading.Lock()

    # -- description -----------------------------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        pol = self.bundle.policy
        from core.bundle import read_manifest

        base = read_manifest(self.bundle_dir / "policy").get("base", {})
        n = sum(p.numel() for p in pol.lm.parameters())
        return {"bundle": self.bundle.name, "path": str(self.bundle_dir),
                "base": str(base.get("name") or base.get("spec") or pol.cfg.base), "parameters": int(n), "device": self.device, "d_z": int(pol.cfg.d_z),
                "axes": self.bundle.axes, "archetypes": self.bundle.archetypes, "pool": len(self.bundle.pool),
                "decoding": self.bundle.decoding.to_dict(), "load_seconds": round(self.load_seconds, 2)}

    # -- state -----------------------------------------------------------------------------
    @staticmethod
    def state_of(d: dict[str, Any] | None) -> SessionState:
        try:
            return SessionState.from_dict(d)
        except (TypeError, ValueError, AttributeError) as e:
            raise DemoError(f"this session's saved state is unreadable ({e}); press Reset") from None

    def _checked(self, d: dict[str, Any] | None) -> SessionState:
        s = self.state_of(d)
        n = len(self.bundle.pool)
        if (s.current is not None and not 0 <= s.current < n) or any(not 0 <= c.get("pair", -1) < n for c in s.clicks):
            raise DemoError("this session's saved state does not match the loaded model; press Reset")
        return s

    # -- the loop --------------------------------------------------------------------------
    def next_pair(self, state: dict | None, mode: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self._checked(state)
        try:
            s = self.engine.next_pair(s, mode)
            return self.engine.pair_view(s), s.to_dict()
        except SessionError as e:
            raise DemoError(str(e)) from None

    def current_pair(self, state: dict | None) -> dict[str, Any] | None:
        s = self._checked(state)
        return None if s.current is None else self.engine.pair_view(s)

    def choose(self, choice: str, state: dict | None) -> tuple[dict[str, Any], dict[str, Any]]:
        s = self._checked(state)
        c = choice.strip() if isinstance(choice, str) else choice
        c = {"a": "A", "b": "B", "skip": "skip"}.get(c.lower(), c) if isinstance(c, str) else c
        try:
            s = self.engine.choose(s, c)
        except SessionError as e:
            raise DemoError(str(e)) from None
        return self.engine.latent(s), s.to_dict()

    def latent(self, state: dict | None) -> dict[str, Any]:
        return self.engine.latent(self._checked(state))

    def undo(self, state: dict | None) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            s = self.engine.undo(self._checked(state))
        except SessionError as e:
            raise DemoError(str(e)) from None
        return self.engine.latent(s), s.to_dict()

    def reset(self, state: dict | None) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            s = self.engine.reset(self.state_of(state))
        except DemoError:
            s = SessionState()
        return self.engine.latent(s), s.to_dict()

    def set_mode(self, mode: str, state: dict | None) -> dict[str, Any]:
        if mode not in ("random", "informative"):
            raise DemoError(f"next-pair mode must be 'random' or 'informative', got {mode!r}")
        s = self._checked(state)
        s.mode = mode
        return s.to_dict()

    def autopilot(self, who: str | list[float], n: int, state: dict | None, temperature: float = 0.1
                  ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """A simulated user clicks n pairs; yields (latent, state) after each click."""
        w = self.user_weights(who)
        if not isinstance(n, (int, float)) or not 1 <= int(n) <= 100:
            raise DemoError(f"autopilot clicks must be between 1 and 100, got {n!r}")
        s = self._checked(state)
        rng = np.random.default_rng([s.seed, s.draws, len(s.clicks)])
        for _ in range(int(n)):
            if s.current is None:
                s = self.engine.next_pair(s)
            s = self.engine.choose(s, self.engine.simulate_choice(s, w, temperature, rng))
            yield self.engine.latent(s), s.to_dict()

    def user_weights(self, who: str | list[float] | tuple) -> list[float]:
        if isinstance(who, str):
            if who not in self.bundle.archetypes:
                raise DemoError(f"unknown archetype {who!r}; choose one of {', '.join(self.bundle.archetypes)}")
            return list(self.bundle.archetypes[who])
        try:
            w = [float(v) for v in who]
        except (TypeError, ValueError):
            raise DemoError("a simulated user is an archetype name or a point [x, y] on the map") from None
        if len(w) != len(self.bundle.axes) or not all(np.isfinite(w)) or max(abs(v) for v in w) > 1.5:
            raise DemoError(f"a map point needs {len(self.bundle.axes)} numbers in [-1.5, 1.5]")
        return w

    # -- profiles --------------------------------------------------------------------------
    def export_profile(self, state: dict | None) -> dict[str, Any]:
        return self.engine.export_profile(self._checked(state), self.bundle.name)

    def import_profile(self, data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        if isinstance(data, (bytes, bytearray)):
            data = bytes(data)
        elif isinstance(data, (str, Path)) and Path(str(data)).suffix == ".json" and Path(str(data)).is_file():
            f = Path(str(data))
            if f.stat().st_size > 256 * 1024:
                raise DemoError(f"profile file is {f.stat().st_size} bytes; the limit is {256 * 1024}")
            data = f.read_bytes()
        if data is None or (isinstance(data, (str, bytes)) and not data.strip()):
            raise DemoError("no profile given: paste or upload the JSON you exported")
        try:
            s = self.engine.import_profile(data)
        except SessionError as e:
            raise DemoError(f"profile not imported: {e}") from None
        return self.engine.latent(s), s.to_dict()

    # -- generation ------------------------------------------------------------------------
    def z_for(self, state: dict | None, point: list[float] | None = None) -> torch.Tensor:
        if point is not None:
            return self.engine.z_at(self.user_weights(point))
        return self.engine.z_of(self._checked(state))

    def scores(self, text: str) -> dict[str, Any]:
        return {**{k: round(v, 4) for k, v in P.score_all(text).items()}, "words": P.word_count(text)}

    def decoding_kw(self, decoding: str = "greedy", seed: Any = 0) -> dict[str, Any]:
        """generate() options for a decoding choice: greedy, or sampling at SAMPLE_TEMPERATURE with a
        seed (the same seed gives the same answer; steered and baseline share it), with the bundle's
        repetition settings either way."""
        if decoding not in DECODINGS:
            raise DemoError(f"decoding must be one of {', '.join(map(repr, DECODINGS))}, got {decoding!r}")
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, **self.bundle.decoding.to_dict()}
        if decoding == "sample":
            try:
                s = float(seed)
            except (TypeError, ValueError):
                raise DemoError(f"the sampling seed must be a whole number, got {seed!r}") from None
            if not (math.isfinite(s) and s == int(s) and 0 <= s <= MAX_SEED):
                raise DemoError(f"the sampling seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
            kw.update(do_sample=True, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=int(s))
        return kw

    def generate(self, prompt: str, mode: str, state: dict | None, point: list[float] | None = None,
                 decoding: str = "greedy", seed: Any = 0) -> dict[str, Any]:
        out = {}
        for out in self.stream(prompt, mode, state, point, decoding, seed):
            pass
        return out

    def stream(self, prompt: str, mode: str, state: dict | None, point: list[float] | None = None,
               decoding: str = "greedy", seed: Any = 0) -> Iterator[dict[str, Any]]:
        """Yields {text, mode, tokens, done} after every generated token (tokens: how many so far),
        then once more with done=True and the answer's attributes."""
        p = check_prompt(prompt)
        if mode not in ("steered", "baseline"):
            raise DemoError(f"mode must be 'steered' or 'baseline', got {mode!r}")
        kw = self.decoding_kw(decoding, seed)
        if mode == "steered":
            it = self.bundle.policy.stream([p], self.z_for(state, point)[None], **kw)
        else:
            it = self.bundle.dpo.stream([p], None, **kw)
        text, n = "", 0
        for n, texts in enumerate(it, 1):  # BatchStreamer yields once per generated token
            text = texts[0]
            yield {"text": text, "mode": mode, "tokens": n, "done": False}
        yield {"text": text, "attributes": self.scores(text), "mode": mode, "tokens": n, "done": True}

    def stream_both(self, prompt: str, state: dict | None, point: list[float] | None = None,
                    decoding: str = "greedy", seed: Any = 0) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """Steered and baseline answers growing side by side."""
        self.decoding_kw(decoding, seed)  # bad options fail here, before either stream starts
        s_it = self.stream(prompt, "steered", state, point, decoding, seed)
        b_it = self.stream(prompt, "baseline", state, point, decoding, seed)
        s = b = {"text": "", "done": False}
        for s_new, b_new in itertools.zip_longest(s_it, b_it):
            s = s_new or s
            b = b_new or b
            yield s, b

    def sweep(self, prompt: str, axis: str, state: dict | None, n: int = 5, point: list[float] | None = None,
              decoding: str = "greedy", seed: Any = 0) -> list[dict[str, Any]]:
        """n answers across one axis of the map (the other axis held at the current point), in one batch."""
        p = check_prompt(prompt)
        kw = self.decoding_kw(decoding, seed)
        axes = self.bundle.axes
        if axis not in axes:
            raise DemoError(f"sweep axis must be one of {', '.join(axes)}, got {axis!r}")
        if not 3 <= int(n) <= 5:
            raise DemoError(f"a sweep has 3 to 5 points, got {n}")
        if point is None:
            lat = self.latent(state)
            point = [lat["map"]["x"], lat["map"]["y"]]
        base = np.clip(np.asarray(self.user_weights(point), dtype=np.float64), -1, 1)
        i = axes.index(axis)
        pts = np.repeat(base[None], int(n), 0)
        pts[:, i] = np.linspace(-1, 1, int(n))
        z = torch.as_tensor(self.map.to_z(pts), dtype=torch.float32)  # (n, d_z)
        texts = self.bundle.policy.generate([p] * int(n), z, **kw)
        return [{"point": pt.tolist(), "text": t, "attributes": self.scores(t)} for pt, t in zip(pts, texts)]
