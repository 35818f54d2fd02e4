"""Context encoder: a set of (chosen, rejected) option embeddings -> the user latent z.

Per pair an MLP reads [e_chosen ‖ e_rejected]; masked multi-head self-attention mixes the
set; a mean (the paper's Eq. 5) or sum aggregates it; an MLP head gives z. The deterministic
variant (a conditional NP) returns z; the latent variant returns a Gaussian q(z | C) with a
floor on its scale. An empty context gives a learned prior. The output is invariant to the
order of the pairs and to padding.

Ties (choice 0.5) have no chosen side: a tie's pair feature is the average of both orders,
which is also what a 0/1 choice gives for its one order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.losses import gaussian_kl


def mlp(d_in: int, d_hidden: int, d_out: int, n_layers: int = 2, dropout: float = 0.0) -> nn.Sequential:
    """ReLU MLP with n_layers linear layers (n_layers >= 1)."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(n_layers - 1):
        layers += [nn.Linear(d, d_hidden), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = d_hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


@dataclass
class EncoderConfig:
    d_in: int  # option embedding width
    d_hidden: int = 128
    d_z: int = 32
    n_heads: int = 4
    n_attn_layers: int = 1  # 0 gives a plain Deep Set
    aggregate: Literal["mean", "sum"] = "mean"
    count_feature: bool = True  # append log(1 + N_C) to the aggregate (lets q(z|C) shrink with N_C)
    latent: bool = False
    min_std: float = 0.01  # floor on q(z | C)'s scale
    dropout: float = 0.0
    # Standardise option embeddings per dimension with fixed statistics of the training options
    # (buffers saved with the weights). Sentence embeddings are unit-norm and share a large common
    # direction; unscaled, the NP learns one preference direction and stalls on the others.
    input_norm: bool = False

    def __post_init__(self) -> None:
        if self.d_hidden % self.n_heads:
            raise ValueError(f"d_hidden ({self.d_hidden}) must be divisible by n_heads ({self.n_heads})")
        if self.aggregate not in ("mean", "sum"):
            raise ValueError(f"aggregate must be 'mean' or 'sum', got {self.aggregate!r}")


@dataclass
class Gaussian:
    """A diagonal Gaussian over z. mean, std: (B, D)."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised samples (n, B, D)."""
        eps = torch.randn((n, *self.mean.shape), generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def kl(self, other: "Gaussian") -> torch.Tensor:
        """KL(self ‖ other), (B,)."""
        return gaussian_kl(self.mean, self.std, other.mean, other.std)


class MaskedSelfAttention(nn.Module):
    """Pre-norm transformer block over a set with a key-padding mask (no positions)."""

    def __init__(self, d: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ff = mlp(d, 2 * d, d, 2, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape  # x: (B, N, D), mask: (B, N) True = real pair
        h = self.norm1(x)
        q, k, v = self.qkv(h).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hd)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D // self.n_heads)  # (B, nh, N, N)
        # A finite fill keeps rows with no real keys (empty context) NaN-free; their output is
        # never aggregated. For real rows, padded keys get weight exp(min - max) = 0 exactly.
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        att = scores.softmax(-1) @ v  # (B, nh, N, hd)
        x = x + self.proj(att.transpose(1, 2).reshape(B, N, D))
        return x + self.ff(self.norm2(x))


class ContextEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.d_hidden
        self.pair_mlp = mlp(2 * cfg.d_in, H, H, 2, cfg.dropout)
        self.blocks = nn.ModuleList(MaskedSelfAttention(H, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_attn_layers))
        self.norm = nn.LayerNorm(H) if cfg.n_attn_layers else nn.Identity()
        d_out = 2 * cfg.d_z if cfg.latent else cfg.d_z
        self.head = mlp(H + int(cfg.count_feature), H, d_out, 2, cfg.dropout)
        # The learned prior: what an empty context gives.
        self.prior_mean = nn.Parameter(torch.zeros(cfg.d_z))
        self.prior_std_raw = nn.Parameter(torch.zeros(cfg.d_z)) if cfg.latent else None
        if cfg.input_norm:
            self.register_buffer("in_mean", torch.zeros(cfg.d_in))
            self.register_buffer("in_std", torch.ones(cfg.d_in))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix the standardisation statistics (d_in,) each; needs cfg.input_norm."""
        if not self.cfg.input_norm:
            raise ValueError("this encoder was built without input_norm")
        self.in_mean.copy_(mean)
        self.in_std.copy_(std.clamp_min(1e-6))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.in_mean) / self.in_std if self.cfg.input_norm else x

    def _std(self, raw: torch.Tensor) -> torch.Tensor:
        return self.cfg.min_std + F.softplus(raw)

    def pair_features(self, a: torch.Tensor, b: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """a, b: (B, N, d) option embeddings; choice: (B, N), 1 = b preferred. Returns (B, N, H).

        The feature is (1 - y) · mlp[a ‖ b] + y · mlp[b ‖ a]. A decided pair (y = 0 or 1) needs only
        its own order, so the MLP runs once on [chosen ‖ rejected]; the other order is computed only
        when the batch holds a tie (or any y strictly between 0 and 1)."""
        a, b = self.normalize(a), self.normalize(b)
        y = choice.to(a.dtype).unsqueeze(-1)  # (B, N, 1)
        b_won = y > 0.5  # (B, N, 1)
        first, second = torch.where(b_won, b, a), torch.where(b_won, a, b)  # 2 x (B, N, d)
        x = self.pair_mlp(torch.cat([first, second], -1))  # (B, N, H): [chosen ‖ rejected]
        decided = (y == 0) | (y == 1)  # (B, N, 1)
        if bool(decided.all()):
            return x
        flipped = self.pair_mlp(torch.cat([second, first], -1))  # (B, N, H): the other order
        a_first, b_first = torch.where(b_won, flipped, x), torch.where(b_won, x, flipped)  # [a ‖ b], [b ‖ a]
        return torch.where(decided, x, (1 - y) * a_first + y * b_first)

    def forward(self, a: torch.Tensor, b: torch.Tensor, choice: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | Gaussian:
        """Encode a batch of context sets.

        a, b: (B, N, d); choice: (B, N) in {0, 0.5, 1}; mask: (B, N) bool, True = real pair.
        Returns z (B, d_z) for the deterministic encoder, or Gaussian q(z | C) for the latent one.
        """
        B = a.shape[0]
        x = self.pair_features(a, b, choice)  # (B, N, H)
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.norm(x)
        m = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
        n = m.sum(1)  # (B, 1)
        agg = (x * m).sum(1)  # (B, H)
        if self.cfg.aggregate == "mean":
            agg = agg / n.clamp_min(1.0)
        if self.cfg.count_feature:
            agg = torch.cat([agg, torch.log1p(n)], -1)  # (B, H + 1)
        out = self.head(agg)  # (B, d_z) or (B, 2 d_z)
        empty = n == 0  # (B, 1)
        if not self.cfg.latent:
            return torch.where(empty, self.prior_mean.expand(B, -1), out)
        mean, raw = out.chunk(2, -1)  # 2 x (B, d_z)
        mean = torch.where(empty, self.prior_mean.expand(B, -1), mean)
        raw = torch.where(empty, self.prior_std_raw.expand(B, -1), raw)
        return Gaussian(mean, self._std(raw))

    def prior(self, batch_size: int = 1) -> torch.Tensor | Gaussian:
        """What an empty context gives, for `batch_size` rows."""
        mean = self.prior_mean.expand(batch_size, -1)
        if not self.cfg.latent:
            return mean
        return Gaussian(mean, self._std(self.prior_std_raw).expand(batch_size, -1))
