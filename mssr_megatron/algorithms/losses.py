"""Policy-gradient losses, KL estimators, loss aggregation, entropy and cross-modal regularisers.

Shapes: B rollouts x T response tokens; every per-token tensor is [B, T] and `mask` [B, T] marks response tokens.
Aggregation modes (how per-token losses become one scalar):
  token-mean           sum over all tokens / number of tokens            (MSSR, DAPO)
  seq-mean-token-mean  mean over sequences of each sequence's token mean  (GRPO paper)
  seq-mean-token-sum   mean over sequences of each sequence's token sum   (Dr. GRPO style)
A sequence with no response token carries no loss and does not count. `normalizer` replaces the denominator (the
number of tokens, or of sequences, in the whole mini-batch across micro-batches and data-parallel ranks) so that
gradient accumulation over micro-batches gives the same gradient as one big batch.

A registered policy loss is called as f(logprobs, old_logprobs, advantages, mask, cfg, normalizer, token_weights) and
returns (scalar, metrics); `token_weights` [B, T] (or None) multiplies its per-token loss before aggregation: the
rollout correction (`tis_weights`) enters there, so it reaches the policy-gradient term only.
"""

from __future__ import annotations

from typing import Callable

import torch

from mssr_megatron.registry import Registry

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
ROLLOUT_CORRECTIONS = ("none", "tis")
_MAX_LOG_RATIO = 20.0  # exp(20) ~ 5e8: keeps k3 finite when a token's log-prob collapses


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float | None = None) -> torch.Tensor:
    """One scalar from per-token values [B, T] under `mode`; 0 (with zero gradient) when nothing is selected."""
    m = mask.to(values.dtype)
    if mode == "token-mean":
        total, count = (values * m).sum(), m.sum()
    elif mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        tokens = m.sum(-1)
        per_seq = (values * m).sum(-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / tokens.clamp(min=1.0)
        total, count = per_seq.sum(), (tokens > 0).to(values.dtype).sum()
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose one of {', '.join(LOSS_AGG_MODES)}")
    denominator = count.clamp(min=1.0) if normalizer is None else max(float(normalizer), 1.0)
    return total / denominator


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Token mean of a detached tensor over the mask, as a float for metrics (0 when the mask is empty)."""
    m = mask.to(torch.float64)
    return float((values.detach().to(torch.float64) * m).sum() / m.sum().clamp(min=1.0))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs. [B, T]

    k1 = log r,  k2 = (log r)^2 / 2,  k3 = exp(-log r) + log r - 1   with  log r = logp - logp_ref.
    k3 (Schulman's low-variance estimator, MSSR's default) is >= 0 and unbiased for KL(pi || pi_ref) under pi.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def ppo_clip_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-level PPO-clip loss with asymmetric clip range and optional dual clip. All [B, T].

    loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - logp_old);
    for A < 0 the dual clip further bounds it: min(loss, -A * dual_clip) (Ye et al. 2020).
    Returns (loss, clipped: the clip term was the active one, dual_clipped: the dual bound was active).
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    dual_clipped = torch.zeros_like(clipped)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (loss > bound)
        loss = torch.where(dual_clipped, bound, loss)
    return loss, clipped, dual_clipped


POLICY_LOSSES: Registry[Callable] = Registry("policy loss")


def tis_weights(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance-sampling weights of the engine's samples for the trainer's policy. [B, T]

    w_t = min(exp(logp_old_t - logp_rollout_t), cap), detached (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): the rollouts were sampled by the engine, whose log-probs differ from the
    trainer's (bf16, other kernels), so the on-policy gradient needs the ratio pi_trainer / pi_engine; truncating it at
    `cap` bounds the variance a token the engine found unlikely would add. 0 where `mask` is off (prompt, padding: no
    rollout log-prob there). Metrics: the token mean of w and the share of tokens whose ratio was over the cap.
    """
    ratio = torch.exp(old_logprobs.detach() - rollout_logprobs.detach())  # -inf rollout log-prob: inf, capped below
    on = mask.bool()
    weights = torch.where(on, ratio.clamp(max=cap), torch.zeros_like(ratio))  # where: masked values may be inf/NaN
    metrics = {
        "actor/tis_weight_mean": masked_mean(weights, on),
        "actor/tis_capped_frac": masked_mean((on & (ratio > cap)).float(), on),
    }
    return weights, metrics


def _weighted(loss: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """The per-token loss times the rollout-correction weights; unchanged (the same tensor) without them."""
    return loss if token_weights is None else loss * token_weights


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, cfg, normalizer=None, token_weights=None):
    """PPO-clip (clip-higher, dual-clip) aggregated by cfg.loss_agg_mode. Returns (scalar, metrics)."""
    loss, clipped, dual = ppo_clip_token_loss(
        logprobs, old_logprobs, advantages, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.dual_clip
    )
    log_ratio = (logprobs - old_logprobs).detach()
    metrics = {
        "actor/pg_clipfrac": masked_mean(clipped.float(), mask),
        "actor/pg_clipfrac_dual": masked_mean(dual.float(), mask),
        "actor/ratio_mean": masked_mean(torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO)), mask),
        "actor/ppo_kl": masked_mean(-log_ratio, mask),
    }
    return aggregate(_weighted(loss, token_weights), mask, cfg.loss_agg_mode, normalizer), metrics


@POLICY_LOSSES.register("reinforce")
def reinforce_loss(logprobs, old_logprobs, advantages, mask, cfg, normalizer=None, token_weights=None):
    """Unclipped importance-weighted policy gradient, -A * exp(logp - logp_old). Returns (scalar, metrics)."""
    ratio = torch.exp((logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    metrics = {"actor/ratio_mean": masked_mean(ratio, mask)}
    return aggregate(_weighted(-advantages * ratio, token_weights), mask, cfg.loss_agg_mode, normalizer), metrics


def crossmodal_kl(logits_with_image: torch.Tensor, logits_text_only: torch.Tensor, temperature: float = 1.0):
    """Per-token KL(pi(.|text, image) || pi(.|text)) over the full vocabulary, differentiable in both inputs.

    logits_*: [B, T, V] at the same response positions (the text-only pass drops the image tokens from the prompt).
    Returns [B, T]. The released MSSR code computed this under no_grad and never added it; here it is a real loss term.
    """
    dtype = torch.promote_types(logits_with_image.dtype, torch.float32)  # bf16 logits are summed in fp32
    log_p = torch.log_softmax(logits_with_image.to(dtype) / temperature, dim=-1)
    log_q = torch.log_softmax(logits_text_only.to(dtype) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


ENTROPY_LOSS_SOURCES = ("full", "sampled")


def entropy_loss_term(source: str, *, entropy: torch.Tensor | None, logprobs: torch.Tensor) -> torch.Tensor:
    """The per-token entropy the entropy loss maximises, WITH its gradient. [B, T]

    full: the full-vocabulary entropy H_t from the log-prob op; sampled: -p log p of the sampled token, p = exp(logp_t)
    (the released code's entropy-loss ablation; at most 1/e per token, d/d logp = -p (1 + logp))."""
    if source == "full":
        if entropy is None:
            raise ValueError("entropy_coef is set with entropy_loss_source=full but no per-token entropy was given")
        return entropy
    if source == "sampled":
        return -torch.exp(logprobs) * logprobs
    raise ValueError(f"unknown entropy loss source {source!r}; choose one of {', '.join(ENTROPY_LOSS_SOURCES)}")


def compute_policy_loss(
    cfg,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    rollout_logprobs: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    crossmodal: torch.Tensor | None = None,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The full actor loss of one micro-batch:

        pg_loss + kl_loss_coef * KL(pi || ref) - entropy_coef * H + crossmodal_coef * KL(pi(.|x, img) || pi(.|x))

    every term aggregated with cfg.loss_agg_mode (H: `entropy_loss_term`, by cfg.entropy_loss_source). logprobs / entropy / crossmodal carry gradient; old_logprobs,
    ref_logprobs, rollout_logprobs and advantages are treated as constants. All per-token inputs are [B, T].
    With cfg.rollout_correction = "tis" the per-token pg_loss is weighted by `tis_weights` (from the rollout engine's
    log-probs, `rollout_logprobs`); the KL, entropy and cross-modal terms are not. Returns (scalar, metrics).
    """
    advantages = advantages.detach()
    old_logprobs = old_logprobs.detach()
    weights, metrics = None, {}
    if cfg.rollout_correction == "tis":
        if rollout_logprobs is None:
            raise ValueError("algorithm.rollout_correction=tis but no rollout log-probs were given")
        weights, metrics = tis_weights(old_logprobs, rollout_logprobs, mask, cfg.tis_cap)
    elif cfg.rollout_correction != "none":
        raise ValueError(f"unknown rollout correction {cfg.rollout_correction!r}; "
                         f"choose one of {', '.join(ROLLOUT_CORRECTIONS)}")
    loss, pg_metrics = POLICY_LOSSES.get(cfg.policy_loss)(logprobs, old_logprobs, advantages, mask, cfg, normalizer,
                                                          token_weights=weights)
    metrics.update(pg_metrics)
    metrics["actor/pg_loss"] = float(loss.detach())
    mode = cfg.loss_agg_mode
    if cfg.use_kl_loss and cfg.kl_loss_coef != 0.0:
        if ref_logprobs is None:
            raise ValueError("use_kl_loss is set but no reference log-probs were given")
        kl = kl_penalty(logprobs, ref_logprobs.detach(), cfg.kl_estimator)
        kl_loss = aggregate(kl, mask, mode, normalizer)
        loss = loss + cfg.kl_loss_coef * kl_loss
        metrics["actor/kl_loss"] = masked_mean(kl, mask)
    if cfg.entropy_coef != 0.0:
        bonus = entropy_loss_term(cfg.entropy_loss_source, entropy=entropy, logprobs=logprobs)
        loss = loss - cfg.entropy_coef * aggregate(bonus, mask, mode, normalizer)
        metrics["actor/entropy_loss_term"] = masked_mean(bonus, mask)
    if entropy is not None:
        metrics["actor/entropy"] = masked_mean(entropy, mask)
    if cfg.crossmodal_coef != 0.0:
        if crossmodal is None:
            raise ValueError("crossmodal_coef is set but no cross-modal KL was given")
        loss = loss + cfg.crossmodal_coef * aggregate(crossmodal, mask, mode, normalizer)
        metrics["actor/crossmodal_kl"] = masked_mean(crossmodal, mask)
    return loss, metrics
