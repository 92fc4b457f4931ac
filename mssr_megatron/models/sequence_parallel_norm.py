"""RMSNorm for megatron-core's local layer spec under sequence parallelism (SP).

What it replaces, and why: without apex, the local spec (`get_gpt_layer_local_spec`) and the transformer block's
final norm use `WrappedTorchNorm` (megatron/core/transformer/torch_norm.py), which asserts
`not config.sequence_parallel` (megatron-core 0.16.1). Under SP each tensor-parallel rank normalises only its
[S/TP, B, H] slice of the sequence. RMSNorm works token by token, so a plain `torch.nn.RMSNorm` computes the right
values; only its weight gradient is partial (a sum over this rank's tokens). megatron-core sums exactly such gradients
over the TP group in `finalize_model_grads` (`_allreduce_non_tensor_model_parallel_grads`) for parameters marked
`sequence_parallel=True`, as Transformer Engine's and apex's norms mark theirs. `SequenceParallelRMSNorm` is that
marked norm, and `sequence_parallel_block_spec` puts it in place of every `WrappedTorchNorm` of the local spec.
The Transformer Engine spec (and apex's FusedLayerNorm) support SP themselves and are left as they are.
"""

from __future__ import annotations

import dataclasses

import torch


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm built like WrappedTorchNorm (same arguments, same parameter `weight`), with the weight marked
    `sequence_parallel` so that megatron all-reduces its gradient over the TP group under SP."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("SequenceParallelRMSNorm is an RMSNorm without zero-centred gamma; got "
                             f"normalization={config.normalization!r}, "
                             f"zero_centered_gamma={config.layernorm_zero_centered_gamma}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def sequence_parallel_block_spec(layer_spec, config):
    """The transformer-block spec for GPTModel under SP: `layer_spec` (a TransformerLayer ModuleSpec) with its
    WrappedTorchNorm norms replaced by SequenceParallelRMSNorm, repeated for this stage's layers, and the same norm as
    the final norm (the block would otherwise pick WrappedTorchNorm). A spec without WrappedTorchNorm (Transformer
    Engine, apex) is returned unchanged."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    submodules = layer_spec.submodules
    norms = {f.name: SequenceParallelRMSNorm for f in dataclasses.fields(submodules)
             if getattr(submodules, f.name) is WrappedTorchNorm}
    if not norms:
        return layer_spec
    layer = dataclasses.replace(layer_spec, submodules=dataclasses.replace(submodules, **norms))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelRMSNorm)
