"""The cross-modal regulariser's inputs: a text-only copy of each training row, run beside it in the same micro-batch.

    batches = paired_microbatches(batches, exp, hf_config, pad_id)       # rl_step.update_policy, crossmodal_coef > 0
    output, batch = split_paired_output(output, batch, ...)              # actor.train_step, on the last stage

Text-only copy: the row with its image blocks (<|vision_start|> <|image_pad|>... <|vision_end|>, as the chat template
writes them) removed and shifted left, so it is the prompt the template gives without the image, followed by the same
response tokens; its mrope positions are recomputed for text alone (all three components 0, 1, 2, ... as Qwen2.5-VL
gives a text-only prompt). A row without an image is its own copy (its KL is 0).

Why one micro-batch of 2B rows and not a second stream of micro-batches: the KL of a response token needs the logits
of both passes at once, with gradient to both. Stacking the copies under the rows (rows 0..B-1 the normal ones, B..2B-1
their text-only copies, padded to the same width) makes one forward give both, and leaves Megatron's schedules as they
are: with pipeline parallelism every stage exchanges [S, 2B, H] tensors (all micro-batches of a pass keep one shape),
the vision tower sees only the normal rows' images, and the 1F1B backward runs once through both. The cost is that
of a second forward and backward over the rows (measured by `mssr bench`), and the activations of 2B rows at a time.

Gradient: through BOTH passes. The loss is the KL as a function of the parameters, so the text-only pass gets the
gradient too (it is pulled toward the image-conditioned prediction as much as that one is pulled toward it); the
released code's tensor was an anchor computed without gradient, and never used (see the released config's comments).
"""

from __future__ import annotations

import torch

from mssr_megatron.models.rope_index import mrope_position_ids

PAIRED_KEY = "crossmodal_pair"
"""Micro-batch entry of a paired micro-batch: {"removed": [B] tokens dropped per row, "mask": [B, W-1] response}."""
KL_KEY = "crossmodal_kl"
"""Entry `split_paired_output` adds for the loss: the per-token KL [B, W-1] (0 off the response), with gradient."""


def vision_block_ids(hf_config) -> tuple[int, ...]:
    """The token ids a text-only copy drops: the image block as the chat template and processor write it."""
    return (hf_config.vision_start_token_id, hf_config.image_token_id, hf_config.vision_end_token_id)


def text_only_rows(input_ids: torch.Tensor, lengths: torch.Tensor, drop_ids, pad_id: int, image_token_id: int,
                   spatial_merge_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids [B, W] with `lengths` [B] real tokens per row (right padding) -> (text-only ids [B, W], their mrope
    positions [3, B, W], tokens removed per row [B]); the copies are right-padded with pad_id to the same width W."""
    batch, width = input_ids.shape
    ids = torch.full_like(input_ids, pad_id)
    attention = torch.zeros_like(input_ids)
    removed = torch.zeros(batch, dtype=torch.long)
    drop = torch.as_tensor(drop_ids, dtype=input_ids.dtype)
    for b in range(batch):
        real = input_ids[b, : int(lengths[b])]
        kept = real[~torch.isin(real, drop)]
        ids[b, : len(kept)] = kept
        attention[b, : len(kept)] = 1
        removed[b] = len(real) - len(kept)
    positions = mrope_position_ids(ids, None, image_token_id, spatial_merge_size, attention)
    return ids, positions, removed


def paired_microbatches(batches: list[dict], exp, hf_config, pad_id: int) -> list[dict]:
    """Each micro-batch (Experience.microbatches) with the text-only copies of its rows stacked under them (2B rows,
    same width) and PAIRED_KEY set; `rows` and the images stay those of the B normal rows."""
    paired = []
    for batch in batches:
        rows, (size, width) = batch["rows"], batch["input_ids"].shape
        lengths = exp.lengths[rows].clamp(max=width) if exp.lengths is not None else torch.full((size,), width)
        ids, positions, removed = text_only_rows(
            batch["input_ids"], lengths, vision_block_ids(hf_config), pad_id, hf_config.image_token_id,
            hf_config.vision_config.spatial_merge_size)
        paired.append({**batch, "input_ids": torch.cat([batch["input_ids"], ids]),
                       "position_ids": torch.cat([batch["position_ids"], positions.to(batch["position_ids"].dtype)], 1),
                       PAIRED_KEY: {"removed": removed, "mask": exp.response_mask[rows, : width - 1] > 0}})
    return paired


def split_paired_output(output: torch.Tensor, batch: dict, vocab_size: int, temperature: float = 1.0,
                        masked_token_ids=None, chunk_size: int | None = None) -> tuple[torch.Tensor, dict]:
    """Logits [2B, W, V/TP] of a paired micro-batch -> (the normal rows' logits [B, W, V/TP], the batch with the
    normal rows' input_ids and KL_KEY: KL(pi(.|x, img) || pi(.|x)) [B, W-1] at each response column, 0 elsewhere).

    The KL is over the full vocabulary at the rollout temperature, blocked tokens (masked_token_ids) and TP padding
    left out, as in the policy's log-probs (vocab_parallel_kl; vocabulary-parallel under TP); chunk_size: its rows
    per chunk (model.logprob_chunk_tokens, as for the log-probs)."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.ops.vocab_parallel_kl import vocab_parallel_kl

    pair = batch[PAIRED_KEY]
    size = batch["rows"].numel()
    with_image, text_only = output[:size], output[size:]
    mask = pair["mask"].to(output.device)
    row, column = mask.nonzero(as_tuple=True)  # column c predicts token c + 1; in the copy it sits `removed` earlier
    shifted = column - pair["removed"].to(output.device)[row]
    group = ps.get_tensor_model_parallel_group() if ps.model_parallel_is_initialized() else None
    kl = vocab_parallel_kl(with_image[row, column], text_only[row, shifted], tp_group=group, temperature=temperature,
                           vocab_size=vocab_size, masked_token_ids=masked_token_ids, chunk_size=chunk_size)
    per_token = torch.zeros(mask.shape, dtype=kl.dtype, device=kl.device).index_put((row, column), kl)
    rest = {k: v for k, v in batch.items() if k != PAIRED_KEY}
    return with_image, {**rest, "input_ids": batch["input_ids"][:size], KL_KEY: per_token}
