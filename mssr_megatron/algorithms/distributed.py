"""Batch statistics that span data-parallel ranks.

MSSR normalises advantages over the GLOBAL batch; when the batch is sharded across data-parallel ranks the moments are
summed with one all-reduce. With `group=None` (or no initialised process group) everything is local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def masked_moments(
    values: torch.Tensor, mask: torch.Tensor | None = None, group=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, biased variance and count of `values` where `mask` is set, over all ranks of `group`.

    values: any shape; mask: same shape (bool or 0/1) or None for all. Returns three 0-d float64 tensors.
    Computed in float64 from (count, sum, sum of squares) so that one all-reduce suffices; the count is 0 when
    nothing is selected, and then mean = var = 0.
    """
    v = values.detach().to(torch.float64)
    m = torch.ones_like(v) if mask is None else mask.to(torch.float64)
    stats = torch.stack([m.sum(), (v * m).sum(), (v * v * m).sum()])
    count, total, total_sq = _all_reduce_sum(stats, group).unbind()
    safe = count.clamp(min=1.0)
    mean = total / safe
    var = (total_sq / safe - mean * mean).clamp(min=0.0)
    return mean, var, count


def global_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of a tensor over all ranks of `group` (a copy; the input is not modified)."""
    return _all_reduce_sum(value.detach().clone(), group)
