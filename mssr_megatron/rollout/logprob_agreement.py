"""How far the rollout engine's log-probs are from the trainer's, token by token.

The policy-gradient update treats the rollouts as on-policy: the importance ratio exp(logp_trainer - logp_rollout)
should be 1 before the first optimizer step of a batch. Engine and trainer are different programs (SGLang kernels vs
Megatron, bf16 vs fp32, a KV cache vs a full forward, TP layouts, a weight sync that may have failed silently), so
the two log-probs drift apart; the drift is an off-policy error that PPO clipping then partly hides. Logging it every
step turns "training became unstable" into "the engine's weights are stale" or "these kernels disagree by 0.3 nats".
With the embedded HF engine in fp32 the expected values are ~1e-6.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_THRESHOLD = 0.1
"""Nats; a token over it has a probability ratio outside [0.905, 1.105], about half of PPO's usual 0.2 clip range."""


def logprob_mismatch(
    rollout_logprobs: torch.Tensor,
    trainer_logprobs: torch.Tensor,
    mask: torch.Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    group=None,
) -> dict[str, float]:
    """Statistics of |rollout - trainer| over the response tokens, of this process's rows or, given a process
    `group` (the data-parallel group: each replica holds its own rows), of every rank's rows.

    rollout_logprobs, trainer_logprobs: [B, T] log-probs of the same tokens; mask: [B, T] (bool or 0/1), True on
    response tokens (values at masked-out positions are ignored, -inf or NaN included).

    Returns ``mean_abs_diff``, ``max_abs_diff``, ``frac_over_threshold`` (share of tokens with |diff| > threshold),
    ``mean_diff`` (signed, rollout - trainer: a systematic bias shows here) and ``num_tokens``. With no tokens all
    statistics are 0. With a group, sums and counts are all-reduced in float64 (one SUM, one MAX) before dividing:
    token means over the whole batch, the same value on every rank of the group.
    """
    if not rollout_logprobs.shape == trainer_logprobs.shape == mask.shape:
        raise ValueError(
            f"shapes differ: rollout {tuple(rollout_logprobs.shape)}, trainer {tuple(trainer_logprobs.shape)}, "
            f"mask {tuple(mask.shape)}"
        )
    mask = mask.bool()
    diff = rollout_logprobs.detach().double() - trainer_logprobs.detach().double()
    diff = torch.where(mask, diff, torch.zeros_like(diff))  # where, not multiply: masked -inf - -inf is NaN
    abs_diff = diff.abs()
    sums = torch.stack([abs_diff.sum(), diff.sum(), ((abs_diff > threshold) & mask).sum().double(),
                        mask.sum().double()])
    largest = abs_diff.max().reshape(1) if abs_diff.numel() else torch.zeros(1, dtype=torch.float64)
    if group is not None:
        sums, largest = _all_reduce(sums, dist.ReduceOp.SUM, group), _all_reduce(largest, dist.ReduceOp.MAX, group)
    abs_sum, signed_sum, over, count = sums.tolist()
    if count == 0:
        return dict.fromkeys(("mean_abs_diff", "max_abs_diff", "frac_over_threshold", "mean_diff"), 0.0) | {
            "num_tokens": 0
        }
    return {
        "mean_abs_diff": abs_sum / count,
        "max_abs_diff": float(largest),
        "frac_over_threshold": over / count,
        "mean_diff": signed_sum / count,
        "num_tokens": int(count),
    }


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """`t` reduced over `group`, on the device its collectives need (NCCL: the GPU), back on the CPU."""
    from mssr_megatron.parallel import collective_device

    t = t.to(collective_device(group))
    dist.all_reduce(t, op=op, group=group)
    return t.cpu()
