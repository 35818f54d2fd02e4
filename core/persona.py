"""Persona bundles: one folder with everything the demo and the steering experiment need.

    bundle.json          manifest (kind "persona"): recipe, axes, archetypes, decoding, sha256 of every file
    reward/              NP-BTL (latent) reward bundle: q(z | C) and r(x, z)
    policy/              NP-DPO policy bundle (LoRA + FiLM + the same, frozen, context encoder)
    dpo/                 the unconditioned DPO baseline (LoRA only), same base
    base/                the base LM when it is not a package (persona-tiny); both policies share it
    map.json             the behaviour map z -> axes and its inverse, with archetype anchors
    pool.jsonl           candidate pairs for the demo (JSONL contract) ...
    pool.safetensors     ... with their option embeddings {"a": (P, d), "b": (P, d)}

`BehaviourMap` is pure math on z; `load_persona_bundle` checks every hash before parsing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from core.bundle import BundleError, load_bundle_tensors, load_reward_bundle, read_file_checked, read_manifest


@dataclass
class BehaviourMap:
    """Affine map from the latent z to behaviour axes, fitted by least squares on simulated users.

    point = weight @ z + bias, projected onto the box `bounds` when it is set (the behaviour
    space: user weights lie in [-1, 1] on every axis, so a point outside is never a better
    guess than the nearest point inside); `to_z` is the regression the other way (the typical
    z of a user at that point), used for manual steering.
    """

    axes: list[str]
    weight: np.ndarray  # (A, d_z)
    bias: np.ndarray  # (A,)
    inv_weight: np.ndarray  # (d_z, A)
    inv_bias: np.ndarray  # (d_z,)
    axis_labels: dict[str, list[str]] = field(default_factory=dict)
    anchors: dict[str, list[float]] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    bounds: list[float] | None = None  # [lo, hi] of every axis; None: unbounded

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64)
        self.inv_weight = np.asarray(self.inv_weight, dtype=np.float64)
        self.inv_bias = np.asarray(self.inv_bias, dtype=np.float64)
        A = len(self.axes)
        if self.weight.ndim != 2 or self.weight.shape[0] != A:
            raise ValueError(f"map weight must be ({A}, d_z), got {self.weight.shape}")
        d_z = self.weight.shape[1]
        for name, arr, shape in (("bias", self.bias, (A,)), ("inv_weight", self.inv_weight, (d_z, A)),
                                 ("inv_bias", self.inv_bias, (d_z,))):
            if arr.shape != shape:
                raise ValueError(f"map {name} must have shape {shape}, got {arr.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"map {name} has non-finite values")
        if self.bounds is not None:
            try:
                lo, hi = (float(v) for v in self.bounds)
                ok = bool(np.isfinite([lo, hi]).all() and lo < hi)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"map bounds must be two finite numbers lo < hi, got {self.bounds!r}")
            self.bounds = [lo, hi]
        for k, v in self.anchors.items():
            if len(v) != A:
                raise ValueError(f"map anchor {k!r} has {len(v)} coordinates, expected {A}")

    @property
    def d_z(self) -> int:
        return int(self.weight.shape[1])

    def __call__(self, z: np.ndarray | torch.Tensor) -> np.ndarray:
        """z (..., d_z) -> points (..., A)."""
        z = z.detach().cpu().double().numpy() if isinstance(z, torch.Tensor) else np.asarray(z, dtype=np.float64)
        p = z @ self.weight.T + self.bias  # (..., A)
        return p if self.bounds is None else np.clip(p, *self.bounds)

    def cov(self, std: np.ndarray | torch.Tensor) -> np.ndarray:
        """The map-space covariance W diag(std²) Wᵀ of a diagonal Gaussian: std (..., d_z) -> (..., A, A)."""
        s = std.detach().cpu().double().numpy() if isinstance(std, torch.Tensor) else np.asarray(std, dtype=np.float64)
        return np.einsum("ad,...d,bd->...ab", self.weight, s ** 2, self.weight)

    def to_z(self, point: Sequence[float] | np.ndarray) -> np.ndarray:
        """points (..., A) -> z (..., d_z)."""
        p = np.asarray(point, dtype=np.float64)
        if p.shape[-1] != len(self.axes):
            raise ValueError(f"a map point has {len(self.axes)} coordinates ({', '.join(self.axes)}), got {p.shape[-1]}")
        return p @ self.inv_weight.T + self.inv_bias  # (..., d_z)

    def to_dict(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "axis_labels": self.axis_labels, "weight": self.weight.tolist(),
                "bias": self.bias.tolist(), "inv_weight": self.inv_weight.tolist(), "inv_bias": self.inv_bias.tolist(),
                "anchors": self.anchors, "fit": self.fit, "bounds": self.bounds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BehaviourMap":
        missing = [k for k in ("axes", "weight", "bias", "inv_weight", "inv_bias") if k not in d]
        if missing:
            raise ValueError(f"map is missing {', '.join(missing)}")
        return cls(axes=list(d["axes"]), weight=d["weight"], bias=d["bias"], inv_weight=d["inv_weight"],
                   inv_bias=d["inv_bias"], axis_labels=dict(d.get("axis_labels", {})),
                   anchors={k: list(v) for k, v in d.get("anchors", {}).items()}, fit=dict(d.get("fit", {})),
                   bounds=d.get("bounds"))


def fit_map(z: np.ndarray, w: np.ndarray, axes: Sequence[str], method: str = "calibration",
            ridge: float = 1e-3, **extra: Any) -> BehaviourMap:
    """Fit the maps between latents z (N, d_z) and the users' axis weights w (N, A).

    The inverse map is the least-squares regression z ≈ A w + c. The forward map is either
    "calibration" (default): the generalised-least-squares solution of that regression for w,
    map(z) = (Aᵀ Σ⁻¹ A)⁻¹ Aᵀ Σ⁻¹ (z − c) with Σ the residual covariance. It does not shrink users
    towards the middle, so a confident archetype lands on its corner, and map(to_z(p)) = p.
    Or "regression": least squares of w on z, E[w | z], which shrinks uncertain users inwards.
    """
    z = np.asarray(z, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    xw = np.concatenate([w, np.ones((len(w), 1))], 1)  # (N, A + 1)
    inv, *_ = np.linalg.lstsq(xw, z, rcond=None)  # (A + 1, d_z)
    A_, c = inv[:-1].T, inv[-1]  # (d_z, A), (d_z,)
    if method == "calibration":
        r = z - xw @ inv  # (N, d_z)
        cov = np.cov(r, rowvar=False) + ridge * np.eye(z.shape[1])  # (d_z, d_z)
        ci = np.linalg.inv(cov)
        M = np.linalg.solve(A_.T @ ci @ A_, A_.T @ ci)  # (A, d_z)
        weight, bias = M, -M @ c
    elif method == "regression":
        xz = np.concatenate([z, np.ones((len(z), 1))], 1)  # (N, d_z + 1)
        fwd, *_ = np.linalg.lstsq(xz, w, rcond=None)  # (d_z + 1, A)
        weight, bias = fwd[:-1].T, fwd[-1]
    else:
        raise ValueError(f"method must be 'calibration' or 'regression', got {method!r}")
    fit = extra.pop("fit", {})
    m = BehaviourMap(axes=list(axes), weight=weight, bias=bias, inv_weight=A_, inv_bias=c, **extra)
    resid = w - m(z)  # (N, A), with the map's own bounds
    m.fit = {"users": int(len(z)), "method": method, "rmse": float(np.sqrt((resid ** 2).mean())),
             "r2": [float(1 - resid[:, i].var() / max(w[:, i].var(), 1e-12)) for i in range(w.shape[1])],
             "bias": [float(v) for v in resid.mean(0) * -1], **fit}
    return m


def simulate_contexts(pairs, emb: tuple[torch.Tensor, torch.Tensor], users: np.ndarray, n_context: int,
                      rows: np.ndarray, temperature: float, rng: np.random.Generator):
    """Context sets for simulated users (U, A): each draws n_context distinct pairs from `rows` and
    clicks by BTL on the gold attributes. Returns option embeddings a, b (U, C, d), choices and mask (U, C)."""
    from core.data.personas import AXES

    names = [pairs.attribute_names.index(a) for a in AXES]
    attrs = pairs.attributes[:, :, names]  # (n, 2, A)
    idx = np.stack([rng.choice(rows, n_context, replace=False) for _ in range(len(users))])  # (U, C)
    u = ((attrs[idx, 1] - attrs[idx, 0]) * users[:, None, :]).sum(-1)  # (U, C)
    p_b = 1 / (1 + np.exp(-np.clip(u / max(temperature, 1e-6), -50, 50)))
    choice = (rng.random(u.shape) < p_b).astype(np.float32)
    t = torch.from_numpy(idx)
    return emb[0][t], emb[1][t], torch.from_numpy(choice), torch.ones(t.shape, dtype=torch.bool)


@dataclass(frozen=True)
class Decoding:
    """The bundle's decoding settings, which the demo and the steering experiment share.

    Greedy decoding of a small policy falls into loops ("out out out ..."); CTRL's repetition
    penalty (> 1) keeps most answers out of them. A bundle without the entry decodes plainly.
    """

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    @classmethod
    def from_dict(cls, d: Any, where: str = "decoding") -> "Decoding":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected an object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"repetition_penalty", "no_repeat_ngram_size"})
        if unknown:
            raise BundleError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        rp, ng = d.get("repetition_penalty", 1.0), d.get("no_repeat_ngram_size", 0)
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not (math.isfinite(rp) and rp > 0):
            raise BundleError(f"{where}: repetition_penalty must be a number > 0, got {rp!r}")
        if isinstance(ng, bool) or not isinstance(ng, int) or ng < 0:
            raise BundleError(f"{where}: no_repeat_ngram_size must be a whole number ≥ 0, got {ng!r}")
        return cls(float(rp), ng)

    def to_dict(self) -> dict[str, Any]:
        """The bundle.json entry; also `SteerablePolicy.generate`'s keyword arguments."""
        return {"repetition_penalty": self.repetition_penalty, "no_repeat_ngram_size": self.no_repeat_ngram_size}


@dataclass
class PersonaBundle:
    path: Path
    meta: dict[str, Any]
    reward: Any  # core.reward.PreferenceModel (np-btl-latent)
    map: BehaviourMap
    pool: list[dict[str, Any]]
    pool_emb: tuple[torch.Tensor, torch.Tensor]  # (P, d) each
    policy: Any = None  # core.policy.SteerablePolicy (NP-DPO), when loaded
    dpo: Any = None  # the DPO baseline, when loaded
    decoding: Decoding = field(default_factory=Decoding)  # bundle.json `decoding`

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def axes(self) -> list[str]:
        return list(self.map.axes)

    @property
    def archetypes(self) -> dict[str, list[float]]:
        return dict(self.map.anchors)



def _sub_manifest_ok(path: Path, sub: str, meta: dict[str, Any]) -> None:
    names = [n for n in meta["files"] if n.startswith(sub + "/")]
    if f"{sub}/bundle.json" not in names:
        raise BundleError(f"{path}: {sub}/ is not in the bundle manifest")


def load_persona_bundle(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        policy: bool = True, dpo: bool = True) -> PersonaBundle:
    """Load a persona bundle. Every file's sha256 is checked against the manifest first.

    policy / dpo: whether to load the language models (the reward model, map and pool are
    always loaded; they are small).
    """
    path = Path(path)
    meta = read_manifest(path)
    if meta.get("kind") != "persona":
        raise BundleError(f"{path}: bundle kind is {meta.get('kind')!r}, expected 'persona'")
    for name in meta["files"]:
        read_file_checked(path, name, meta)
    for sub in ("reward", "policy") + (("dpo",) if dpo else ()):
        _sub_manifest_ok(path, sub, meta)
    decoding = Decoding.from_dict(meta.get("decoding"), f"{path}/bundle.json: decoding")
    reward, _ = load_reward_bundle(path / "reward")
    reward.eval()
    try:
        mp = BehaviourMap.from_dict(json.loads(read_file_checked(path, "map.json", meta)))
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: map.json: {e}") from None
    d_z = reward.encoder.cfg.d_z
    if mp.d_z != d_z:
        raise BundleError(f"{path}: map.json is for d_z={mp.d_z}, the reward model's z has {d_z} dimensions")
    from core.data.pairs import PairsFormatError, pairs_from_records

    text = read_file_checked(path, "pool.jsonl", meta).decode("utf-8")
    pool = [json.loads(line) for line in text.splitlines() if line.strip()]
    try:
        pairs_from_records(pool, source=f"{path}/pool.jsonl")  # validates the contract
    except PairsFormatError as e:
        raise BundleError(str(e)) from None
    pe = load_bundle_tensors(path, "pool", meta)
    if set(pe) != {"a", "b"} or pe["a"].shape != pe["b"].shape or len(pe["a"]) != len(pool):
        raise BundleError(f"{path}: pool.safetensors must hold 'a' and 'b' of shape ({len(pool)}, d), "
                          f"got {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in pe.items())}}}")
    if pe["a"].shape[1] != reward.cfg.d_in:
        raise BundleError(f"{path}: pool embeddings are {pe['a'].shape[1]}-d, the reward model reads {reward.cfg.d_in}-d")
    out = PersonaBundle(path=path, meta=meta, reward=reward, map=mp, pool=pool, pool_emb=(pe["a"], pe["b"]),
                        decoding=decoding)
    base_dir = path / "base" if "base/config.json" in meta["files"] else None
    from core.bundle import load_policy_bundle

    if policy:
        out.policy, _ = load_policy_bundle(path / "policy", device, dtype, base_dir=base_dir)
    if dpo:
        out.dpo, _ = load_policy_bundle(path / "dpo", device, dtype, base_dir=base_dir)
    return out


def default_bundle_dir(root: str | os.PathLike | None = None) -> Path:
    """assets/models/persona-smol when SmolLM2 can be loaded without a download, else persona-tiny."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent / "assets" / "models"
    smol = root / "persona-smol"
    if smol.is_dir():
        from core.basemodels import smollm2_available

        if smollm2_available():
            return smol
    return root / "persona-tiny"

