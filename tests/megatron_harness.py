"""Shared pieces of the multi-process Megatron tests: a tiny Qwen2.5-VL case and real gloo processes.

Workers are top-level functions (spawn pickles them by name); they write results with torch.save into a folder the
parent test compares against the Hugging Face reference computed in the parent process.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.multiprocessing as mp

VOCAB = 331  # not divisible by any TP size > 1: exercises Megatron's vocabulary padding
LAYERS = 4  # divisible by PP = 2


def safetensors_in(directory) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files in `directory` (an HF checkpoint folder), read with safetensors."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def tiny_case(tied: bool, seed: int = 0):
    """(hf_config, hf_model, inputs) for a 2-prompt batch, each prompt with one 56x56-pixel image (4 merged tokens),
    right-padded to a common length. inputs holds what both models need (HF keys plus mrope position_ids)."""
    from mssr_megatron.models.rope_index import mrope_position_ids
    from mssr_megatron.models.tiny_hf import init_tiny_model, tiny_qwen2_5_vl_config

    cfg = tiny_qwen2_5_vl_config(vocab_size=VOCAB, tie_word_embeddings=tied, num_layers=LAYERS)
    hf = init_tiny_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)

    def prompt(before: int, after: int) -> list[int]:
        image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 4 + [cfg.vision_end_token_id]
        return (torch.randint(10, 300, (before,), generator=gen).tolist() + image
                + torch.randint(10, 300, (after,), generator=gen).tolist())

    rows = [prompt(5, 7), prompt(3, 4)]
    length = max(map(len, rows))
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    grid = torch.tensor([[1, 4, 4]] * len(rows))
    inputs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(16 * len(rows), 3 * 2 * 14 * 14, generator=gen),
        image_grid_thw=grid,
        mm_token_type_ids=(input_ids == cfg.image_token_id).long(),
    )
    inputs["position_ids"] = mrope_position_ids(input_ids, grid, cfg.image_token_id,
                                                cfg.vision_config.spatial_merge_size, attention_mask)
    return cfg, hf, inputs


def hf_logits(hf, inputs) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        return hf(**{k: inputs[k] for k in keys}).logits


def megatron_batch(inputs) -> dict:
    return {k: inputs[k] for k in ("input_ids", "position_ids", "pixel_values", "image_grid_thw")}


def _entry(rank: int, fn, world_size: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    sys.path.insert(0, os.path.dirname(__file__))
    fn(rank, *args)


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, *args) in `world_size` fresh processes with a torch.distributed environment; raise on failure."""
    from mssr_megatron.parallel import free_port

    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def gather_tp_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full-vocabulary logits from the vocab-parallel shards of this TP group, padding dropped."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, -1)[..., :vocab]


def per_row_microbatches(inputs) -> list[dict]:
    """The batch as one micro-batch per prompt (each prompt holds exactly one image), with `row` = its index."""
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    starts = [sum(patches[:i]) for i in range(len(patches))]
    return [
        {
            "input_ids": inputs["input_ids"][i : i + 1],
            "position_ids": inputs["position_ids"][:, i : i + 1],
            "pixel_values": inputs["pixel_values"][starts[i] : starts[i] + patches[i]],
            "image_grid_thw": inputs["image_grid_thw"][i : i + 1],
            "row": i,
        }
        for i in range(len(patches))
    ]


def output_and_gradients(layer, x: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    """[output, input grad, each parameter's grad] of a megatron layer returning (output, bias) on input x, through a
    fixed random weighting of the output (the bias, when returned apart, added first): what two implementations of
    one layer must agree on."""
    x = x.clone().requires_grad_()
    out, bias = layer(x, **kwargs)
    out = out if bias is None else out + bias
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    grads = [x.grad] + [p.grad if p.grad is not None else p.main_grad for p in layer.parameters()]
    return [out.detach()] + [g.detach().clone() for g in grads]


@contextlib.contextmanager
def megatron_in_this_process(seed: int = 0):
    """Megatron's parallel state for this one CPU process (TP = PP = 1, one gloo rank), in a private world: the
    launcher's variables (MASTER_*, RANK, WORLD_SIZE) are hidden meanwhile, so the rank joins no outer job."""
    import pytest

    from mssr_megatron.parallel import destroy_megatron, init_megatron

    with pytest.MonkeyPatch.context() as mp:
        for name in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE"):
            mp.delenv(name, raising=False)
        init_megatron(1, 1, seed=seed, device="cpu")
        try:
            yield
        finally:
            destroy_megatron()
