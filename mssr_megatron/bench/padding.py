"""How the update's micro-batches use their token slots: padding fraction and vision patches, for the configured
split (fixed parallel.micro_batch_size rows, or parallel.max_tokens_per_microbatch, train/token_budget.py), and the
fixed split of the same rows to compare with."""

from __future__ import annotations

import torch

from mssr_megatron.train import rl_step


def microbatch_stats(exp, batches: list[dict]) -> dict:
    """Token slots of micro-batches (Experience.microbatches / batches_of output over `exp`):
    slots = sum of rows x width, real = the rows' prompt + response tokens, padding_fraction = (slots - real) / slots;
    vision_patches = image patches before the merge (the vision tower's work); max_cost = the largest
    rows x width + patches of one micro-batch (token_budget.microbatch_cost)."""
    slots = real = patches = max_cost = 0
    for batch in batches:
        rows, (count, width) = batch["rows"], batch["input_ids"].shape
        grid = batch.get("image_grid_thw")
        own = 0 if grid is None else int(grid.prod(-1).sum())
        slots += count * width
        real += int(exp.lengths[rows].sum()) if exp.lengths is not None else count * width
        patches += own
        max_cost = max(max_cost, count * width + own)
    return {"microbatches": len(batches), "token_slots": slots, "real_tokens": real,
            "padding_fraction": (slots - real) / slots if slots else 0.0, "vision_patches": patches,
            "max_cost": max_cost, "sizes": [int(b["rows"].numel()) for b in batches]}


def update_microbatches(ctx, exp, rows: torch.Tensor) -> list[dict]:
    """One PPO epoch's micro-batches, cut mini-batch by mini-batch as rl_step.update_policy cuts them."""
    from megatron.core import parallel_state as ps

    local_mini = ctx.cfg.optimizer.mini_batch_size // ps.get_data_parallel_world_size()
    return [batch for start in range(0, len(rows), local_mini)
            for batch in rl_step.microbatches(ctx, exp, rows[start:start + local_mini])]


def with_fixed_microbatches(ctx, fn):
    """fn() with parallel.max_tokens_per_microbatch unset (fixed micro_batch_size rows), then restored."""
    p = ctx.cfg.parallel
    budget, p.max_tokens_per_microbatch = p.max_tokens_per_microbatch, None
    try:
        return fn()
    finally:
        p.max_tokens_per_microbatch = budget
