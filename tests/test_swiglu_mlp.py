"""swiglu_mlps (models/swiglu_mlp.py): megatron's MLP with silu(gate) * up written out. Checked against megatron's own
MLP.forward on the same layer (outputs, input and weight gradients), the saved-activation bytes it drops (one
[s, b, ffn] tensor: megatron's `up + glu_linear_offset`), where it is not applied, and that the model applies it.
Megatron runs in this process (one gloo rank, megatron_patches.cpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_harness import megatron_in_this_process, output_and_gradients

S, B, H, FFN = 5, 3, 16, 24


@pytest.fixture(scope="module")
def megatron():
    with megatron_in_this_process():
        yield


def _config(**extra):
    from megatron.core.transformer import TransformerConfig

    fields = dict(num_layers=1, hidden_size=H, ffn_hidden_size=FFN, num_attention_heads=2, gated_linear_unit=True,
                  activation_func=F.silu, bias_activation_fusion=False, use_cpu_initialization=True)
    return TransformerConfig(**{**fields, **extra})


def _mlp(config, bias: bool = False):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    config.add_bias_linear = bias
    torch.manual_seed(0)  # the same weights on every call
    return MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
               ffn_hidden_size=FFN)


@pytest.mark.parametrize("bias", [False, True])
def test_the_switched_mlp_matches_megatrons_forward(megatron, bias):
    from mssr_megatron.models.swiglu_mlp import swiglu_mlps

    config = _config()
    reference = _mlp(config, bias)
    switched = _mlp(config, bias)
    assert swiglu_mlps(torch.nn.Sequential(switched), config) == 1 and "forward" in vars(switched)
    x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(2))  # [s, b, h]
    for got, want in zip(output_and_gradients(switched, x), output_and_gradients(reference, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if bias:  # megatron's per-token path adds fc2's bias in place on a custom Function's output: autograd refuses
        return
    scale = torch.rand(S, B, generator=torch.Generator().manual_seed(3))  # per-token scales: megatron's own path
    for got, want in zip(output_and_gradients(switched, x, per_token_scale=scale),
                         output_and_gradients(reference, x, per_token_scale=scale)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def _saved_bytes(mlp, x) -> int:
    """Bytes of the distinct tensor storages autograd keeps for backward through one forward of `mlp`."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        mlp(x.clone().requires_grad_())
    return sum(storages.values())


def test_the_switched_mlp_keeps_one_ffn_sized_activation_less(megatron):
    from mssr_megatron.models.swiglu_mlp import swiglu_mlps

    config = _config()
    reference = _mlp(config)
    switched = _mlp(config)
    swiglu_mlps(torch.nn.Sequential(switched), config)
    x = torch.randn(S, B, H, generator=torch.Generator().manual_seed(2))
    # megatron's product keeps `up + 0.0`, a new [s, b, ffn] float32 tensor; the switched one keeps fc1's output
    assert _saved_bytes(reference, x) - _saved_bytes(switched, x) == S * B * FFN * 4


@pytest.mark.parametrize("field, value", [("gated_linear_unit", False), ("activation_func", F.gelu),
                                          ("glu_linear_offset", 1.0), ("activation_func_clamp_value", 7.0),
                                          ("use_te_activation_func", True), ("bias_activation_fusion", True)])
def test_nothing_is_switched_where_the_mlp_is_not_plain_swiglu(megatron, field, value):
    from mssr_megatron.models.swiglu_mlp import swiglu_mlps

    config = _config()
    holder = torch.nn.Sequential(_mlp(config))
    setattr(config, field, value)  # the check reads the config's fields only
    assert swiglu_mlps(holder, config) == 0 and "forward" not in vars(holder[0])


def test_the_model_switches_its_mlps_on_the_local_spec(megatron):
    from megatron.core.transformer.mlp import MLP

    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.provider import build_model
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config

    model = build_model(tiny_qwen2_5_vl_config(vocab_size=331, num_layers=2), ModelConfig(params_dtype="float32"))
    mlps = [m for m in model.language_model.modules() if isinstance(m, MLP)]
    assert len(mlps) == 2 and all("forward" in vars(m) for m in mlps)
