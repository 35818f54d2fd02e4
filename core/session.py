"""The demo's session logic, pure and UI-free: a pool of candidate pairs, the user's clicks, the
posterior q(z | clicks), predictions, and which pair to show next.

A session is a JSON-able `SessionState`; `Engine` (one per loaded persona bundle, shared by all
users, holds no per-user state) answers questions about a state and returns new states. So the
web app keeps one state per browser session, and two users can never see each other's clicks.

Per click the posterior is one encoder pass over the clicked pairs (no gradient step); the engine
caches posteriors by the answered clicks, so the several questions a click asks (the prediction
for the pair on screen, the next pair, the map) share that pass.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

CHOICES = ("A", "B", "skip")
PROFILE_FORMAT = "few-shot-alignment-profile"
PROFILE_VERSION = 1
MAX_PROFILE_BYTES = 256 * 1024
MAX_CLICKS = 500
POSTERIOR_CACHE = 4096  # posteriors kept, keyed by the answered clicks (every prefix of every session's path)


class SessionError(ValueError):
    """A request that can't be applied to the session (the state is left unchanged)."""


@dataclass
class SessionState:
    clicks: list[dict[str, Any]] = field(default_factory=list)  # {"pair", "choice", "p_choice"}
    current: int | None = None  # pool index of the pair on screen
    mode: str = "informative"  # next-pair rule: random | informative
    seed: int = 0
    draws: int = 0  # how many pairs have been drawn (keeps random draws reproducible)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SessionState":
        if not d:
            return cls()
        return cls(clicks=[dict(c) for c in d.get("clicks", [])], current=d.get("current"),
                   mode=d.get("mode", "informative"), seed=int(d.get("seed", 0)), draws=int(d.get("draws", 0)))

    @property
    def answered(self) -> list[dict[str, Any]]:
        """Clicks that carry a preference (skips excluded)."""
        return [c for c in self.clicks if c["choice"] in ("A", "B")]


def _entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return -(p * np.log(p) + (1 - p) * np.log(1 - p))


def click_information(ps: np.ndarray) -> np.ndarray:
    """BALD: the mutual information between a click and z, H(E_z p) - E_z H(p), in nats, from
    P(B ≻ A) under S posterior samples of z: (..., S, R) -> (..., R). The informative next pair is
    the one with the largest value."""
    ps = np.asarray(ps, dtype=np.float64)
    return _entropy(ps.mean(-2)) - _entropy(ps).mean(-2)  # (..., R)


class Engine:
    """Posterior, predictions and pair selection for one persona bundle."""

    def __init__(self, reward, behaviour_map, pool: list[dict[str, Any]], pool_emb: tuple[torch.Tensor, torch.Tensor],
                 n_samples: int = 64, cache_size: int = POSTERIOR_CACHE) -> None:
        self.reward = reward.eval()
        self.map = behaviour_map
        self.pool = pool
        self.emb_a, self.emb_b = pool_emb[0].float(), pool_emb[1].float()
        self.n_samples = n_samples
        self.ids = {r["id"]: i for i, r in enumerate(pool)}
        self.axes = list(behaviour_map.axes)
        # q(z | clicks) is a pure function of the answered (pair, choice) sequence, so one cache serves
        # every user: a hit returns exactly what the encoder returned for that sequence before.
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()  # seq -> (1, d_z) x 2
        self._cache_lock = threading.Lock()
        self.cache_size = cache_size
        self._feats: tuple[torch.Tensor, torch.Tensor] | None = None  # see _option_features

    @classmethod
    def from_bundle(cls, bundle, **kw) -> "Engine":
        return cls(bundle.reward, bundle.map, bundle.pool, bundle.pool_emb, **kw)

    # -- posterior -------------------------------------------------------------------------
    @torch.no_grad()
    def _posteriors(self, clicks: Sequence[dict[str, Any]], prefixes: bool = False):
        """(mean, std) of q(z | clicks), (1, d_z) each; with prefixes, for every prefix 0..n: (n + 1, d_z).

        Each prefix's posterior is cached under its answered (pair, choice) sequence, so a new
        click costs one encoder pass however long the session is, and the trajectory reuses the
        posteriors computed click by click. Missing prefixes are encoded together in one batch."""
        ans = [c for c in clicks if c["choice"] in ("A", "B")]
        n = len(ans)
        seq = tuple((int(c["pair"]), c["choice"]) for c in ans)
        lens = list(range(n + 1)) if prefixes else [n]
        with self._cache_lock:
            got = {k: self._cache.get(seq[:k]) for k in lens}
            for k in lens:
                if got[k] is not None:
                    self._cache.move_to_end(seq[:k])
        missing = [k for k in lens if got[k] is None]
        if missing:
            mean, std = self._encode(ans, missing)  # (len(missing), d_z) each
            with self._cache_lock:
                for i, k in enumerate(missing):
                    got[k] = self._cache[seq[:k]] = (mean[i:i + 1], std[i:i + 1])
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        if not prefixes:
            return got[n]
        return torch.cat([got[k][0] for k in lens]), torch.cat([got[k][1] for k in lens])  # (n + 1, d_z) each

    def _encode(self, ans: list[dict[str, Any]], lens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One encoder pass: q(z | the first k answered clicks) for every k in lens, (len(lens), d_z) each."""
        n = max(lens)
        rows = torch.tensor([c["pair"] for c in ans[:n]], dtype=torch.long)
        choice = torch.tensor([1.0 if c["choice"] == "B" else 0.0 for c in ans[:n]])
        k = len(lens)
        C = max(n, 1)
        a = torch.zeros(k, C, self.emb_a.shape[1])
        b = torch.zeros_like(a)
        ch = torch.zeros(k, C)
        if n:
            a[:, :n], b[:, :n], ch[:, :n] = self.emb_a[rows], self.emb_b[rows], choice
        mask = torch.arange(C)[None, :] < torch.as_tensor(list(lens))[:, None]  # (k, C)
        q = self.reward.encoder(a, b, ch, mask)
        if isinstance(q, torch.Tensor):  # deterministic encoder: no uncertainty
            return q, torch.zeros_like(q)
        return q.mean.detach(), q.std.detach()

    def latent(self, state: SessionState) -> dict[str, Any]:
        """The posterior and its trajectory on the behaviour map, as plain data."""
        mean, std = self._posteriors(state.clicks, prefixes=True)  # (n + 1, d_z)
        pts = self.map(mean)  # (n + 1, A)
        covs = self.map.cov(std)  # (n + 1, A, A)
        answered = state.answered
        hits = [c["p_choice"] > 0.5 for c in answered if c.get("p_choice") is not None]
        return {
            "n_clicks": len(answered), "n_skipped": len(state.clicks) - len(answered),
            "map": dict(zip(("x", "y"), map(float, pts[-1][:2]))), "cov": covs[-1].tolist(),
            "axes": self.axes, "z": mean[-1].tolist(), "z_std": std[-1].tolist(),
            "trajectory": pts.tolist(), "trajectory_cov": covs.tolist(),
            "p_choice": [c.get("p_choice") for c in answered],
            "accuracy": float(np.mean(hits)) if hits else None,
            "running_accuracy": [float(np.mean(hits[:i + 1])) for i in range(len(hits))],
            "settled_at": self.settled_at(pts),
            "nearest_archetype": self.nearest_archetype(pts[-1]),
        }

    @staticmethod
    def settled_at(points: np.ndarray, radius: float = 0.15) -> int | None:
        """The first click count after which the map point stays within `radius` of where it ends."""
        if len(points) < 3:
            return None
        d = np.linalg.norm(points - points[-1], axis=1)
        outside = np.flatnonzero(d > radius)
        k = int(outside[-1]) + 1 if len(outside) else 0
        return k if k < len(points) - 1 else None

    def nearest_archetype(self, point: np.ndarray) -> str | None:
        if not self.map.anchors:
            return None
        return min(self.map.anchors, key=lambda k: float(np.linalg.norm(np.asarray(self.map.anchors[k]) - point[:2])))

    def z_of(self, state: SessionState) -> torch.Tensor:
        """The posterior mean z (d_z,) of a session: what steers generation."""
        return self._posteriors(state.clicks)[0][0].clone()  # a copy: the cached posterior stays as it is

    def z_at(self, point: Sequence[float]) -> torch.Tensor:
        """A z for a point on the behaviour map (manual steering)."""
        p = np.asarray(point, dtype=np.float64)
        if p.shape != (len(self.axes),) or not np.isfinite(p).all():
            raise SessionError(f"a map point needs {len(self.axes)} finite numbers ({', '.join(self.axes)})")
        return torch.as_tensor(self.map.to_z(np.clip(p, -1.5, 1.5)), dtype=torch.float32)

    # -- predictions -----------------------------------------------------------------------
    @torch.no_grad()
    def p_b(self, state: SessionState, rows: Sequence[int] | None = None, samples: bool = False):
        """Posterior-predictive P(B ≻ A) for pool rows (all by default): (R,), or (S, R) per z sample."""
        mean, std = self._posteriors(state.clicks)  # (1, d_z)
        idx = torch.arange(len(self.pool)) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
        g = torch.Generator().manual_seed(1234)
        z = mean + std * torch.randn(self.n_samples, *mean.shape[1:], generator=g)  # (S, d_z)
        feats = self._option_features()
        if feats is not None:  # bilinear head: r(x, z) = <h(x), u(z)> / sqrt(H), with h(x) computed once per pool
            ha, hb = feats[0][idx], feats[1][idx]  # (R, H)
            u = self.reward.z_proj(z)  # (S, H)
            logit = (u @ (hb - ha).T) / math.sqrt(ha.shape[-1])  # (S, R)
        else:
            xa, xb = self.emb_a[idx][None], self.emb_b[idx][None]  # (1, R, d)
            logit = self.reward.reward(xb, z) - self.reward.reward(xa, z)  # (S, R)
        p = torch.sigmoid(logit)
        return p.numpy() if samples else p.mean(0).numpy()

    @torch.no_grad()
    def _option_features(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The bilinear reward head's z-free half h(x) for every pool option, (P, H) each, computed
        on first use (None for other heads). Every prediction and the informative next pair need
        them for many pool rows at once, and they depend only on the shipped embeddings."""
        r = self.reward
        if not (r.cfg.is_np and r.cfg.decoder == "bilinear"):
            return None
        if self._feats is None:
            h = [r.option_mlp(r.encoder.normalize(e[None]))[0] for e in (self.emb_a, self.emb_b)]  # (P, H) each
            self._feats = (h[0], h[1])
        return self._feats

    # -- pair selection --------------------------------------------------------------------
    def candidates(self, state: SessionState) -> np.ndarray:
        seen = {c["pair"] for c in state.clicks}
        if state.current is not None:
            seen.add(state.current)
        left = np.array([i for i in range(len(self.pool)) if i not in seen], dtype=np.int64)
        if len(left) == 0:  # the pool is used up: start over, avoiding the pair on screen
            left = np.array([i for i in range(len(self.pool)) if i != state.current], dtype=np.int64)
        return left

    def next_pair(self, state: SessionState, mode: str | None = None) -> SessionState:
        """A new state with the next pair on screen: random, or the most informative one (the
        largest mutual information between the user's click and z under the posterior, BALD)."""
        mode = mode or state.mode
        if mode not in ("random", "informative"):
            raise SessionError(f"next-pair mode must be 'random' or 'informative', got {mode!r}")
        left = self.candidates(state)
        rng = np.random.default_rng([state.seed, state.draws])
        if mode == "random":
            pick = int(rng.choice(left))
        else:
            ps = self.p_b(state, left, samples=True)  # (S, R)
            info = click_information(ps)  # (R,)
            best = np.flatnonzero(info >= info.max() - 1e-9)
            pick = int(left[rng.choice(best)])
        return SessionState(clicks=list(state.clicks), current=pick, mode=mode, seed=state.seed, draws=state.draws + 1)

    def pair_view(self, state: SessionState) -> dict[str, Any]:
        """What the page shows for the current pair: {pair_id, prompt, a, b, p_a}."""
        if state.current is None:
            raise SessionError("no pair is on screen yet: ask for the next pair first")
        r = self.pool[state.current]
        p_a = 1.0 - float(self.p_b(state, [state.current])[0])
        return {"pair_id": r["id"], "prompt": r.get("prompt") or "", "a": r["a"], "b": r["b"], "p_a": p_a}

    # -- clicks ----------------------------------------------------------------------------
    def choose(self, state: SessionState, choice: str) -> SessionState:
        """Record "A", "B" or "skip" for the pair on screen (with the model's probability of that
        choice before the click). The caller then asks for the next pair."""
        if choice not in CHOICES:
            raise SessionError(f"choice must be one of {', '.join(repr(c) for c in CHOICES)}, got {choice!r}")
        if state.current is None:
            raise SessionError("there is no pair to choose on yet: ask for the next pair first")
        if len(state.clicks) >= MAX_CLICKS:
            raise SessionError(f"this session already has {MAX_CLICKS} clicks; reset or export it first")
        p_choice = None
        if choice != "skip":
            p_b = float(self.p_b(state, [state.current])[0])
            p_choice = p_b if choice == "B" else 1.0 - p_b
        click = {"pair": int(state.current), "choice": choice, "p_choice": p_choice}
        return SessionState(clicks=[*state.clicks, click], current=None, mode=state.mode, seed=state.seed,
                            draws=state.draws)

    @staticmethod
    def undo(state: SessionState) -> SessionState:
        """Take back the last click; its pair goes back on screen."""
        if not state.clicks:
            raise SessionError("nothing to undo")
        last = state.clicks[-1]
        return SessionState(clicks=list(state.clicks[:-1]), current=last["pair"], mode=state.mode, seed=state.seed,
                            draws=state.draws)

    @staticmethod
    def reset(state: SessionState) -> SessionState:
        return SessionState(mode=state.mode, seed=state.seed + 1)

    # -- simulated users (autopilot) ---------------------------------------------------------
    def simulate_choice(self, state: SessionState, weights: Sequence[float], temperature: float = 0.1,
                        rng: np.random.Generator | None = None) -> str:
        """A simulated user's click on the current pair: BTL on the gold attribute scores."""
        if state.current is None:
            raise SessionError("no pair on screen")
        r = self.pool[state.current]
        w = np.asarray(weights, dtype=np.float64)
        sa = np.array([r["attributes"]["a"][ax] for ax in self.axes])
        sb = np.array([r["attributes"]["b"][ax] for ax in self.axes])
        u = float(w @ (sb - sa))
        if temperature <= 0:
            return "B" if u > 0 else "A"
        p_b = 1.0 / (1.0 + math.exp(-max(min(u / temperature, 50.0), -50.0)))
        rng = rng or np.random.default_rng([state.seed, state.draws, 7])
        return "B" if rng.random() < p_b else "A"

    # -- profiles --------------------------------------------------------------------------
    def export_profile(self, state: SessionState, bundle_name: str = "") -> dict[str, Any]:
        lat = self.latent(state)
        return {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "bundle": bundle_name,
                "clicks": [{"pair_id": self.pool[c["pair"]]["id"], "choice": c["choice"]} for c in state.clicks],
                "map": lat["map"], "z": lat["z"], "mode": state.mode}

    def import_profile(self, data: str | bytes | dict[str, Any]) -> SessionState:
        """A new state from an exported profile. Anything malformed raises SessionError naming the problem."""
        if isinstance(data, (str, bytes)):
            size = len(data.encode("utf-8") if isinstance(data, str) else data)
            if size > MAX_PROFILE_BYTES:
                raise SessionError(f"profile is {size} bytes; the limit is {MAX_PROFILE_BYTES}")
            try:
                data = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SessionError(f"profile is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise SessionError("profile must be a JSON object")
        if data.get("format") != PROFILE_FORMAT:
            raise SessionError(f"profile 'format' must be {PROFILE_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != PROFILE_VERSION:
            raise SessionError(f"profile 'version' must be {PROFILE_VERSION}, got {data.get('version')!r}")
        clicks = data.get("clicks")
        if not isinstance(clicks, list):
            raise SessionError("profile 'clicks' must be a list")
        if len(clicks) > MAX_CLICKS:
            raise SessionError(f"profile has {len(clicks)} clicks; the limit is {MAX_CLICKS}")
        mode = data.get("mode", "informative")
        if mode not in ("random", "informative"):
            raise SessionError(f"profile 'mode' must be 'random' or 'informative', got {mode!r}")
        out: list[dict[str, Any]] = []
        for i, c in enumerate(clicks):
            if not isinstance(c, dict) or set(c) - {"pair_id", "choice"}:
                raise SessionError(f"profile click {i}: must be an object with 'pair_id' and 'choice' only")
            pid, ch = c.get("pair_id"), c.get("choice")
            if not isinstance(pid, str) or pid not in self.ids:
                raise SessionError(f"profile click {i}: pair_id {str(pid)[:80]!r} is not in this model's pool")
            if ch not in CHOICES:
                raise SessionError(f"profile click {i}: choice must be 'A', 'B' or 'skip', got {str(ch)[:20]!r}")
            out.append({"pair": self.ids[pid], "choice": ch, "p_choice": None})
        # replay to restore the model's before-click predictions
        state = SessionState(mode=mode)
        for c in out:
            state = self.choose(SessionState(clicks=state.clicks, current=c["pair"], mode=mode), c["choice"])
        return state
