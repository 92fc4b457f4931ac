"""One RL step's rollouts as training tensors, and their split into Megatron micro-batches.

Rows are rollouts (B). Sequences are prompt + response, right-padded to a common length L. Per-token tensors are
aligned with the shifted log-probs the actor returns: column t holds token t + 1, predicted from position t, so
they are [B, L-1]; `response_mask` marks the response tokens there.

Micro-batches are cut narrower than L where they can be: each to its own longest row, rounded up to
`sequence_multiple(cfg)` (see there). The model is causal and the padding is on the right, so the columns a
micro-batch keeps get the same log-probs as at width L; `rl_step` re-pads per-micro-batch results to L-1 columns and
slices the per-token tensors a loss reads to the micro-batch's width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import math

import torch

from mssr_megatron.models.rope_index import mrope_position_ids


@dataclass
class Experience:
    """prompt_keys: the stable prompt id of each rollout (B); group_index [B]: rollouts of one prompt share it;
    rewards [B]; input_ids [B, L]; position_ids [3, B, L]; response_mask, rollout_logprobs [B, L-1];
    pixel_values: per row [patches_i, C*T*P*P] (or None without images); image_grid_thw: per row [images_i, 3];
    lengths [B]: real tokens (prompt + response) per row, or None when every row fills L."""

    prompt_keys: list
    group_index: torch.Tensor
    rewards: torch.Tensor
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    response_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    pixel_values: list = field(default_factory=list)
    image_grid_thw: list = field(default_factory=list)
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, order: list[int]) -> "Experience":
        """The rows in `order` (row i of the result is row order[i] of this one), every per-row field alike."""
        index = torch.as_tensor(order, dtype=torch.long)
        return Experience(
            prompt_keys=[self.prompt_keys[i] for i in order], group_index=self.group_index[index],
            rewards=self.rewards[index], input_ids=self.input_ids[index], position_ids=self.position_ids[:, index],
            response_mask=self.response_mask[index], rollout_logprobs=self.rollout_logprobs[index],
            pixel_values=[self.pixel_values[i] for i in order] if self.pixel_values else [],
            image_grid_thw=[self.image_grid_thw[i] for i in order] if self.image_grid_thw else [],
            lengths=None if self.lengths is None else self.lengths[index])

    def microbatches(self, rows: torch.Tensor | list[int], micro_batch_size: int, width_multiple: int | None = None,
                     same_width: bool = False) -> list[dict]:
        """Micro-batches of the given rows; each carries `rows` (indices into this Experience) so a loss can pick
        its per-token tensors, and their `response_mask` [b, width - 1] (the positions a loss reads: the actor
        computes the logits only there).

        width_multiple: cut each micro-batch to its longest row rounded up to this multiple (at most L); None keeps
        all of them at the full width L. same_width: give every micro-batch of the call the widest of those widths
        (a pipeline pass exchanges one fixed shape between stages)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if len(rows) % micro_batch_size:
            raise ValueError(f"{len(rows)} rows do not split into micro-batches of {micro_batch_size}")
        return self.batches_of(list(rows.split(micro_batch_size)), width_multiple, same_width)

    def batches_of(self, parts: list[torch.Tensor], width_multiple: int | None = None,
                   same_width: bool = False) -> list[dict]:
        """One micro-batch per part (a 1-D tensor of row indices, any sizes: train/token_budget.py packs them),
        cut as in `microbatches`."""
        widths = [self._width(part, width_multiple) for part in parts]
        if same_width and widths:
            widths = [max(widths)] * len(widths)
        batches = []
        for part, width in zip(parts, widths):
            batch = {"input_ids": self.input_ids[part, :width], "position_ids": self.position_ids[:, part, :width],
                     "rows": part, "response_mask": self.response_mask[part, :width - 1]}
            pixels = [self.pixel_values[i] for i in part.tolist() if self.pixel_values and self.pixel_values[i] is not None]
            if pixels:
                batch["pixel_values"] = torch.cat(pixels)
                batch["image_grid_thw"] = torch.cat([self.image_grid_thw[i] for i in part.tolist()
                                                     if self.image_grid_thw[i] is not None])
            batches.append(batch)
        return batches

    def _width(self, part: torch.Tensor, multiple: int | None) -> int:
        """Columns a micro-batch of these rows needs: its longest row rounded up to `multiple`, at most L."""
        full = self.input_ids.shape[1]
        if multiple is None or self.lengths is None:
            return full
        longest = max(int(self.lengths[part].max()), 1)
        return min(full, -(-longest // multiple) * multiple)


def sequence_multiple(model_cfg, parallel_cfg) -> int:
    """What every sequence length (micro-batch width) is rounded up to: a multiple of 8 (few distinct shapes);
    with FP8, of 16 tokens (32 for mxfp8: megatron.core.fp8_utils.get_fp8_align_size, Transformer Engine's FP8 GEMM
    alignment); with sequence parallelism, times the TP size, since the sequence is split over the TP ranks and each
    rank's share must itself be aligned (and divisible: megatron's scatter along the sequence asserts it)."""
    fp8 = 1 if model_cfg.fp8 is None else (32 if model_cfg.fp8_recipe == "mxfp8" else 16)
    split = parallel_cfg.tensor_model_parallel_size if parallel_cfg.sequence_parallel else 1
    return math.lcm(8, fp8 * split)


def build_experience(rollouts, rewards, prompt_keys, group_index, images, *, image_token_id: int,
                     spatial_merge_size: int, pad_id: int, pad_to_multiple: int = 8) -> Experience:
    """Tensors for a list of Rollouts.

    rewards [B]; prompt_keys (B stable prompt ids); group_index [B]; images: per rollout (pixel_values, grid) from the
    image processor, or None. Sequences are right-padded to a multiple of `pad_to_multiple` (the trainer passes
    `sequence_multiple`, so that every micro-batch width, a multiple of it up to L, stays within L).
    """
    lengths = [len(r.prompt_ids) + len(r.response_ids) for r in rollouts]
    longest = max(lengths) if lengths else 1
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    batch = len(rollouts)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros(batch, width, dtype=torch.long)
    response_mask = torch.zeros(batch, width - 1)
    rollout_logprobs = torch.zeros(batch, width - 1)
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, : p + n] = torch.tensor(list(r.prompt_ids) + list(r.response_ids), dtype=torch.long)
        attention[i, : p + n] = 1
        if n:  # response token j sits at p + j and is predicted from column p + j - 1
            response_mask[i, p - 1 : p - 1 + n] = 1
            rollout_logprobs[i, p - 1 : p - 1 + n] = torch.tensor(r.response_logprobs, dtype=torch.float32)
    grids = [img[1] if img is not None else None for img in images]
    stacked = [g for g in grids if g is not None]
    position_ids = mrope_position_ids(input_ids, torch.cat(stacked) if stacked else None, image_token_id,
                                      spatial_merge_size, attention)
    return Experience(
        prompt_keys=list(prompt_keys),
        group_index=torch.as_tensor(group_index, dtype=torch.long),
        rewards=torch.as_tensor(rewards, dtype=torch.float32),
        input_ids=input_ids,
        position_ids=position_ids,
        response_mask=response_mask,
        rollout_logprobs=rollout_logprobs,
        pixel_values=[img[0] if img is not None else None for img in images],
        image_grid_thw=grids,
        lengths=torch.tensor(lengths, dtype=torch.long),
    )
