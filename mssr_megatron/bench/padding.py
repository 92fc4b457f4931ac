"""How the update's micro-batches use their token slots: padding fraction and vision patches, for the configured
split (fixed parallel.micro_batch_size rows, or parallel.max_tokens_per_microbatch, train/token_budget.py), and the
fixed split of the same rows to compare with; and how evenly data-parallel ranks share a step (`rank_costs`)."""

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


def rank_costs(exp, dp: int, local_mini: int, budget: int, multiple: int = 8) -> dict:
    """Cost per data-parallel rank of one epoch over `exp` (token_budget.py: sum over the rank's micro-batches of
    rows x padded width + patches, each mini-batch packed under `budget` and split to the same count on every rank),
    for the contiguous blocks (rl_step.data_parallel_rows) and for the rows reordered by
    token_budget.balanced_row_order. Returns {"contiguous"|"balanced": {"per_rank": [...], "max_over_mean": x}};
    the step waits for the costliest rank, so max_over_mean is the time the imbalance costs (1.0: none). Pure
    arithmetic, no model."""
    from mssr_megatron.train import token_budget as T

    width = exp.input_ids.shape[1]
    tokens = exp.lengths.tolist()
    patches = T.row_patches(exp.image_grid_thw) if exp.image_grid_thw else [0] * len(tokens)
    costs = T.row_costs(exp.lengths, exp.image_grid_thw, len(exp), multiple, width)
    per = len(exp) // dp
    out = {}
    orders = {"contiguous": list(range(len(exp))), "balanced": T.balanced_row_order(costs, dp, local_mini)}
    for name, order in orders.items():
        totals = [0] * dp
        for start in range(0, per, local_mini):
            blocks = [[order[r * per + start + j] for j in range(local_mini)] for r in range(dp)]
            bins = [T.pack([tokens[i] for i in b], [patches[i] for i in b], budget, multiple, width) for b in blocks]
            count = max(map(len, bins))
            for r, (block, own) in enumerate(zip(blocks, bins)):
                own = T.equal_count(own, count, [tokens[i] for i in block], [patches[i] for i in block], multiple,
                                    width)
                totals[r] += sum(T.microbatch_cost([block[i] for i in part], tokens, patches, multiple, width)
                                 for part in own)
        out[name] = {"per_rank": totals, "max_over_mean": max(totals) / (sum(totals) / dp)}
    return out
