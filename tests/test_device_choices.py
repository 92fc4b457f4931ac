"""Device-dependent choices made on CPU-testable functions: the MXFP8 recipe is refused below Blackwell (compute
capability 10.0, where Transformer Engine starts running MXFP8 GEMMs), at config-check time and at model build on
CUDA; the vision tower uses flash-attention only where flash_attn imports and the tower runs on CUDA in bf16/fp16."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from mssr_megatron.config import ConfigError, ModelConfig, load_config
from mssr_megatron.config_checks import fp8_recipe_problem
from mssr_megatron.models import qwen2_5_vl

CONFIG_7B = str(Path(__file__).resolve().parents[1] / "examples" / "configs" / "qwen2_5_vl_7b_mssr.yaml")
FP8_MXFP8 = ["model.fp8=e4m3", "model.fp8_recipe=mxfp8"]


@pytest.mark.parametrize("capability,refused", [((8, 0), True), ((8, 9), True), ((9, 0), True), ((10, 0), False),
                                                ((10, 3), False), ((12, 0), False)])
def test_mxfp8_needs_compute_capability_10(capability, refused):
    problem = fp8_recipe_problem("mxfp8", capability)
    assert (problem is not None) == refused
    if refused:
        assert "Blackwell" in problem and f"{capability[0]}.{capability[1]}" in problem and "delayed" in problem


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_other_recipes_are_not_refused_on_hopper(recipe):
    assert fp8_recipe_problem(recipe, (9, 0)) is None


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_config_check_refuses_mxfp8_on_an_h100(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0))
    with pytest.raises(ConfigError, match="mxfp8 needs a Blackwell GPU"):
        load_config(CONFIG_7B, FP8_MXFP8)
    load_config(CONFIG_7B, ["model.fp8=e4m3", "model.fp8_recipe=delayed"])  # other recipes pass
    load_config(CONFIG_7B, ["model.fp8_recipe=mxfp8"])  # the recipe is unused without model.fp8


def test_config_check_accepts_mxfp8_on_blackwell_and_without_a_gpu(monkeypatch):
    _fake_gpu(monkeypatch, (10, 0))
    assert load_config(CONFIG_7B, FP8_MXFP8).model.fp8_recipe == "mxfp8"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # e.g. a login node: checked again at build
    assert load_config(CONFIG_7B, FP8_MXFP8).model.fp8 == "e4m3"


def test_model_build_refuses_mxfp8_on_an_h100(monkeypatch):
    _fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(qwen2_5_vl, "_te_available", lambda: True)
    with pytest.raises(RuntimeError, match="compute capability >= 10.0"):
        qwen2_5_vl.layer_spec(ModelConfig(transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe="mxfp8"))


@pytest.mark.parametrize("importable", [True, False], ids=["flash_attn", "no_flash_attn"])
@pytest.mark.parametrize("on_cuda", [True, False], ids=["cuda", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_vision_attention_choice(monkeypatch, importable, on_cuda, dtype):
    # importable: a stand-in module; not importable: None in sys.modules makes `import flash_attn` raise ImportError
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn") if importable else None)
    expected = "flash_attention_2" if importable and on_cuda and dtype != torch.float32 else "sdpa"
    assert qwen2_5_vl.vision_attention_implementation(on_cuda, dtype) == expected


def test_flash_attn_is_not_installed_here():
    """The CPU test machines have no flash_attn: the real check must say so (the tower then runs sdpa)."""
    assert not qwen2_5_vl._flash_attn_available()
    assert qwen2_5_vl.vision_attention_implementation(True, torch.bfloat16) == "sdpa"
