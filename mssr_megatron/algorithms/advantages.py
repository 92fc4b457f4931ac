"""Advantage estimators, one registry: mssr, mvsr, grpo, drgrpo, rloo, reinforce_pp.

Every estimator is a pure function of tensors (plus config scalars) with the signature

    estimator(batch: AdvantageBatch, cfg, group=None) -> torch.Tensor   # [B] per rollout or [B, T] per token

and `compute_advantages` broadcasts the result to tokens, masks it and adds metrics. `cfg` is an
`AlgorithmConfig` (or anything with the same attributes); `group` is the data-parallel process group over which
"global batch" statistics are taken (None: the local batch is the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mssr_megatron.algorithms.distributed import masked_moments
from mssr_megatron.registry import Registry


@dataclass
class AdvantageBatch:
    """What an estimator sees of one RL step's rollouts (B rollouts, T response tokens).

    rewards: [B] float, the verified reward of each rollout (0/1 for MSSR's Beta baseline).
    response_mask: [B, T] bool/0-1, the response tokens that carry loss.
    group_index: [B] int, equal values mark rollouts of the same prompt (group estimators); None when n = 1.
    baseline: [B] float, the per-prompt Beta baseline v(x) read BEFORE this step's tracker update (mssr, mvsr).
    token_kl: [B, T] float, per-token KL(old || reference), for REINFORCE++ with the KL penalty in the reward.
    """

    rewards: torch.Tensor
    response_mask: torch.Tensor
    group_index: torch.Tensor | None = None
    baseline: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered estimator and what it needs."""

    name: str
    fn: Callable[..., torch.Tensor]
    needs_groups: bool
    uses_tracker: bool
    shaping_default: bool


ESTIMATORS: Registry[EstimatorSpec] = Registry("advantage estimator")


def register_estimator(name: str, *, needs_groups: bool = False, uses_tracker: bool = False, shaping: bool = False):
    """Register `fn` under `name`; `shaping` is whether entropy shaping is on when the config leaves it unset."""

    def wrap(fn):
        ESTIMATORS.register(name)(EstimatorSpec(name, fn, needs_groups, uses_tracker, shaping))
        return fn

    return wrap


def _require(value, what: str, name: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"advantage estimator {name!r} needs {what}")
    return value


def batch_normalize(values: torch.Tensor, var_floor: float, mask: torch.Tensor | None = None, group=None):
    """(x - mean) / sqrt(max(var, var_floor)) with the biased variance over the (global, masked) batch."""
    mean, var, _ = masked_moments(values, mask, group)
    scale = torch.sqrt(torch.clamp(var, min=var_floor))
    return ((values.to(torch.float64) - mean) / scale).to(values.dtype)


def group_stats(values: torch.Tensor, group_index: torch.Tensor):
    """Per-rollout group size, group mean and unbiased group std ([B] each); the std of a singleton group is 0.

    values: [B] float; group_index: [B] int (any labels). Vectorised with index_add, no Python loop over groups.
    """
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    v = values.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(v))
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, v)
    mean = total / count
    sq_dev = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, (v - mean[inverse]) ** 2)
    std = torch.where(count > 1, torch.sqrt(sq_dev / (count - 1).clamp(min=1)), torch.zeros_like(count))
    return count[inverse], mean[inverse], std[inverse]


@register_estimator("mssr", uses_tracker=True, shaping=True)
def mssr_advantage(batch: AdvantageBatch, cfg, group=None) -> torch.Tensor:
    """MSSR: A = r - v(x) with the prompt's Beta baseline, normalised over the global batch of rollouts. [B]"""
    baseline = _require(batch.baseline, "batch.baseline (the Beta tracker's v(x))", "mssr")
    raw = batch.rewards.to(torch.float64) - baseline.to(torch.float64)
    return batch_normalize(raw, cfg.norm_var_floor, group=group)


@register_estimator("mvsr", uses_tracker=True, shaping=False)
def mvsr_advantage(batch: AdvantageBatch, cfg, group=None) -> torch.Tensor:
    """MVSR: MSSR's advantage without entropy shaping (the ablation that collapses). [B]"""
    return mssr_advantage(batch, cfg, group)


@register_estimator("grpo", needs_groups=True)
def grpo_advantage(batch: AdvantageBatch, cfg, group=None) -> torch.Tensor:
    """GRPO: (r - group mean) / (unbiased group std + eps); a singleton group gets 0. [B]"""
    index = _require(batch.group_index, "batch.group_index", "grpo")
    _, mean, std = group_stats(batch.rewards, index)
    return (batch.rewards.to(torch.float64) - mean) / (std + cfg.grpo_eps)


@register_estimator("drgrpo", needs_groups=True)
def drgrpo_advantage(batch: AdvantageBatch, cfg, group=None) -> torch.Tensor:
    """Dr. GRPO: r - group mean, without the std division. [B]"""
    index = _require(batch.group_index, "batch.group_index", "drgrpo")
    _, mean, _ = group_stats(batch.rewards, index)
    return batch.rewards.to(torch.float64) - mean


@register_estimator("rloo", needs_groups=True)
def rloo_advantage(batch: AdvantageBatch, cfg, group=None) -> torch.Tensor:
    """RLOO: r minus the mean reward of the OTHER rollouts of the prompt; a singleton group gets 0. [B]"""
    index = _require(batch.group_index, "batch.group_index", "rloo")
    count, mean, _ = group_stats(batch.rewards, index)
    r = batch.rewards.to(torch.float64)
    loo_mean = (mean * count - r) / (count - 1).clamp(min=1)
    return torch.where(count > 1, r - loo_mean, torch.zeros_like(r))


@register_estimator("reinforce_pp")
def reinforce_pp_advantage(batch: AdvantageBatch, cfg, group=None) -> torch.Tensor:
    """REINFORCE++: token returns (final reward, minus kl_reward_coef * KL per token when the KL is in the reward),
    undiscounted, then normalised over all response tokens of the global batch. [B, T]"""
    mask = batch.response_mask.to(torch.float64)
    token_reward = torch.zeros_like(mask)
    if cfg.kl_in_reward:
        kl = _require(batch.token_kl, "batch.token_kl when algorithm.kl_in_reward is set", "reinforce_pp")
        token_reward = token_reward - cfg.kl_reward_coef * kl.to(torch.float64) * mask
    # The outcome reward lands on the last response token; a zero-length response has no such token.
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    token_reward = token_reward + last * batch.rewards.to(torch.float64)[:, None]
    returns = torch.flip(torch.cumsum(torch.flip(token_reward, [-1]), -1), [-1]) * mask
    return batch_normalize(returns, cfg.norm_var_floor, mask=mask, group=group)


@dataclass
class AdvantageOutput:
    """advantages: [B, T] float32, zero outside the response mask; metrics: floats to log."""

    advantages: torch.Tensor
    metrics: dict[str, float]


def compute_advantages(name: str, batch: AdvantageBatch, cfg, group=None) -> AdvantageOutput:
    """Run the registered estimator `name` and broadcast its result to the response tokens."""
    spec = ESTIMATORS.get(name)
    values = spec.fn(batch, cfg, group)
    mask = batch.response_mask.to(torch.float32)
    per_token = values[:, None] if values.dim() == 1 else values
    advantages = per_token.to(torch.float32) * mask
    seq_adv = values if values.dim() == 1 else _seq_mean(values, mask)
    metrics = {
        "reward/mean": float(batch.rewards.float().mean()) if batch.rewards.numel() else 0.0,
        "adv/mean": float(seq_adv.mean()) if seq_adv.numel() else 0.0,
        "adv/std": float(seq_adv.double().std(unbiased=False)) if seq_adv.numel() else 0.0,
        "adv/max": float(seq_adv.max()) if seq_adv.numel() else 0.0,
        "adv/min": float(seq_adv.min()) if seq_adv.numel() else 0.0,
        "adv/zero_frac": float((seq_adv == 0).double().mean()) if seq_adv.numel() else 0.0,
    }
    if batch.baseline is not None:
        metrics["baseline/mean"] = float(batch.baseline.double().mean()) if batch.baseline.numel() else 0.0
    if batch.group_index is not None and batch.group_index.numel():
        count, _, _ = group_stats(batch.rewards, batch.group_index)
        metrics["adv/singleton_group_frac"] = float((count == 1).double().mean())
    return AdvantageOutput(advantages, metrics)


def _seq_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values.to(torch.float64) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
