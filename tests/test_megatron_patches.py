"""Each CPU patch of megatron-core does its job, and the model's layer-spec / FP8 / recompute settings reach
megatron's TransformerConfig (the Transformer Engine path itself is GPU-only and never runs here)."""

from __future__ import annotations

import pytest
import torch

from megatron_patches.cpu import PATCHES, _CpuTorch, apply_cpu_patches
from mssr_megatron.config import ModelConfig

apply_cpu_patches()


def test_every_patch_documents_what_it_replaces_and_why():
    for patch in PATCHES:
        assert patch.targets and len(patch.why) > 20, patch.name
    from megatron_patches import cpu

    assert "0.16.1" in cpu.CHECKED_VERSIONS and "0.16.1" in cpu.__doc__


def test_device_literal_modules_see_the_cpu_stand_in():
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.utils as mutils

    assert isinstance(schedules.torch, _CpuTorch) and isinstance(mutils.torch, _CpuTorch)
    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.cuda.current_device() == "cpu"
    assert schedules.torch.cuda.synchronize() is None
    assert schedules.torch.distributed is torch.distributed  # everything else passes through
    assert isinstance(torch.zeros(1), torch.Tensor)  # the real torch is untouched outside those modules


def test_global_memory_buffer_allocates_on_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer()
    t = buf.get_tensor((2, 3), torch.float32, "x")
    assert t.shape == (2, 3) and t.device.type == "cpu"
    assert buf.get_tensor((1, 3), torch.float32, "x").data_ptr() == t.data_ptr()  # reused, as on GPU


def test_multimodal_rotary_embedding_builds_on_cpu():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    rope = MultimodalRotaryEmbedding(kv_channels=32, rotary_percent=1.0, rotary_base=10000)
    emb = rope(torch.arange(5).view(1, 1, 5).expand(3, 1, 5), [4, 6, 6])
    assert rope.inv_freq.device.type == "cpu" and torch.isfinite(emb).all()


def test_rng_tracker_forks_and_restores_the_cpu_generator():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    tracker = CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 1234)
    torch.manual_seed(0)
    outside_before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside_before)  # the default stream is untouched
    with tracker.fork():
        second = torch.rand(3)
    torch.manual_seed(1234)
    expected = torch.rand(6)
    assert torch.equal(torch.cat([first, second]), expected)  # the tracked stream continues across forks
    with pytest.raises(Exception, match="already exists"):
        tracker.add("other", 1234)


def test_clip_grads_scales_cpu_float32_grads():
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 2.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert p.grad.tolist() == pytest.approx([0.5] * 4, rel=1e-5)
    p64 = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    p64.grad = torch.full((4,), 2.0, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        clip_grads.clip_grad_by_total_norm_fp32([p64], max_norm=1.0, total_norm=4.0)


def test_tied_embedding_sync_restores_tensor_cuda():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    assert LanguageModule.setup_embeddings_and_output_layer.__name__ == "wrapped"
    original = torch.Tensor.cuda
    x = torch.ones(1)
    with pytest.raises(Exception):
        x.cuda()  # outside the patched call the real Tensor.cuda still refuses without CUDA
    assert torch.Tensor.cuda is original


def test_fp8_and_recompute_settings_reach_transformer_config():
    from mssr_megatron.models.qwen2_5_vl import language_config
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config

    hf = tiny_qwen2_5_vl_config()
    cfg = ModelConfig(params_dtype="bfloat16", transformer_impl="transformer_engine", fp8="hybrid",
                      fp8_recipe="delayed", fp8_amax_history_len=16, fp8_margin=1, fp8_amax_compute_algo="most_recent",
                      recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    tc = language_config(hf, cfg, tp=2, pp=1)
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_amax_history_len, tc.fp8_margin, tc.fp8_amax_compute_algo) == (
        "hybrid", "delayed", 16, 1, "most_recent")
    assert (tc.recompute_granularity, tc.recompute_method, tc.recompute_num_layers) == ("full", "uniform", 1)
    assert tc.bf16 and tc.params_dtype == torch.bfloat16 and tc.tensor_model_parallel_size == 2
    assert tc.num_query_groups == 2 and tc.add_qkv_bias and not tc.add_bias_linear and tc.gated_linear_unit
    assert tc.mrope_section == [4, 6, 6] and tc.normalization == "RMSNorm"


def test_transformer_engine_without_te_fails_with_one_clear_message():
    from mssr_megatron.models.qwen2_5_vl import _te_available, layer_spec

    if _te_available():
        pytest.skip("Transformer Engine is installed here")
    with pytest.raises(RuntimeError, match="needs Transformer Engine with a CUDA GPU.*transformer_impl=local"):
        layer_spec(ModelConfig(transformer_impl="transformer_engine"))
    with pytest.raises(RuntimeError, match="model.fp8 needs"):
        layer_spec(ModelConfig(transformer_impl="local", fp8="hybrid"))


def test_optimizers_sort_cpu_params_by_their_cuda_type_only_inside_their_constructors():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    from megatron_patches.cpu import _with_tensor_type_as_cuda

    def types_seen():
        return (torch.zeros(1).type(), torch.zeros(1, dtype=torch.bfloat16).type(),
                torch.zeros(1, dtype=torch.float16).type(), torch.zeros(1).type(torch.float64).dtype)

    assert _with_tensor_type_as_cuda(types_seen)() == (
        "torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor", "torch.cuda.HalfTensor", torch.float64)
    assert torch.zeros(1).type() == "torch.FloatTensor"  # restored after the call
    assert DistributedOptimizer.__init__.__name__ == "wrapped"
    assert Float16OptimizerWithFloat16Params.__init__.__name__ == "wrapped"


def test_sequence_parallel_and_distributed_optimizer_modules_see_the_cpu_stand_in():
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.tensor_parallel.mappings as mappings

    assert isinstance(mappings.torch, _CpuTorch) and isinstance(distrib_optimizer.torch, _CpuTorch)
    # the literal the SP reduce-scatter / all-gather use for their outputs
    assert mappings.torch.empty(3, device=mappings.torch.cuda.current_device()).device.type == "cpu"
