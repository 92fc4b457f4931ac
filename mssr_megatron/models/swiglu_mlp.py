"""Megatron's MLP with its gated SiLU written out: fc1 -> silu(gate) * up -> fc2, no GLU-offset pass.

Why: megatron-core's MLP (megatron/core/transformer/mlp.py, 0.16.1) without bias-activation fusion computes
`activation_func(gate) * (up + config.glu_linear_offset)`. The offset is 0.0 for Qwen2 (a GLU variant needs it), yet
the addition still runs: one more elementwise pass over the [s, b, ffn] half of fc1's output in every layer and
micro-batch, and its result is a new tensor that the product keeps for backward (one [s, b, ffn] activation per
layer more than `plan/memory.py` counts). Megatron's fused path (`bias_activation_fusion`) goes through its
`jit_fuser`, which is torch.compile: a compiler toolchain and a compile per new shape on the CPU.
`swiglu_mlps` gives each MLP a forward that computes the same function with torch's eager ops and no offset: same
values, gradients equal up to float rounding (tests/test_swiglu_mlp.py checks both against megatron's forward on the
same layer). The local spec's model gets it (`Qwen2_5_VLMegatron`); Transformer Engine's layers keep their own.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def swiglu_mlps(module, config) -> int:
    """Give every megatron MLP of `module` the plain SwiGLU forward when the config's MLP is exactly that: gated
    SiLU, GLU offset 0, no activation clamp, neither Transformer Engine's activation ops nor fused bias-activation.
    Returns the number of MLPs switched (0 when the conditions fail: megatron's forward then stays)."""
    from megatron.core.transformer.mlp import MLP

    if (not config.gated_linear_unit or config.activation_func is not F.silu or config.glu_linear_offset != 0.0
            or config.activation_func_clamp_value is not None or config.use_te_activation_func
            or config.bias_activation_fusion):
        return 0
    switched = 0
    for mlp in module.modules():
        if type(mlp) is MLP:  # not its subclasses, whose forward may differ
            mlp.forward = types.MethodType(_swiglu_forward, mlp)  # shadows MLP.forward for this layer only
            switched += 1
    return switched


def _swiglu_forward(self, hidden_states, per_token_scale=None, **kwargs):
    """hidden_states [s, b, h] -> (fc2(silu(gate) * up) [s, b, h], fc2's bias or None), where gate, up are the two
    halves of fc1's output [s, b, 2 * ffn / TP] (megatron's fc1 layout: each TP rank holds its [gate; up] pair).
    Per-token scales (MoE experts) take megatron's own forward."""
    if per_token_scale is not None:
        return type(self).forward(self, hidden_states, per_token_scale, **kwargs)
    projected, bias = self.linear_fc1(hidden_states)
    if bias is not None:
        projected = projected + bias
    gate, up = torch.chunk(projected, 2, dim=-1)
    return self.linear_fc2(F.silu(gate) * up)
