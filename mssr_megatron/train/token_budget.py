"""Token-budget micro-batches (parallel.max_tokens_per_microbatch): rows packed so each micro-batch's cost stays under
a budget, instead of a fixed number of rows per micro-batch.

Cost of a micro-batch of rows R (what one forward/backward computes):

    cost(R) = |R| * width(R) + sum over r in R of patches(r)
    width(R) = max over r in R of tokens(r), rounded up to the sequence multiple (experience.sequence_multiple), at most
               the Experience's width L: the micro-batch is padded to it, so padding is paid for
    tokens(r) = prompt + response tokens of row r (Experience.lengths; a prompt's image placeholders are among them)
    patches(r) = sum over row r's images of t * h * w of its image_grid_thw, i.e. the vision tower's patches BEFORE the
               spatial merge (what the vision tower computes on; the language model sees patches / merge_size**2)

With algorithm.crossmodal_coef > 0 each micro-batch also runs the text-only copies of its rows (train/crossmodal.py),
which the cost above does not count: the language-model work is then up to twice the budget's token part.

Packing is first-fit decreasing: rows in order of width, then patches, both descending (then row index); each goes into
the first micro-batch it fits in (cost after adding it <= budget), or opens a new one. Sorting by width groups rows of
similar length, so the padding stays small. A row whose own cost is over the budget gets a micro-batch of its own
(a warning, once per process).

Every data-parallel rank must run the same number of micro-batches (one schedule per optimizer step, the same
gradient-reduction calls on every rank): `equal_count` splits the costliest micro-batches (those with >= 2 rows) in
two until a rank has the count the busiest rank needs.

Balance across data-parallel ranks: each rank trains on its contiguous rl_step.data_parallel_rows block (the
algorithm pipeline's per-row gathers, gather_rows, assume it), so the step waits for the rank whose block costs most.
`balanced_row_order` reorders the step's rows once (rl_step.make_experience, with a budget and DP > 1) so that, in
every mini-batch, the ranks' blocks cost about the same (row cost: padded tokens + patches). A global mini-batch keeps
its rows; only which rank runs which of them changes, so the step's losses and gradients are those of the original
order (tests/test_token_budget.py).

Losses stay exact: every loss term divides by the mini-batch's global token (or sequence) count
(algorithms/losses.py `normalizer`), and a row lies wholly in one micro-batch, so any grouping of the rows sums to the
same loss and gradients (tests/test_token_budget.py).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_warned_oversized = False


def row_patches(image_grid_thw: list) -> list[int]:
    """Vision patches per row (sum of t * h * w over its images; 0 without images). image_grid_thw: per row [n, 3] or
    None (Experience.image_grid_thw, possibly empty for a text-only step)."""
    return [0 if grid is None else int(grid.prod(-1).sum()) for grid in image_grid_thw]


def padded_width(tokens: int, multiple: int, full_width: int) -> int:
    """A row (or micro-batch) of `tokens` tokens padded up to the sequence multiple, at most `full_width`."""
    return min(full_width, -(-max(tokens, 1) // multiple) * multiple)


def microbatch_cost(rows: list[int], tokens: list[int], patches: list[int], multiple: int, full_width: int) -> int:
    """cost(R) of the module docstring for row indices `rows` into `tokens` / `patches`."""
    width = padded_width(max(tokens[r] for r in rows), multiple, full_width)
    return len(rows) * width + sum(patches[r] for r in rows)


def pack(tokens: list[int], patches: list[int], budget: int, multiple: int, full_width: int) -> list[list[int]]:
    """Micro-batches (lists of indices into tokens/patches, each in ascending order) by first-fit decreasing under
    `budget` (module docstring). tokens, patches: per row."""
    global _warned_oversized
    order = sorted(range(len(tokens)), key=lambda r: (-padded_width(tokens[r], multiple, full_width), -patches[r], r))
    bins: list[list[int]] = []
    costs: list[int] = []
    for r in order:
        width = padded_width(tokens[r], multiple, full_width)
        alone = width + patches[r]
        if alone > budget:
            if not _warned_oversized:
                log.warning("a row costs %d (%d tokens padded to %d + %d image patches), over "
                            "parallel.max_tokens_per_microbatch=%d: it gets a micro-batch of its own (warned once)",
                            alone, tokens[r], width, patches[r], budget)
                _warned_oversized = True
            bins.append([r])
            costs.append(alone)
            continue
        for b, part in enumerate(bins):  # sorted by width: a bin's width is its first row's, >= this row's
            added = padded_width(tokens[part[0]], multiple, full_width) + patches[r]
            if costs[b] + added <= budget:
                part.append(r)
                costs[b] += added
                break
        else:
            bins.append([r])
            costs.append(alone)
    return [sorted(part) for part in bins]


def equal_count(bins: list[list[int]], count: int, tokens: list[int], patches: list[int], multiple: int,
                full_width: int) -> list[list[int]]:
    """`bins` split until there are `count` of them: each time the costliest bin with >= 2 rows is cut into its
    longer-rows half (ceil(n / 2) rows, the longest first) and the rest, which also cuts that half's padding.
    Raises ValueError when there are fewer rows than `count`."""
    if sum(map(len, bins)) < count:
        raise ValueError(f"{sum(map(len, bins))} rows cannot fill {count} micro-batches")
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [i for i, b in enumerate(bins) if len(b) >= 2]
        i = max(splittable, key=lambda k: (microbatch_cost(bins[k], tokens, patches, multiple, full_width), -k))
        by_length = sorted(bins[i], key=lambda r: (-tokens[r], -patches[r], r))
        half = -(-len(by_length) // 2)
        bins[i:i + 1] = [sorted(by_length[:half]), sorted(by_length[half:])]
    return bins


def row_costs(lengths, image_grid_thw: list, rows: int, multiple: int, full_width: int) -> list[int]:
    """Cost of each of `rows` rows on its own: its tokens padded to the sequence multiple + its image patches (module
    docstring). lengths: real tokens per row [B], or None (every row fills full_width); image_grid_thw: per-row grids
    (may be empty)."""
    tokens = [full_width] * rows if lengths is None else [int(n) for n in lengths]
    patches = row_patches(image_grid_thw) if image_grid_thw else [0] * rows
    return [padded_width(t, multiple, full_width) + p for t, p in zip(tokens, patches)]


def balanced_row_order(costs: list[int], dp: int, local_mini: int) -> list[int]:
    """A permutation of the step's rows (order[slot] = row) that evens out the data-parallel ranks' costs.

    Slots keep their meaning: rank r trains on slots [r * per, (r + 1) * per) (per = B / dp), its mini-batch k on
    slots k * local_mini .. of that block. The rows of global mini-batch k (its slots over all ranks) stay in that
    mini-batch; they are dealt to the ranks by cost, descending (ties: lower row first), each to the rank with the
    smallest total so far among those with room (ties: lower rank), then put in row order within each rank.
    costs: per row (row_costs); dp: data-parallel size; local_mini: rows per rank and mini-batch."""
    rows = len(costs)
    if rows % dp or (rows // dp) % local_mini:
        raise ValueError(f"{rows} rows do not split into {dp} data-parallel blocks of mini-batches of {local_mini}")
    per, order = rows // dp, list(range(rows))
    for start in range(0, per, local_mini):
        slots = [list(range(r * per + start, r * per + start + local_mini)) for r in range(dp)]
        members = sorted((row for block in slots for row in block), key=lambda i: (-costs[i], i))
        taken: list[list[int]] = [[] for _ in range(dp)]
        totals = [0] * dp
        for row in members:
            rank = min((r for r in range(dp) if len(taken[r]) < local_mini), key=lambda r: (totals[r], r))
            taken[rank].append(row)
            totals[rank] += costs[row]
        for block, mine in zip(slots, taken):
            for slot, row in zip(block, sorted(mine)):
                order[slot] = row
    return order


def padding_fraction(bins: list[list[int]], tokens: list[int], multiple: int, full_width: int) -> float:
    """Padded token slots / all token slots of the micro-batches (each |R| x width(R)); image patches not counted."""
    slots = sum(len(b) * padded_width(max(tokens[r] for r in b), multiple, full_width) for b in bins)
    real = sum(tokens[r] for b in bins for r in b)
    return (slots - real) / slots if slots else 0.0


def budget_parts(rows: torch.Tensor, lengths: torch.Tensor, image_grid_thw: list, budget: int, multiple: int,
                 full_width: int, count_group=None) -> list[torch.Tensor]:
    """The micro-batches of `rows` (indices into an Experience) under the budget, as tensors of those indices; with
    `count_group` (the data-parallel process group), as many as the rank of that group that needs the most.
    lengths: the Experience's real tokens per row [B], or None (every row fills full_width); image_grid_thw: its
    per-row grids (may be empty)."""
    import torch.distributed as dist

    rows = torch.as_tensor(rows, dtype=torch.long)
    tokens = [full_width if lengths is None else int(lengths[r]) for r in rows.tolist()]
    grids = [image_grid_thw[r] if image_grid_thw else None for r in rows.tolist()]
    patches = row_patches(grids)
    bins = pack(tokens, patches, budget, multiple, full_width)
    if count_group is not None:
        from mssr_megatron.parallel import collective_device

        count = torch.tensor([len(bins)], dtype=torch.long, device=collective_device(count_group))
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=count_group)
        bins = equal_count(bins, int(count), tokens, patches, multiple, full_width)
    return [rows[torch.tensor(b, dtype=torch.long)] for b in bins]
