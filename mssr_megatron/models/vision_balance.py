"""model.vision_balance=tp_balanced: the images of a micro-batch split over the tensor-parallel group by patch count.

    owners = assign_images(patch_counts, tp)        # owners[i]: the TP rank that encodes image i (same on every rank)
    features = balanced_vision_features(vision_model, pixel_values, image_grid_thw, merge, group)
    allreduce_vision_grads(module, group)           # after backward, before the optimizer step (actor.py)

Each TP rank runs the vision tower on its own images only (about 1/TP of the patches, the tower's cost); the features
are all-gathered over the TP group and put back in the original image order, so the embeddings are those of
`replicate`. The tower attends within each image only (transformers' cu_seqlens), so an image's features do not depend
on which other images share the call.

Gradients. The gradient reaching the gathered features is the same on every TP rank: the language model's first
column-parallel layer all-reduces the decoder input's gradient over TP (and under sequence parallelism the scatter's
backward all-gathers it), which is why `replicate` needs no reduction at all. So the gather's backward is the SLICE
of this rank's images, not a reduce-scatter (that would sum TP identical copies: TP times the gradient), as in
megatron's gather_from_tensor_model_parallel_region. Each rank's tower then holds the parameter gradients of its own
images only; `allreduce_vision_grads` sums them over the TP group, after which every rank holds the gradient that
`replicate` computes on each, and the weights stay identical. Megatron does not reduce these parameters over TP
itself (finalize_model_grads sums only parameters marked `sequence_parallel` under SP, or averages those marked
`average_gradients_across_tp_domain`; the tower's carry neither, checked), and DDP reduces them over data-parallel
ranks only: there is no double count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


BUCKET_ELEMENTS = 2**25
"""Gradient elements per all-reduce in `allreduce_vision_grads` (128 MiB of fp32)."""


def assign_images(patch_counts: list[int], tp: int) -> list[int]:
    """Owner rank of each image: greedy largest-first (ties: the earlier image), each to the least-loaded rank (ties:
    the lower rank). Deterministic, so every rank computes it without communication. patch_counts[i] = t*h*w."""
    loads = [0] * tp
    owners = [0] * len(patch_counts)
    for image in sorted(range(len(patch_counts)), key=lambda i: (-patch_counts[i], i)):
        rank = min(range(tp), key=lambda r: (loads[r], r))
        owners[image] = rank
        loads[rank] += patch_counts[image]
    return owners


class _GatherVariable(torch.autograd.Function):
    """Forward: every rank's [n_r, H] rows, concatenated in rank order (padded to the longest for all_gather, then
    trimmed). Backward: the rows of this rank (the incoming gradient is the same on every rank: module docstring)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: list[int], rank: int, group) -> torch.Tensor:
        ctx.start, ctx.count = sum(counts[:rank]), counts[rank]
        longest = max(counts)
        padded = local.new_zeros(longest, local.shape[1])
        padded[: local.shape[0]] = local
        shards = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(shards, padded.contiguous(), group=group)
        return torch.cat([shard[:n] for shard, n in zip(shards, counts)])

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start : ctx.start + ctx.count], None, None, None


def encode_share(vision_model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, owners: list[int],
                 rank: int) -> torch.Tensor:
    """The features [sum over this rank's images of t*h*w / merge^2, H_out] of the images `owners` gives `rank`, in
    image order; [0, H_out] when it has none (it still takes part in the gather)."""
    patches = image_grid_thw.prod(-1).tolist()
    mine = [i for i in range(len(patches)) if owners[i] == rank]
    if not mine:
        return pixel_values.new_zeros(0, vision_model.config.out_hidden_size, dtype=vision_model.dtype)
    starts = [sum(patches[:i]) for i in range(len(patches))]
    rows = torch.cat([pixel_values[starts[i] : starts[i] + patches[i]] for i in mine])
    local = vision_model(rows.to(vision_model.dtype), grid_thw=image_grid_thw[mine])
    return getattr(local, "pooler_output", local)  # transformers 5 returns a model output


def balanced_vision_features(vision_model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                             spatial_merge_size: int, group) -> torch.Tensor:
    """The vision tower's features of all images [sum_i t*h*w / merge^2, H_out], in image order, with this rank
    encoding only the images `assign_images` gives it. pixel_values [sum_i t*h*w, C*T*14*14] hold the images' patches
    in image order; image_grid_thw [N, 3]."""
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    patches = image_grid_thw.prod(-1).tolist()
    owners = assign_images(patches, tp)
    merged = [n // spatial_merge_size**2 for n in patches]
    local = encode_share(vision_model, pixel_values, image_grid_thw, owners, rank)
    by_rank = [[i for i in range(len(patches)) if owners[i] == r] for r in range(tp)]
    gathered = _GatherVariable.apply(local, [sum(merged[i] for i in images) for images in by_rank], rank, group)
    # rows of `gathered` are image by image in rank order; put each image's rows back at its place in image order
    offsets, offset = {}, 0
    for image in (i for images in by_rank for i in images):
        offsets[image] = offset
        offset += merged[image]
    index = torch.cat([torch.arange(offsets[i], offsets[i] + merged[i]) for i in range(len(patches))])
    return gathered.index_select(0, index.to(gathered.device))


def allreduce_vision_grads(module, group) -> None:
    """Sum the vision tower's parameter gradients over the TP group (tp_balanced: each rank holds its images' share).
    Call once per optimizer step after the backward passes and before megatron's grad finalisation and the step.
    Reads Megatron DDP's `main_grad` buffers when present (else `.grad`); no-op without a tower (later pipeline
    stages), with a frozen tower (model.train_vision=false), or at TP=1."""
    vision = getattr(module, "vision_model", None)
    if vision is None or dist.get_world_size(group) == 1:
        return
    grads = []
    for name, param in vision.named_parameters():
        if not param.requires_grad:
            continue
        if getattr(param, "sequence_parallel", False) or getattr(param, "average_gradients_across_tp_domain", False):
            raise RuntimeError(f"vision_model.{name} is also reduced over TP by megatron's finalize_model_grads: "
                               "it would be counted twice")
        grad = getattr(param, "main_grad", None)
        if grad is None:  # no DDP: .grad, which a rank that encoded no image never got (every rank must take part)
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad = param.grad
        grads.append(grad)
    # coalesced into buckets of at most BUCKET_ELEMENTS: few collectives, and a bounded extra buffer (a 7B model's
    # tower has ~0.67B parameters: one flat copy of all its fp32 gradients would be 2.7 GB)
    bucket: list[torch.Tensor] = []
    for i, grad in enumerate(grads):
        bucket.append(grad)
        if i == len(grads) - 1 or sum(g.numel() for g in bucket) + grads[i + 1].numel() > BUCKET_ELEMENTS:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, group=group)
            for g, synced in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(synced.view_as(g))
            bucket = []
