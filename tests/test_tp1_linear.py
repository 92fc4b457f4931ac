"""torch_linears_at_tp1 (models/tp1_linear.py): at TP = 1 megatron's linear layers run as F.linear. Checked against
megatron's own path (LinearWithGradAccumulationAndAsyncCommunication) on the same layer: the same output and the same
input, weight and bias gradients; the model switches every Column/RowParallelLinear of its language model at TP = 1
and none where the conditions fail. The whole model's logits and gradients against Hugging Face's stay the job of
tests/test_qwen2_5_vl_parity.py. Megatron runs in this process (one gloo rank, megatron_patches.cpu)."""

from __future__ import annotations

import pytest
import torch

from megatron_harness import megatron_in_this_process, output_and_gradients


@pytest.fixture(scope="module")
def megatron():
    with megatron_in_this_process():
        yield


def _config(**extra):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                             **extra)


@pytest.mark.parametrize("skip_bias_add", [False, True])
@pytest.mark.parametrize("kind", ["column", "row"])
def test_a_switched_layer_matches_megatrons_own_path(megatron, kind, skip_bias_add):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from mssr_megatron.models.tp1_linear import torch_linears_at_tp1

    config = _config()
    cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
    extra = dict(gather_output=False) if kind == "column" else dict(input_is_parallel=True)
    torch.manual_seed(0)
    reference = cls(16, 24, config=config, init_method=torch.nn.init.normal_, bias=True, skip_bias_add=skip_bias_add,
                    **extra)
    switched = cls(16, 24, config=config, init_method=torch.nn.init.normal_, bias=True, skip_bias_add=skip_bias_add,
                   **extra)
    switched.load_state_dict(reference.state_dict())
    holder = torch.nn.Sequential(switched)
    assert torch_linears_at_tp1(holder, config) == 1 and "forward" in vars(switched)
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(2))  # [S, B, H]
    for got, want in zip(output_and_gradients(switched, x), output_and_gradients(reference, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_nothing_is_switched_where_megatron_has_work_to_do(megatron):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from mssr_megatron.models.tp1_linear import torch_linears_at_tp1

    config = _config()
    layer = torch.nn.Sequential(ColumnParallelLinear(16, 24, config=config, init_method=torch.nn.init.normal_,
                                                     bias=False, gather_output=False))
    for field, value in (("tensor_model_parallel_size", 2), ("sequence_parallel", True),
                         ("gradient_accumulation_fusion", True), ("defer_embedding_wgrad_compute", True),
                         ("cpu_offloading", True)):
        old = getattr(config, field)
        setattr(config, field, value)  # the check reads the config's fields only
        try:
            assert torch_linears_at_tp1(layer, config) == 0, field
        finally:
            setattr(config, field, old)
    assert "forward" not in vars(layer[0])


def test_the_model_switches_its_language_model_linears_at_tp1(megatron):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.provider import build_model
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config

    model = build_model(tiny_qwen2_5_vl_config(vocab_size=331, num_layers=2), ModelConfig(params_dtype="float32"))
    linears = [m for m in model.language_model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert len(linears) == 2 * 4 + 1  # per layer QKV, projection, FC1, FC2; the output layer
    assert all("forward" in vars(m) for m in linears)


def test_a_supplied_weight_is_used_as_megatrons_output_layer_uses_it(megatron):
    """GPTModel calls its output layer with weight= the tied embedding; the switched forward must use that weight."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from mssr_megatron.models.tp1_linear import torch_linears_at_tp1

    config = _config()
    layers = [ColumnParallelLinear(16, 24, config=config, init_method=torch.nn.init.normal_, bias=False,
                                   gather_output=False, skip_weight_param_allocation=True) for _ in range(2)]
    assert torch_linears_at_tp1(torch.nn.Sequential(layers[1]), config) == 1
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(2))
    results = []
    for layer in layers:
        weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(3)).requires_grad_()
        out, bias = layer(x, weight=weight, runtime_gather_output=False)
        assert bias is None
        out.square().sum().backward()
        results.append((out.detach(), weight.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
