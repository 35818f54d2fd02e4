"""Reward models over option embeddings: BTL, DPL and NP-BTL (deterministic and latent).

Choice convention (see core.losses): y = 1 means b preferred; logit = r_b − r_a.

- BTL: r(e) = MLP(e); one reward for everyone (a Borda count over hidden users).
- DPL: r(e) ~ N(μ(e), σ(e)²) with the exact probit likelihood Φ(Δμ / √(σ_a² + σ_b²)).
- NP-BTL: r(e, z) = MLP([MLP(e) ‖ z]) with z from the context encoder. The deterministic
  variant trains on −log p(y_T | z(C)). The latent variant trains on the neural-process ELBO
  E_{q(z|T)}[log p(y_T | z)] − β·KL(q(z|T) ‖ q(z|C)) and predicts with q(z | C) only.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.data.tasks import TaskBatch
from core.encoder import ContextEncoder, EncoderConfig, Gaussian, mlp
from core.losses import bernoulli_nll_from_prob, btl_nll, masked_mean, np_elbo_loss, probit_nll, probit_prob

MODELS = ("np-btl", "np-btl-latent", "btl", "dpl")


@dataclass
class RewardConfig:
    model: Literal["np-btl", "np-btl-latent", "btl", "dpl"]
    d_in: int  # option embedding width
    d_hidden: int = 128
    n_layers: int = 3  # depth of the reward MLPs
    encoder: EncoderConfig | None = None  # NP models; built from d_in and d_hidden when None
    kl_beta: float = 1.0  # latent NP-BTL: weight of KL(q(z|T) ‖ q(z|C))
    # NP models: how r(x, z) reads z. "concat": an MLP on [h(x) ‖ z] (the paper's); "bilinear":
    # ⟨h(x), W z + c⟩/√H, a user-specific linear read-out of learned option features, which
    # learns users who weigh several attributes far faster.
    decoder: Literal["concat", "bilinear"] = "concat"
    input_norm: bool = False  # NP models: standardise option embeddings (see EncoderConfig.input_norm)
    n_z_train: int = 4  # latent NP-BTL: samples of z per task in training
    n_z_eval: int = 32  # latent NP-BTL: samples of z for the posterior predictive
    dpl_min_std: float = 1e-3

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown reward model {self.model!r}; expected one of {', '.join(MODELS)}")
        if self.decoder not in ("concat", "bilinear"):
            raise ValueError(f"decoder must be 'concat' or 'bilinear', got {self.decoder!r}")
        if isinstance(self.encoder, dict):
            self.encoder = EncoderConfig(**self.encoder)
        if self.is_np and self.encoder is None:
            self.encoder = EncoderConfig(d_in=self.d_in, d_hidden=self.d_hidden, latent=self.model == "np-btl-latent")
        if self.input_norm and not self.is_np:
            raise ValueError(f"input_norm is for the NP models, not {self.model}")
        if self.is_np and self.encoder.input_norm != self.input_norm:
            self.encoder = EncoderConfig(**{**asdict(self.encoder), "input_norm": self.input_norm})
        if self.is_np and self.encoder.latent != (self.model == "np-btl-latent"):
            raise ValueError(f"{self.model}: encoder.latent must be {self.model == 'np-btl-latent'}")
        if self.is_np and self.encoder.d_in != self.d_in:
            raise ValueError(f"encoder.d_in ({self.encoder.d_in}) != d_in ({self.d_in})")

    @property
    def is_np(self) -> bool:
        return self.model.startswith("np-")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PairFeatures:
    """Embeddings gathered for one TaskBatch. B tasks, T targets, C context slots, d width."""

    target_a: torch.Tensor  # (B, T, d)
    target_b: torch.Tensor  # (B, T, d)
    target_choice: torch.Tensor  # (B, T)
    target_mask: torch.Tensor  # (B, T) bool
    unseen_mask: torch.Tensor  # (B, T) bool
    context_a: torch.Tensor  # (B, C, d)
    context_b: torch.Tensor  # (B, C, d)
    context_choice: torch.Tensor  # (B, C)
    context_mask: torch.Tensor  # (B, C) bool


def gather_features(batch: TaskBatch, emb_a: torch.Tensor, emb_b: torch.Tensor,
                    device: torch.device | str | None = None) -> PairFeatures:
    """emb_a, emb_b: (n_pairs, d) embeddings of every pair's options, indexed by the batch."""
    def to(x: torch.Tensor) -> torch.Tensor:
        return x.to(device) if device is not None else x
    return PairFeatures(
        target_a=to(emb_a[batch.target_idx]), target_b=to(emb_b[batch.target_idx]),
        target_choice=to(batch.target_choice), target_mask=to(batch.target_mask), unseen_mask=to(batch.unseen_mask),
        context_a=to(emb_a[batch.context_idx]), context_b=to(emb_b[batch.context_idx]),
        context_choice=to(batch.context_choice), context_mask=to(batch.context_mask),
    )


class PreferenceModel(nn.Module):
    """One class for the four reward models, selected by `cfg.model`."""

    def __init__(self, cfg: RewardConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.d_hidden
        if cfg.is_np:
            self.encoder = ContextEncoder(cfg.encoder)
            if cfg.decoder == "bilinear":
                self.option_mlp = mlp(cfg.d_in, H, H, cfg.n_layers)
                self.z_proj = nn.Linear(cfg.encoder.d_z, H)
            else:
                self.option_mlp = mlp(cfg.d_in, H, H, 2)
                self.decoder = mlp(H + cfg.encoder.d_z, H, 1, cfg.n_layers)
        else:
            self.encoder = None
            self.net = mlp(cfg.d_in, H, 2 if cfg.model == "dpl" else 1, cfg.n_layers + 1)

    # -- rewards ---------------------------------------------------------------------------
    def reward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """r(x, z). x: (B, M, d). z: (B, d_z) or samples (S, B, d_z) for NP models, else None.

        Returns (B, M), or (S, B, M) for sampled z. DPL returns its mean utility μ.
        """
        if not self.cfg.is_np:
            out = self.net(x)  # (B, M, 1 or 2)
            return out[..., 0]
        if z is None:
            raise ValueError(f"{self.cfg.model} needs a latent z (use .posterior() or .encoder.prior())")
        h = self.option_mlp(self.encoder.normalize(x))  # (B, M, H)
        if self.cfg.decoder == "bilinear":
            u = self.z_proj(z).unsqueeze(-2)  # (..., B, 1, H)
            return (h * u).sum(-1) / math.sqrt(h.shape[-1])  # (..., B, M)
        zz = z.unsqueeze(-2).expand(*z.shape[:-1], x.shape[-2], z.shape[-1])  # (..., B, M, d_z)
        h = h.expand(*zz.shape[:-1], h.shape[-1])  # (..., B, M, H)
        return self.decoder(torch.cat([h, zz], -1))[..., 0]  # (..., B, M)

    def dpl_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DPL utility mean and std. x: (B, M, d) -> 2 x (B, M)."""
        mu, s = self.net(x).unbind(-1)
        return mu, self.cfg.dpl_min_std + F.softplus(s)

    def posterior(self, f: PairFeatures) -> torch.Tensor | Gaussian:
        """z from the context (deterministic) or q(z | C) (latent)."""
        return self.encoder(f.context_a, f.context_b, f.context_choice, f.context_mask)

    # -- training --------------------------------------------------------------------------
    def forward(self, f: PairFeatures, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The training loss; forward() so that DDP wrappers see the call and sync gradients."""
        return self.loss(f, generator)

    def loss(self, f: PairFeatures, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss on all targets of each task (context included, as in the paper)."""
        cfg = self.cfg
        if cfg.model == "np-btl-latent":
            q_c = self.posterior(f)
            q_t = self.encoder(f.target_a, f.target_b, f.target_choice, f.target_mask)
            z = q_t.sample(cfg.n_z_train, generator)  # (S, B, d_z)
            logit = self.reward(f.target_b, z) - self.reward(f.target_a, z)  # (S, B, T)
            nll = btl_nll(logit, f.target_choice.expand_as(logit))  # (S, B, T)
            kl = q_t.kl(q_c)  # (B,)
            loss = np_elbo_loss(nll, f.target_mask, kl, cfg.kl_beta)
            return loss, {"loss": loss.item(), "nll": masked_mean(nll.mean(0), f.target_mask).item(),
                          "kl": kl.mean().item()}
        if cfg.model == "dpl":
            mu_a, sd_a = self.dpl_stats(f.target_a)
            mu_b, sd_b = self.dpl_stats(f.target_b)
            nll = probit_nll(mu_b - mu_a, sd_a.square() + sd_b.square(), f.target_choice)
        else:
            nll = btl_nll(self.logits(f), f.target_choice)  # (B, T)
        loss = masked_mean(nll, f.target_mask)
        return loss, {"loss": loss.item()}

    def logits(self, f: PairFeatures) -> torch.Tensor:
        """r_b − r_a for every target, (B, T): BTL, or NP-BTL with z(C) (latent: the mean of q(z|C))."""
        r_a, r_b = self.option_rewards(f)  # (B, T) each
        return r_b - r_a

    def option_rewards(self, f: PairFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """r_a and r_b of every target, (B, T) each, given the task's context as in logits()."""
        if self.cfg.model == "dpl":
            raise ValueError("DPL has no single reward; use predict()")
        z = None
        if self.cfg.is_np:
            z = self.posterior(f)
            if isinstance(z, Gaussian):
                z = z.mean
        return self.reward(f.target_a, z), self.reward(f.target_b, z)

    # -- prediction ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, f: PairFeatures, generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior predictive p(b ≻ a | context) for every target, (B, T). Uses q(z | C) only."""
        cfg = self.cfg
        if cfg.model == "dpl":
            mu_a, sd_a = self.dpl_stats(f.target_a)
            mu_b, sd_b = self.dpl_stats(f.target_b)
            return probit_prob(mu_b - mu_a, sd_a.square() + sd_b.square())
        if cfg.model == "np-btl-latent":
            z = self.posterior(f).sample(cfg.n_z_eval, generator)  # (S, B, d_z)
            logit = self.reward(f.target_b, z) - self.reward(f.target_a, z)  # (S, B, T)
            return torch.sigmoid(logit).mean(0)
        return torch.sigmoid(self.logits(f))

    @torch.no_grad()
    def evaluate(self, f: PairFeatures, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Per-target predictive NLL and correctness on unseen, non-tied targets.

        Returns nll (B, T), correct (B, T) float, scored (B, T) bool.
        """
        p = self.predict(f, generator)
        nll = bernoulli_nll_from_prob(p, f.target_choice)
        correct = ((p > 0.5) == (f.target_choice > 0.5)).float()
        scored = f.unseen_mask & f.target_mask & (f.target_choice != 0.5)
        return {"nll": nll, "correct": correct, "scored": scored, "p": p}


def config_from_dict(d: dict) -> RewardConfig:
    """RewardConfig from plain data; an encoder section inherits d_in, d_hidden and latent."""
    d = dict(d)
    enc = d.pop("encoder", None)
    names = set(RewardConfig.__dataclass_fields__)
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(names | {'encoder'})}")
    if isinstance(enc, dict) and str(d.get("model", "")).startswith("np-"):
        enc = {"d_in": d.get("d_in"), "d_hidden": d.get("d_hidden", RewardConfig.d_hidden),
               "latent": d.get("model") == "np-btl-latent", **enc}
    elif enc is not None and not str(d.get("model", "")).startswith("np-"):
        raise ValueError(f"{d.get('model')}: has no context encoder, but an encoder section was given")
    return RewardConfig(**d, encoder=EncoderConfig(**enc) if enc else None)


__all__ = ["MODELS", "RewardConfig", "PairFeatures", "PreferenceModel", "gather_features", "config_from_dict"]
