"""Core attention of the local layer spec through torch's fused `scaled_dot_product_attention` (SDPA).

Why: megatron-core's local `DotProductAttention` (megatron/core/transformer/dot_product_attention.py, 0.16.1) is the
unfused reference: repeat the key/value groups, baddbmm into a [b*np, sq, sk] score buffer, scale, build and apply a
causal mask, softmax, bmm. On the CPU its forward and backward were most of the gap between the Megatron update and
a plain Hugging Face one (which runs SDPA): attention 0.40 s vs 0.17 s of forward over the same micro-batches
(docs/benchmarks.md, "Megatron update vs plain PyTorch"). SDPA computes the same function in one kernel (CPU: the
flash-attention CPU kernel) and never materialises the score matrix. On CUDA torch picks its flash,
memory-efficient or cuDNN kernel (GPU-only: not run (no GPU was available)).

The contract is megatron's `CoreAttention` protocol (megatron/core/transformer/attention.py):
    forward(query [sq, b, np, hn], key [sk, b, ng, hn], value [sk, b, ng, hn], attention_mask (True = masked, or
            None), attn_mask_type=..., attention_bias=None, packed_seq_params=None) -> context [sq, b, np * hn]
with np / ng this rank's attention heads / key-value groups. The same inputs give DotProductAttention's output up to
float rounding (tests/test_sdpa_attention.py checks forward and gradients against it), except for a query row whose
keys are all masked (an explicit mask only; padding): zeros here, the mean of the values there (its scores are all
filled with -10000). Our model passes no mask (causal), so no row is ever fully masked. What DotProductAttention
refuses (context parallelism, packed sequences, attention bias) is refused here too, and so are the options it
supports that this module does not implement (sliding windows, non-vanilla softmax): a clear error at build.
The Transformer Engine spec keeps TE's own fused attention; this module is only put into the local spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Causal (or explicitly masked) attention of one layer through F.scaled_dot_product_attention; built by
    megatron's SelfAttention with the CoreAttentionBuilder keywords."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        from megatron.core.transformer.utils import is_layer_window_attention

        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine's attention "
                             "(model.transformer_impl=transformer_engine); the local spec has none")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("sliding-window attention (config.window_size) is not implemented by the local "
                             "SDPA core attention; use model.transformer_impl=transformer_engine")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not implemented by the local SDPA core "
                             "attention (only 'vanilla')")
        if pg_collection is None:
            from megatron.core import parallel_state as ps

            tp = ps.get_tensor_model_parallel_world_size()
        else:
            tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        # apply_query_key_layer_scaling divides the scores by the layer number and multiplies them back inside
        # megatron's softmax: the product is this scale either way
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        from megatron.core import tensor_parallel
        from megatron.core.transformer.enums import AttnMaskType

        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("packed sequences and attention bias need Transformer Engine's attention "
                             "(model.transformer_impl=transformer_engine)")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, hn]
        # megatron's mask is True where attention is NOT allowed; SDPA's boolean mask is True where it is
        mask = None if attention_mask is None else ~attention_mask
        # grouped-query attention: each key/value group serves heads/groups query heads. Without a mask SDPA takes
        # the groups as they are (enable_gqa: no copy; CPU, tiny shapes: 10-20% faster than repeating them); with a
        # mask they are repeated, since torch's CUDA kernels take enable_gqa only without one
        gqa = self.groups != self.heads and mask is None
        if self.groups != self.heads and not gqa:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        if causal and sq != k.shape[2]:
            raise ValueError("a causal mask without an explicit attention_mask needs self-attention (sq == sk)")
        dropout = self.dropout_p if self.training else 0.0
        # dropout draws from the same RNG stream as DotProductAttention's (the TP-model-parallel one)
        fork = dropout > 0.0 and not self.config.sequence_parallel
        with tensor_parallel.get_cuda_rng_tracker().fork() if fork else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                 scale=self.softmax_scale, enable_gqa=gqa)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * out.shape[-1])  # [sq, b, np * hn]


def with_sdpa_core_attention(layer_spec):
    """The local TransformerLayer spec with SDPACoreAttention as its self-attention's core attention (a spec whose
    self-attention has no core_attention field is returned unchanged)."""
    attention = layer_spec.submodules.self_attention
    submodules = getattr(attention, "submodules", None)
    if submodules is None or not hasattr(submodules, "core_attention"):
        return layer_spec
    attention = dataclasses.replace(attention,
                                    submodules=dataclasses.replace(submodules, core_attention=SDPACoreAttention))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules,
                                                                          self_attention=attention))
