"""3-D (temporal, height, width) rotary position ids of Qwen2.5-VL for image + text sequences.

Text tokens advance all three components together by 1. An image of merged grid (t, h, w) occupies t*h*w
consecutive `<|image_pad|>` tokens whose positions are start + (t_index, h_index, w_index); the text after it
resumes at start + max(h, w) (still images have no temporal spacing). Padding positions (attention_mask == 0) get 0
and are skipped when counting, so left- and right-padded batches give the same positions for their real tokens.
"""

from __future__ import annotations

import torch


def mrope_position_ids(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    image_token_id: int,
    spatial_merge_size: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Position ids [3, B, S] (long) for input_ids [B, S] with images given by image_grid_thw [num_images, 3]
    (patch grid before merging, in the order the images appear across the batch)."""
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    for b in range(batch):
        valid = torch.ones(seq, dtype=torch.bool) if attention_mask is None else attention_mask[b].bool()
        ids = input_ids[b][valid].tolist()
        rows: list[torch.Tensor] = []
        start = i = 0
        while i < len(ids):
            if ids[i] != image_token_id:
                j = i
                while j < len(ids) and ids[j] != image_token_id:
                    j += 1
                rows.append(torch.arange(start, start + j - i).expand(3, -1))
                start += j - i
                i = j
                continue
            try:
                t, h, w = next(grids)
            except StopIteration:
                raise ValueError("more <|image_pad|> runs in input_ids than images in image_grid_thw") from None
            h, w = h // spatial_merge_size, w // spatial_merge_size
            grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
            rows.append(grid.reshape(3, -1) + start)
            start += max(h, w)
            i += t * h * w
        if rows:
            positions[:, b, valid] = torch.cat(rows, dim=1)
    return positions
