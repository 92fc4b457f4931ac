"""Sequence parallelism pieces that run in one process: the SP-marked RMSNorm of the local spec (same values as the
torch norm megatron uses, weight marked for megatron's TP gradient all-reduce), the spec swap, and the config rules for
sequence parallelism and the distributed optimizer (both now accepted on CPU)."""

from __future__ import annotations

import pytest
import torch

from mssr_megatron.config import ConfigError, load_config


def _config(sequence_parallel: bool):
    from megatron.core.transformer import TransformerConfig

    # TransformerConfig refuses SP at TP 1 (megatron-core's own check); the norm only reads the flags
    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, normalization="RMSNorm")
    config.sequence_parallel = sequence_parallel
    return config


def test_sequence_parallel_rmsnorm_matches_torch_rmsnorm_and_marks_its_weight():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from mssr_megatron.models.sequence_parallel_norm import SequenceParallelRMSNorm

    reference = WrappedTorchNorm(_config(False), 16, eps=1e-6)
    norm = SequenceParallelRMSNorm(_config(True), 16, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 1.5, 16))
    norm.load_state_dict(reference.state_dict())  # same parameter name, so checkpoints are interchangeable
    x = torch.randn(5, 2, 16)
    torch.testing.assert_close(norm(x), reference(x), rtol=0, atol=0)
    unfused = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * reference.weight
    torch.testing.assert_close(norm(x), unfused, rtol=1e-6, atol=1e-6)
    assert norm.weight.sequence_parallel is True
    assert SequenceParallelRMSNorm(_config(False), 16).weight.sequence_parallel is False
    with pytest.raises(AssertionError, match="sequence parallel not supported"):  # what it replaces
        WrappedTorchNorm(_config(True), 16)


def test_block_spec_swaps_every_torch_norm_of_the_local_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from mssr_megatron.models.sequence_parallel_norm import SequenceParallelRMSNorm, sequence_parallel_block_spec
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(1, 1, seed=0)
    try:
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
        block = sequence_parallel_block_spec(layer, _config(True))
    finally:
        destroy_megatron()
    assert layer.submodules.input_layernorm is WrappedTorchNorm  # the given spec is left as it was
    assert len(block.layer_specs) == 2 and block.layer_norm is SequenceParallelRMSNorm
    sub = block.layer_specs[0].submodules
    assert sub.input_layernorm is SequenceParallelRMSNorm and sub.pre_mlp_layernorm is SequenceParallelRMSNorm
    assert sub.self_attention == layer.submodules.self_attention and sub.mlp == layer.submodules.mlp
    assert sequence_parallel_block_spec(block.layer_specs[0], _config(True)) is block.layer_specs[0]  # nothing to swap


def test_config_accepts_sp_and_the_distributed_optimizer_on_cpu_and_refuses_sp_at_tp1():
    cfg = load_config(None, ["trainer.device=cpu", "parallel.tensor_model_parallel_size=2",
                             "parallel.sequence_parallel=true", "parallel.use_distributed_optimizer=true"])
    assert cfg.parallel.sequence_parallel and cfg.parallel.use_distributed_optimizer
    with pytest.raises(ConfigError, match="needs parallel.tensor_model_parallel_size > 1"):
        load_config(None, ["parallel.sequence_parallel=true"])
