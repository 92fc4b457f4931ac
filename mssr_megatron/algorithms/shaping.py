"""MSSR's entropy-based advantage shaping (after Cheng et al., arXiv 2506.14758).

    A_t = A~ + psi_t,   psi_t = min(alpha * H_t, |A~| / kappa)     (H_t detached; published alpha = 0.4, kappa = 2)

psi >= 0 and psi <= |A~| / kappa, so with kappa >= 1 shaping never flips an advantage's sign: a positive advantage
grows, a negative one shrinks by at most 1 / kappa of its size. H_t is either the full-vocabulary entropy of the
policy at token t (the paper, default) or the sampled-token surrogate -p(o_t) log p(o_t) (MSSR's released code).
"""

from __future__ import annotations

import torch

ENTROPY_SOURCES = ("full", "sampled")


def sampled_token_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Surrogate entropy -p log p of each sampled token, from its log-prob. [B, T] -> [B, T]"""
    lp = logprobs.detach()
    return -torch.exp(lp) * lp


def shaping_entropy(source: str, *, full_entropy: torch.Tensor | None, logprobs: torch.Tensor | None) -> torch.Tensor:
    """The per-token entropy that drives shaping, detached. [B, T]"""
    if source == "full":
        if full_entropy is None:
            raise ValueError("entropy_source='full' needs the full-vocabulary entropy from the log-prob op")
        return full_entropy.detach()
    if source == "sampled":
        if logprobs is None:
            raise ValueError("entropy_source='sampled' needs the sampled tokens' log-probs")
        return sampled_token_entropy(logprobs)
    raise ValueError(f"unknown entropy source {source!r}; choose one of {ENTROPY_SOURCES}")


def shape_advantages(
    advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, alpha: float, kappa: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Shaped per-token advantages and shaping metrics.

    advantages: [B, T] (or [B], broadcast over tokens), entropy: [B, T], mask: [B, T].
    Returns ([B, T] float32, zero outside the mask; metrics).
    """
    if kappa <= 0:
        raise ValueError(f"shaping kappa must be positive, got {kappa}")
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    adv = adv.detach().to(torch.float32).expand_as(entropy)
    m = mask.to(torch.float32)
    bonus = alpha * entropy.detach().to(torch.float32)
    cap = adv.abs() / kappa
    psi = torch.minimum(bonus, cap)
    shaped = (adv + psi) * m
    count = m.sum().clamp(min=1.0)
    metrics = {
        "shaping/psi_mean": float((psi * m).sum() / count),
        "shaping/capped_frac": float(((bonus > cap).float() * m).sum() / count),
        "shaping/entropy_mean": float((entropy.detach().float() * m).sum() / count),
    }
    return shaped, metrics
