"""Batch statistics that span data-parallel ranks.

MSSR normalises advantages over the GLOBAL batch; when the batch is sharded across data-parallel ranks the moments are
summed with one all-reduce (`masked_moments`). The algorithm pipeline instead gathers per-row statistics into global
row order (`gather_rows`) and reduces them the same way on every rank: bit-identical everywhere and equal to one
process given the same rows. With `group=None` (or no initialised process group) everything is local.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def _spans_ranks(group) -> bool:
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


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


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's block of rows, concatenated in rank order (rank r of `group` holds the r-th block), on every rank.

    local: [rows, ...], the same shape on every rank. Returns [group size * rows, ...] on the CPU. On NCCL the blocks
    travel through the current CUDA device (GPU-only: not run (no GPU was available)).
    """
    local = local.detach().contiguous()
    if not _spans_ranks(group):
        return local
    from mssr_megatron.parallel import collective_device

    device = collective_device(group)
    blocks = [torch.empty_like(local, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(blocks, local.to(device), group=group)
    return torch.cat(blocks).cpu()


def is_last_rank(group) -> bool:
    """Whether this process is the highest rank of `group` (True without a group)."""
    return not _spans_ranks(group) or dist.get_rank(group) == dist.get_world_size(group) - 1


def from_last_rank(obj, group=None):
    """A picklable object of the highest rank of `group`, on every rank of it (identity without a group). On NCCL
    torch moves the pickled bytes through the current CUDA device (GPU-only: not run (no GPU was available))."""
    if not _spans_ranks(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, dist.get_world_size(group) - 1), group=group)
    return box[0]


def state_digest(state) -> str:
    """A SHA-256 of a state dict (nested dicts, lists, tensors, numbers, strings): equal states, equal digests.
    Tensors contribute their dtype, shape and bytes, so a one-ulp difference changes the digest."""
    h = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"dict{len(x)}".encode())
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(f"{type(x).__name__}{len(x)}".encode())
            for item in x:
                feed(item)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(state)
    return h.hexdigest()


def block_of_rows(num_rows: int, group=None) -> torch.Tensor:
    """The rows of this rank's block when `num_rows` rows are split into equal contiguous blocks in rank order."""
    size = dist.get_world_size(group) if _spans_ranks(group) else 1
    rank = dist.get_rank(group) if _spans_ranks(group) else 0
    if num_rows % size:
        raise ValueError(f"{num_rows} rows do not split into {size} equal data-parallel blocks")
    per = num_rows // size
    return torch.arange(rank * per, (rank + 1) * per)
