"""Pure loss functions. Convention everywhere: choice y = 1 means option b was preferred,
0 means a, 0.5 a tie; a "logit" is r_b − r_a, so p(b ≻ a) = σ(logit).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over positions where mask is True (0 when the mask is empty). Any matching shapes."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def btl_nll(logit: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood, elementwise.

    logit: (...,) r_b − r_a.  choice: (...,) in {0, 0.5, 1}.  Returns (...,).
    −[y·log σ(logit) + (1 − y)·log σ(−logit)]; a tie at zero margin costs log 2.
    """
    return F.binary_cross_entropy_with_logits(logit, choice.to(logit.dtype), reduction="none")


def probit_nll(mean_diff: torch.Tensor, var_sum: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Exact Gaussian-utility (Thurstone/probit) likelihood used by DPL, elementwise.

    With r_a ~ N(μ_a, σ_a²), r_b ~ N(μ_b, σ_b²) independent,
    p(b ≻ a) = Φ((μ_b − μ_a) / √(σ_a² + σ_b²)).
    mean_diff: (...,) μ_b − μ_a.  var_sum: (...,) σ_a² + σ_b² > 0.  choice: (...,).  Returns (...,).
    Uses log Φ (torch.special.log_ndtr), stable for large |t|.
    """
    t = mean_diff / var_sum.sqrt()
    y = choice.to(t.dtype)
    return -(y * torch.special.log_ndtr(t) + (1 - y) * torch.special.log_ndtr(-t))


def probit_prob(mean_diff: torch.Tensor, var_sum: torch.Tensor) -> torch.Tensor:
    """p(b ≻ a) under the probit model. Shapes as in `probit_nll`."""
    return torch.special.ndtr(mean_diff / var_sum.sqrt())


def gaussian_kl(mean_q: torch.Tensor, std_q: torch.Tensor, mean_p: torch.Tensor, std_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_q, diag std_q²) ‖ N(mean_p, diag std_p²)), summed over the last dim.

    All inputs (..., D); returns (...,).
    """
    var_q, var_p = std_q.square(), std_p.square()
    per_dim = torch.log(std_p / std_q) + (var_q + (mean_q - mean_p).square()) / (2 * var_p) - 0.5
    return per_dim.sum(-1)


def np_elbo_loss(target_nll: torch.Tensor, target_mask: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Negative neural-process ELBO per target pair, averaged over tasks.

    The ELBO of a task is E_{q(z|T)}[log p(y_T | z)] − β·KL(q(z|T) ‖ q(z|C)).
    target_nll: (S, B, T) NLL of each target under S samples z ~ q(z|T).
    target_mask: (B, T) bool.  kl: (B,) KL(q(z|T) ‖ q(z|C)).
    Returns a scalar: mean over tasks of (Σ_T E_S[nll] + β·KL) / N_T.
    """
    m = target_mask.to(target_nll.dtype)
    n_t = m.sum(-1).clamp_min(1.0)  # (B,)
    expected = (target_nll.mean(0) * m).sum(-1)  # (B,)
    return ((expected + beta * kl) / n_t).mean()


def bernoulli_nll_from_prob(p_b: torch.Tensor, choice: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """NLL of choices given predictive probabilities p(b ≻ a), elementwise (for MC predictives)."""
    p = p_b.clamp(eps, 1 - eps)
    y = choice.to(p.dtype)
    return -(y * p.log() + (1 - y) * (1 - p).log())


LOG2 = math.log(2.0)
