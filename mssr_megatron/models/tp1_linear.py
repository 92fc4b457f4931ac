"""Megatron's linear layers as plain `F.linear` where nothing parallel is left in them (TP = 1).

At TP = 1 without sequence parallelism, gradient-accumulation fusion or deferred embedding gradients, a megatron
ColumnParallelLinear / RowParallelLinear (megatron/core/tensor_parallel/layers.py, 0.16.1) computes input @ W^T (+ b)
through three Python autograd Functions per call: the identity copy into the TP region (Column) or the identity
all-reduce out of it (Row), and LinearWithGradAccumulationAndAsyncCommunication, whose extras (the input gradient's
all-reduce, SP gathers, fused weight-gradient accumulation) are all off. Each pays a Python forward and a Python
backward on every layer and micro-batch; torch's own linear runs in C++ both ways. `torch_linears_at_tp1` gives each
such layer a forward that returns what megatron's returns there, (output, output_bias), through F.linear
(tests/test_tp1_linear.py checks outputs and gradients against megatron's own path).
"""

from __future__ import annotations

import types

import torch.nn.functional as F


def torch_linears_at_tp1(module, config) -> int:
    """Give every ColumnParallelLinear / RowParallelLinear of `module` the F.linear forward when the config leaves
    nothing parallel in them: TP = 1, no sequence parallelism, no gradient-accumulation fusion, no deferred embedding
    weight gradients, no activation offloading. Returns the number of layers switched (0 when the conditions fail)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if (config.tensor_model_parallel_size != 1 or config.sequence_parallel or config.gradient_accumulation_fusion
            or config.defer_embedding_wgrad_compute or config.cpu_offloading):
        return 0
    switched = 0
    for layer in module.modules():
        if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
            layer.forward = types.MethodType(_tp1_forward, layer)  # shadows the class's forward for this layer only
            switched += 1
    return switched


def _tp1_forward(self, input_, weight=None, runtime_gather_output=None):
    """forward(input_ [s, b, in], weight=None, runtime_gather_output=None) -> (output [s, b, out], output_bias) of a
    megatron linear layer at TP = 1: `weight` replaces the layer's own (the output layer with tied embeddings);
    gathering the output over one rank is the identity; the bias is added unless skip_bias_add, which returns it."""
    weight = self.weight if weight is None else weight
    if self.skip_bias_add:
        return F.linear(input_, weight), self.bias
    return F.linear(input_, weight, self.bias), None
