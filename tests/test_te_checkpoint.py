"""Checkpoints written with the Transformer Engine layer spec convert to HF, and TE-named models export through the
mapping table.

Transformer Engine cannot run here, so a TP=2 stage is given TE's module layout on CPU: the pre-attention / pre-MLP
norms fused into linear_qkv / linear_fc1 as `layer_norm_weight` (TELayerNormColumnParallelLinear), no separate norm
modules, and the extra state TE modules return from get_extra_state (their FP8 metadata pickled into a uint8 tensor;
an empty one for TE's RMSNorm, the final norm whenever TE is installed). Its checkpoint is then written by megatron's
own sharded_state_dict code (make_sharded_tensors_for_checkpoint: `*._extra_state` -> ShardedObject), as for TE modules,
converted with `mssr convert --to hf`, and compared with the source tensors bit for bit.
"""

from __future__ import annotations

import json
import os
import pickle
import types

import pytest
import torch

from megatron_harness import LAYERS, VOCAB, safetensors_in, spawn
from mssr_megatron.checkpoint.metadata import METADATA_FILE, layer_metadata
from mssr_megatron.config import ModelConfig

TE_FP8 = ModelConfig(transformer_impl="transformer_engine", fp8="hybrid", fp8_recipe="delayed")


def _te_extra_state(fp8: bool) -> torch.Tensor:
    """What a TE module's get_extra_state returns: its FP8 scaling state pickled into a uint8 tensor (empty without
    FP8 state)."""
    if not fp8:
        return torch.empty(0, dtype=torch.uint8)
    state = {"forward": {"scale_fwd": torch.ones(3), "amax_history_fwd": torch.rand(16, 3),
                         "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True}}}
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)


def _with_extra_state(module, state: torch.Tensor) -> None:
    """Give `module` TE's extra state (torch only saves it when the class overrides get_extra_state)."""
    cls = type(module)
    module.__class__ = type(f"TE{cls.__name__}", (cls,), {"get_extra_state": lambda self: state,
                                                          "set_extra_state": lambda self, value: None})


def to_te_layout(model) -> None:
    """The Transformer Engine spec's parameter names and extra states on a local-spec stage (see the module doc)."""
    from megatron.core.transformer.identity_op import IdentityOp

    for layer in model.language_model.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        attention.linear_qkv.register_parameter("layer_norm_weight", layer.input_layernorm.weight)
        mlp.linear_fc1.register_parameter("layer_norm_weight", layer.pre_mlp_layernorm.weight)
        layer.input_layernorm, layer.pre_mlp_layernorm = IdentityOp(), IdentityOp()
        for linear in (attention.linear_qkv, attention.linear_proj, mlp.linear_fc1, mlp.linear_fc2):
            _with_extra_state(linear, _te_extra_state(fp8=True))
    _with_extra_state(model.language_model.decoder.final_layernorm, _te_extra_state(fp8=False))


def _te_checkpoint_worker(rank: int, hf_dir: str, ckpt_dir: str, out_dir: str) -> None:
    """TP=2: build the stage with TE names, load the HF weights through the table, export them back, save the
    checkpoint with dist_checkpointing and (rank 0) the metadata of a TE + FP8 run."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from transformers import AutoConfig

    from mssr_megatron.checkpoint.metadata import write_metadata
    from mssr_megatron.checkpoint.dist_io import HFTensors
    from mssr_megatron.checkpoint.hf_bridge import export_hf_weights, load_hf_weights
    from mssr_megatron.checkpoint.mapping import ModelDims
    from mssr_megatron.models.provider import build_model
    from mssr_megatron.models.qwen2_5_vl import padded_vocab_size
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(2, 1, seed=0)
    try:
        config = AutoConfig.from_pretrained(hf_dir)
        model = build_model(config, ModelConfig(params_dtype="float32"))
        to_te_layout(model)
        dims = ModelDims.from_hf_config(config, padded_vocab_size(config.text_config.vocab_size, 2))
        consumed = load_hf_weights(model, HFTensors(hf_dir), dims)
        exported = {name: t.clone() for name, t in export_hf_weights(model, dims)}
        sharded = model.sharded_state_dict()
        extra = {k: (type(v) is ShardedObject, v.global_shape, v.global_offset, v.replica_id, bool(len(v.data)))
                 for k, v in sharded.items() if k.endswith("._extra_state")}
        dist_checkpointing.save(sharded, ckpt_dir)
        if rank == 0:
            write_metadata(ckpt_dir, hf_dir, tp=2, pp=1, dtype="float32", vocab_size=dims.vocab_size,
                           padded_vocab_size=dims.padded_vocab_size, num_layers=config.text_config.num_hidden_layers,
                           tie_word_embeddings=False, **layer_metadata(TE_FP8))
            torch.save({"names": [n for n, _ in model.named_parameters()], "consumed": sorted(consumed),
                        "exported": exported, "extra": extra}, os.path.join(out_dir, "stage.pt"))
    finally:
        destroy_megatron()


@pytest.fixture(scope="module")
def te_checkpoint(tmp_path_factory):
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    work = tmp_path_factory.mktemp("te_ckpt")
    hf_dir = build_tiny_model_dir(work / "hf", seed=3, tie_word_embeddings=False, vocab_size=VOCAB, num_layers=LAYERS)
    os.makedirs(work / "ckpt")
    spawn(_te_checkpoint_worker, 2, str(hf_dir), str(work / "ckpt"), str(work))
    return types.SimpleNamespace(hf=str(hf_dir), ckpt=str(work / "ckpt"), work=work,
                                 stage=torch.load(work / "stage.pt", weights_only=False))


@pytest.mark.slow
def test_te_named_stage_loads_and_exports_through_the_table(te_checkpoint):
    names, source = te_checkpoint.stage["names"], safetensors_in(te_checkpoint.hf)
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "language_model.decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in names
    assert not [n for n in names if "input_layernorm" in n or "pre_mlp_layernorm" in n]
    assert te_checkpoint.stage["consumed"] == sorted(source)
    exported = te_checkpoint.stage["exported"]
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(exported[k], source[k]) for k in source)


@pytest.mark.slow
def test_te_checkpoint_holds_extra_state_as_megatron_writes_it(te_checkpoint):
    extra = te_checkpoint.stage["extra"]
    final = extra.pop("language_model.decoder.final_layernorm._extra_state")
    assert final == (True, (1,), (0,), (0, 0, 0), False)  # ShardedObject, replicated, TE's empty norm state
    linears = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
    # (GPTModel drops the output layer's empty one)
    assert sorted(extra) == sorted(f"language_model.decoder.layers.{i}.{m}._extra_state"
                                   for i in range(LAYERS) for m in linears)
    assert all(v[0] and v[1] == (LAYERS,) and v[4] for v in extra.values())  # ShardedObjects holding FP8 metadata
    meta = json.loads(open(os.path.join(te_checkpoint.ckpt, METADATA_FILE)).read())
    assert meta["transformer_impl"] == "transformer_engine"
    assert meta["fp8"] == {"format": "hybrid", "recipe": "delayed", "margin": 0, "amax_history_len": 1024,
                           "amax_compute_algo": "max"}


@pytest.mark.slow
def test_te_checkpoint_converts_to_hf_exactly(te_checkpoint, capsys):
    from mssr_megatron.checkpoint.convert_cli import main

    out = te_checkpoint.work / "hf_out"
    assert main(["--to", "hf", "--input", te_checkpoint.ckpt, "--output", str(out), "--quiet"]) == 0, \
        capsys.readouterr().err
    converted, source = safetensors_in(out), safetensors_in(te_checkpoint.hf)
    assert sorted(converted) == sorted(source)
    assert all(torch.equal(converted[k], source[k]) for k in source)


def test_run_checkpoint_metadata_records_the_layer_implementation(tmp_path, monkeypatch):
    """The trainer's run checkpoints record transformer_impl and the FP8 settings of the run's model config."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.checkpoint.mapping import ModelDims
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir, tiny_qwen2_5_vl_config
    from mssr_megatron.train.run_checkpoint import _write_conversion_metadata

    hf_dir = build_tiny_model_dir(tmp_path / "hf", seed=0, num_layers=2)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: 1)
    hf_config = tiny_qwen2_5_vl_config(num_layers=2)
    model = ModelConfig(hf_path=str(hf_dir), params_dtype="bfloat16", transformer_impl="transformer_engine",
                        fp8="e4m3", fp8_recipe="tensorwise", fp8_amax_history_len=16)
    ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(model=model), hf_config=hf_config,
                                actor=types.SimpleNamespace(dims=ModelDims.from_hf_config(hf_config, 512)))
    (tmp_path / "model").mkdir()
    _write_conversion_metadata(ctx, str(tmp_path / "model"))
    meta = json.loads((tmp_path / "model" / METADATA_FILE).read_text())
    assert (meta["transformer_impl"], meta["state_key"], meta["source_tp"]) == ("transformer_engine", "model", 2)
    assert meta["fp8"] == {"format": "e4m3", "recipe": "tensorwise", "margin": 0, "amax_history_len": 16,
                           "amax_compute_algo": "max"}


@pytest.mark.parametrize("te_name,local_name,hf_name", [
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
])
def test_table_maps_the_te_fused_norm_names(te_name, local_name, hf_name):
    from mssr_megatron.checkpoint.mapping import resolve

    te, local = (resolve(f"language_model.decoder.layers.7.{n}") for n in (te_name, local_name))
    assert te == local and te[1] == [f"model.layers.7.{hf_name}"]


def test_extra_state_entries_are_recognised():
    from mssr_megatron.checkpoint.mapping import is_extra_state

    assert is_extra_state("model.language_model.decoder.final_layernorm._extra_state")
    assert is_extra_state("language_model.decoder.layers.0.mlp.experts.linear_fc1._extra_state3")
    assert not is_extra_state("language_model.decoder.layers.0.mlp.linear_fc1.weight")
    assert not is_extra_state("vision_model.blocks.0.my_extra_state")
