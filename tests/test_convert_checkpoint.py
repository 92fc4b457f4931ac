"""Checkpoint conversion HF <-> Megatron on CPU with real gloo processes, on tiny Qwen2.5-VL directories (vocabulary
331, 4 layers, tied and untied): bit-exact round trips, resharded loads that reproduce the HF logits, one-line errors
that leave nothing behind, and the command line.

Both ways of running are covered: a 2-process world calls the converter from inside itself (HF -> Megatron at TP=2
for both models, bad checkpoints, the untied way back at TP=1 x PP=2, resharded logits), and calls from this
(non-distributed) process spawn their own ranks (the tied way back at TP=1, a bad checkpoint through the CLI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_harness import (LAYERS, VOCAB, gather_tp_logits, hf_logits, megatron_batch, safetensors_in, spawn,
                              tiny_case)
from mssr_megatron.checkpoint.convert import ConversionError, hf_to_megatron, megatron_to_hf

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
WEIGHT_FILES = (".safetensors", ".safetensors.index.json")


def _leftovers(path) -> list[str]:
    """The output and any temporary sibling of it."""
    path = Path(path)
    return sorted(p.name for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(f".{path.name}."))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf_dirs(work) -> dict[bool, str]:
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    return {tied: build_tiny_model_dir(work / f"hf_tied_{tied}", seed=0, tie_word_embeddings=tied, vocab_size=VOCAB,
                                       num_layers=LAYERS) for tied in (True, False)}


@pytest.fixture(scope="module")
def bad_dirs(work, hf_dirs) -> dict[str, str]:
    """Copies of the untied directory: one with an extra tensor, one without a tensor, one with another model_type."""
    from safetensors.torch import load_file, save_file

    dirs = {}
    for case in ("extra", "missing", "model_type"):
        path = shutil.copytree(hf_dirs[False], work / f"bad_{case}")
        weights = load_file(path / "model.safetensors")
        if case == "extra":
            weights["model.layers.1.mlp.extra_proj.weight"] = torch.zeros(4, 4)
        elif case == "missing":
            del weights["model.layers.2.self_attn.k_proj.bias"]
        else:
            config = json.loads((path / "config.json").read_text())
            (path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        dirs[case] = str(path)
    return dirs


@pytest.fixture(scope="module")
def untied_in_memory_names(work, hf_dirs) -> str:
    """The untied directory as transformers 5 names the tensors in memory (model.language_model.*, model.visual.*),
    split into two shard files with an index: conversion must read it like the published layout."""
    from safetensors.torch import load_file, save_file

    from mssr_megatron.checkpoint.mapping import in_memory_name

    path = shutil.copytree(hf_dirs[False], work / "hf_untied_in_memory_names")
    weights = {in_memory_name(k): v for k, v in load_file(path / "model.safetensors").items()}
    assert any(k.startswith("model.language_model.") for k in weights) and any(k.startswith("model.visual.")
                                                                                for k in weights)
    os.remove(path / "model.safetensors")
    names, weight_map = sorted(weights), {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(path)


def _world_worker(rank: int, work: str, hf_tied: str, hf_untied: str, bad: dict) -> None:
    """Rank of a 2-process world that calls the converter from inside itself, then loads both TP=2 checkpoints at
    TP=1 (2 data-parallel replicas) and at PP=2 and saves the logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from mssr_megatron.checkpoint.convert import load_megatron_checkpoint
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.provider import build_model, run_microbatches
    from mssr_megatron.parallel import init_megatron

    dist.init_process_group("gloo")
    try:
        errors = {}
        for case in ("extra", "missing"):
            try:
                hf_to_megatron(bad[case], f"{work}/out_{case}", tp=2, progress=False)
            except ConversionError as exc:
                errors[case] = str(exc)
        torch.save(errors, f"{work}/errors_{rank}.pt")
        hf_to_megatron(hf_tied, f"{work}/ckpt_tied", tp=2, progress=False)
        hf_to_megatron(hf_untied, f"{work}/ckpt_untied", tp=2, progress=False)
        megatron_to_hf(f"{work}/ckpt_untied", f"{work}/back_untied", tp=1, pp=2, progress=False)
        for tp, pp in ((1, 1), (1, 2)):
            init_megatron(tp, pp, seed=0)
            for tied in (True, False):
                ckpt = f"{work}/ckpt_{'tied' if tied else 'untied'}"
                config = AutoConfig.from_pretrained(f"{ckpt}/hf_config")
                model = build_model(config, ModelConfig(params_dtype="float32")).eval()
                load_megatron_checkpoint(model, ckpt)
                with torch.no_grad():
                    outputs = run_microbatches(model, [megatron_batch(tiny_case(tied)[2])], forward_only=True)
                if outputs:
                    torch.save(gather_tp_logits(outputs[0], VOCAB), f"{work}/logits_{tied}_tp{tp}pp{pp}_{rank}.pt")
            ps.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(work, hf_dirs, untied_in_memory_names, bad_dirs) -> Path:
    spawn(_world_worker, 2, str(work), hf_dirs[True], untied_in_memory_names, bad_dirs)
    return work


@pytest.fixture(scope="module")
def tied_ckpt(world) -> str:
    return str(world / "ckpt_tied")


@pytest.fixture(scope="module")
def round_trips(work, world, tied_ckpt) -> dict[bool, str]:
    """Megatron (TP=2) -> HF at TP=1: tied from this process (spawned rank; into an existing directory, with
    overwrite), untied from inside the world at PP=2 (two shard files and an index)."""
    stale = work / "back_tied"
    stale.mkdir()
    (stale / "stale.txt").write_text("replaced by the conversion")
    with pytest.raises(ConversionError, match="already exists"):
        megatron_to_hf(tied_ckpt, stale, tp=1, progress=False)
    megatron_to_hf(tied_ckpt, stale, tp=1, overwrite=True, progress=False)
    assert not (stale / "stale.txt").exists() and _leftovers(stale) == ["back_tied"]
    return {True: str(stale), False: str(world / "back_untied")}


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_reproduces_the_hf_directory(hf_dirs, round_trips, tied):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mssr_megatron.models.processor import load_processor

    source, back = hf_dirs[tied], round_trips[tied]
    original, exported = safetensors_in(source), safetensors_in(back)
    assert sorted(exported) == sorted(original)
    assert ("lm_head.weight" in exported) == (not tied)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
        assert torch.equal(exported[name].view(torch.uint8), tensor.view(torch.uint8)), f"{name} differs"
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json")) == (not tied)  # untied: PP=2 shards
    others = sorted(f for f in os.listdir(source) if not f.endswith(WEIGHT_FILES))
    assert others == sorted(f for f in os.listdir(back) if not f.endswith(WEIGHT_FILES))
    for name in others:  # config, generation config, tokenizer, processor, chat template
        assert Path(back, name).read_bytes() == Path(source, name).read_bytes(), name
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert load_processor(back).tokenizer.get_vocab() == load_processor(source).tokenizer.get_vocab()


@pytest.mark.slow
def test_tp2_checkpoint_loads_at_tp1_and_pp2_with_the_hf_logits(hf_dirs, world):
    from transformers import Qwen2_5_VLForConditionalGeneration

    for tied in (True, False):
        config, _, inputs = tiny_case(tied)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dirs[tied]).eval()
        for key in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            assert getattr(hf.config, key) == getattr(config, key), f"the harness inputs use another {key}"
        reference = hf_logits(hf, inputs)
        valid = inputs["attention_mask"].bool()
        for layout, rank in (("tp1pp1", 0), ("tp1pp1", 1), ("tp1pp2", 1)):
            ours = torch.load(world / f"logits_{tied}_{layout}_{rank}.pt")
            assert ours.shape == reference.shape
            diff = (ours - reference)[valid].abs().max().item()
            assert diff <= TOL, f"tied={tied} {layout}: max abs diff {diff}"


@pytest.mark.slow
def test_checkpoint_is_self_contained(hf_dirs, tied_ckpt):
    meta = json.loads(Path(tied_ckpt, "mssr_checkpoint.json").read_text())
    assert (meta["source_tp"], meta["source_pp"], meta["dtype"], meta["format_version"]) == (2, 1, "float32", 1)
    assert (meta["vocab_size"], meta["padded_vocab_size"], meta["tie_word_embeddings"]) == (VOCAB, 512, True)
    assert sorted(meta["hf_tensors"]) == sorted(safetensors_in(hf_dirs[True]))
    assert sorted(os.listdir(Path(tied_ckpt, "hf_config"))) == sorted(
        f for f in os.listdir(hf_dirs[True]) if not f.endswith(WEIGHT_FILES))


@pytest.mark.slow
@pytest.mark.parametrize("case,named", [("extra", "model.layers.1.mlp.extra_proj.weight"),
                                        ("missing", "model.layers.2.self_attn.k_proj.bias")])
def test_unexpected_or_missing_tensor_fails_naming_it(world, case, named):
    for rank in (0, 1):
        message = torch.load(world / f"errors_{rank}.pt")[case]
        assert named in message and "\n" not in message, message
    assert _leftovers(world / f"out_{case}") == []


@pytest.mark.slow
def test_cli_error_from_the_ranks_prints_one_line(work, bad_dirs, capfd):
    """A problem found by the spawned ranks (here an unexpected tensor) reaches the command line as one line, and the
    ranks print nothing else."""
    from mssr_megatron.cli import main

    out = work / "out_cli_extra"
    assert main(["convert", "--to", "megatron", "--input", bad_dirs["extra"], "--output", str(out), "--quiet"]) == 2
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ("convert: error: the checkpoint holds an unexpected tensor "
                            "model.layers.1.mlp.extra_proj.weight: the model in config.json has no such weight; "
                            "remove it or fix config.json\n")
    assert _leftovers(out) == []


@pytest.mark.parametrize("case", ["missing_dir", "model_type", "tp3", "not_a_megatron_ckpt"])
def test_bad_inputs_fail_early_with_one_line(work, hf_dirs, bad_dirs, case):
    out = work / f"out_{case}"
    call, expected = {
        "missing_dir": (lambda: hf_to_megatron(work / "nowhere", out), "does not exist"),
        "model_type": (lambda: hf_to_megatron(bad_dirs["model_type"], out), "model_type 'llava'"),
        "tp3": (lambda: hf_to_megatron(hf_dirs[True], out, tp=3), "TP=3 does not divide the 4 attention heads"),
        "not_a_megatron_ckpt": (lambda: megatron_to_hf(hf_dirs[True], out), "--to megatron"),
    }[case]
    with pytest.raises(ConversionError) as info:
        call()
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert _leftovers(out) == []


def test_cli_help_mentions_every_option(capsys):
    from mssr_megatron.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--to", "--input", "--output", "--tp", "--pp", "--dtype", "--overwrite", "megatron", "hf",
                   "float32", "bfloat16", "float16", "examples:"):
        assert option in text, option
    tool = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "--help"], capture_output=True,
                          text=True, check=True)
    assert "--overwrite" in tool.stdout and "examples:" in tool.stdout


def test_cli_errors_print_one_line(work, hf_dirs, capsys):
    from mssr_megatron.cli import main

    argv = ["convert", "--to", "megatron", "--input", hf_dirs[True], "--output", str(work / "o"), "--tp", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("convert: error: TP=3") and err.count("\n") == 1
    tool = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "--to", "hf", "--input",
                           str(work / "nowhere"), "--output", str(work / "o")], capture_output=True, text=True)
    assert tool.returncode == 2 and tool.stdout == ""
    assert tool.stderr.startswith("convert: error: input") and tool.stderr.count("\n") == 1, tool.stderr
    tool = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "--to", "json"],
                          capture_output=True, text=True)
    assert tool.returncode == 2 and tool.stderr.startswith("convert: error:") and tool.stderr.count("\n") == 1
    assert _leftovers(work / "o") == []
