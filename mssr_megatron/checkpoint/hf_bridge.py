"""Move weights between a Hugging Face state dict (published names) and one Megatron model stage, by the mapping table.

    dims = ModelDims.from_hf_config(hf_config, padded_vocab_size(vocab, tp))
    consumed = load_hf_weights(model, hf_state, dims)          # this rank's TP shard of every parameter
    for name, tensor in export_hf_weights(model, dims): ...    # full HF tensors of this pipeline stage (TP gathered)

Both walk the model's own parameters, so every Megatron parameter must have a mapping (a missing one is an error
naming it), and shapes and dtypes are checked tensor by tensor.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from mssr_megatron.checkpoint.mapping import (
    Mapping,
    ModelDims,
    Replicated,
    VocabParallel,
    global_layer_name,
    resolve,
)

TIED_OUTPUT = "language_model.output_layer.weight"
EMBEDDING_HF = "model.embed_tokens.weight"


def _tp():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 0, 1, None
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_group())


def _layer_offset(model) -> int:
    layers = model.language_model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def megatron_parameters(model) -> Iterator[tuple[str, torch.nn.Parameter, Mapping, list[str]]]:
    """(global name, parameter, mapping, HF names) for every parameter of this stage; local-spec and Transformer
    Engine names both resolve through the mapping table."""
    offset = _layer_offset(model)
    tied = model.share_embeddings_and_output_weights
    for local_name, param in model.named_parameters():
        name = global_layer_name(local_name, offset)
        if tied and name == TIED_OUTPUT:  # the last stage's copy of the tied embedding (pipeline parallel)
            yield name, param, VocabParallel(name, (EMBEDDING_HF,)), [EMBEDDING_HF]
            continue
        mapping, hf_names = resolve(name)
        yield name, param, mapping, hf_names


@torch.no_grad()
def load_hf_weights(model, hf_state: dict[str, torch.Tensor], dims: ModelDims) -> set[str]:
    """Copy this rank's shard of every parameter from `hf_state`; returns the HF names that were read."""
    rank, size, _ = _tp()
    consumed: set[str] = set()
    for name, param, mapping, hf_names in megatron_parameters(model):
        missing = [h for h in hf_names if h not in hf_state]
        if missing:
            raise KeyError(f"the Hugging Face checkpoint lacks {', '.join(missing)} (needed for {name})")
        shard = mapping.to_shard([hf_state[h] for h in hf_names], rank, size, dims)
        if shard.shape != param.shape:
            raise ValueError(f"{name}: expected a shard of shape {tuple(param.shape)} from {', '.join(hf_names)}, "
                             f"got {tuple(shard.shape)}: does the checkpoint match the model config?")
        param.copy_(shard.to(param.dtype))
        consumed.update(hf_names)
    return consumed


@torch.no_grad()
def export_hf_weights(model, dims: ModelDims, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors of this pipeline stage, one parameter at a time (TP shards all-gathered).

    Peak extra memory is one full parameter (plus its TP shards). The tied output layer copy is skipped: the
    embedding is exported by the first stage.
    """
    _, size, group = _tp()
    for name, param, mapping, hf_names in megatron_parameters(model):
        if model.share_embeddings_and_output_weights and name == TIED_OUTPUT:
            continue
        local = param.detach()
        if size > 1 and not isinstance(mapping, Replicated):
            shards = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(shards, local.contiguous(), group=group)
        else:
            shards = [local] * size
        for hf_name, tensor in zip(hf_names, mapping.to_hf(shards, dims)):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)
