"""`mssr plan --step-time`: the step-time model against hand-worked numbers on a small case, the engine count of
each placement, the CLI's table and JSON, and docs/step_time.md against the tool's own output (so it cannot drift)."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shlex

import pytest

from mssr_megatron.config import RunConfig
from mssr_megatron.plan.step_time import StepTimeInputs, engine_count, image_grid, step_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# hidden 8, 2 layers, 2 heads of 4, 1 KV head, MLP 16, vocabulary 100 (untied); a one-block vision tower
SMALL_CONFIG = {
    "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "intermediate_size": 16, "vocab_size": 100, "tie_word_embeddings": False,
    "vision_config": {"depth": 1, "hidden_size": 4, "intermediate_size": 6, "num_heads": 1, "out_hidden_size": 8,
                      "patch_size": 2, "temporal_patch_size": 1, "spatial_merge_size": 2, "in_chans": 3,
                      "window_size": 8, "fullatt_block_indexes": [0]},
}


def small_run_config() -> RunConfig:
    cfg = RunConfig()
    cfg.data.prompts_per_step, cfg.rollout.n, cfg.rollout.max_new_tokens = 7, 2, 10  # 14 rollouts
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = 4, 1
    cfg.rollout.engine_tp_size, cfg.rollout.colocate = 2, True
    cfg.algorithm.use_kl_loss = True  # old policy + reference: 2 log-prob passes
    cfg.optimizer.ppo_epochs = 1
    return cfg


def test_small_case_by_hand():
    # forward FLOPs of one rollout, S = 6 prompt + 4 response = 10 tokens, text only (bench/flops.py's convention):
    #   projections per token and layer 2*8*2*4 (q) + 2*2*8*1*4 (k, v) + 2*2*4*8 (o) + 3*2*8*16 (MLP) = 1152
    #   attention 4 * S keys * 2 heads * 4 per query and layer = 32 * S;  logits 2 * 8 * 100 = 1600 per position
    forward = 2 * 10 * 1152 + 2 * 32 * 10 * 10 + 10 * 1600
    assert forward == 45440
    train = 3 * forward  # forward + backward; no vision tower in a text-only step
    # MFU 0.5 x peak 2 * 45440 FLOP/s: one rollout's forward takes one GPU-second
    inputs = StepTimeInputs(nodes=2, gpus_per_node=4, gen_tokens_per_gpu=5.0, tail_tokens_per_s=2.0, train_mfu=0.5,
                            peak_tflops=2 * forward / 1e12, sync_gbps_ipc=6.92e-6, mean_prompt_tokens=6,
                            mean_image_tokens=0, mean_response_tokens=4)
    model = step_time(small_run_config(), SMALL_CONFIG, inputs)
    # 8 GPUs, TP 4 x PP 1 -> DP 2; engine TP 2: single 1 engine, per_dp_group 2, per_node 2 x (4 // 2) = 4
    # generation: ceil(14 / engines) rollouts x 4 tokens / (2 GPUs x 5 tokens/s)
    expected_generation = {"single": 14 * 4 / 10, "per_dp_group": 7 * 4 / 10, "per_node": 4 * 4 / 10}
    # weights: layers 2 x 608, embedding + output 2 x 800, final norm 8, vision tower 48 + 176 + 412 (see
    # test_memory_plan.test_small_shape_by_hand for the layer) = 3460 params, 6920 bf16 bytes at 6920 B/s
    shared = {"generation_tail": (10 - 4) / 2.0,             # 3 s
              "logprobs": 2 * 14 * forward / (8 * forward),  # 3.5 s
              "update": 14 * train / (8 * forward),           # 5.25 s
              "weight_sync": 1.0}
    assert set(model.modes) == {"single", "per_dp_group", "per_node"}
    for mode, generation in expected_generation.items():
        got = model.modes[mode]
        assert got.seconds == pytest.approx({"generation": generation, **shared}, rel=1e-12), mode
        assert got.total == pytest.approx(generation + 3 + 3.5 + 5.25 + 1.0)
    assert [model.modes[m].engines for m in ("single", "per_dp_group", "per_node")] == [1, 2, 4]
    assert model.modes["per_node"].rollouts_per_engine == 4  # ceil(14 / 4): the busiest engine sets the time
    assert model.modes["single"].share("generation") == pytest.approx(5.6 / 18.35)


def test_training_tokens_per_gpu_replaces_mfu_by_hand():
    inputs = StepTimeInputs(nodes=2, gpus_per_node=4, train_tokens_per_gpu=35.0, mean_prompt_tokens=6,
                            mean_image_tokens=0, mean_response_tokens=4)
    seconds = step_time(small_run_config(), SMALL_CONFIG, inputs).modes["single"].seconds
    # update: 14 rollouts x 10 tokens / (8 GPUs x 35 tokens/s); a forward is a third of the training FLOPs,
    # so the two log-prob passes take 2 x 14 x 10 / (8 x 35 x 3)
    assert seconds["update"] == pytest.approx(0.5)
    assert seconds["logprobs"] == pytest.approx(1 / 3)


def test_a_placement_that_needs_more_gpus_than_the_cluster_is_not_tabled():
    cfg = small_run_config()
    cfg.parallel.tensor_model_parallel_size = cfg.parallel.pipeline_model_parallel_size = 1
    # 4 GPUs at TP 1 PP 1: DP 4, so per_dp_group wants 4 engines x engine TP 2 = 8 GPUs
    inputs = StepTimeInputs(nodes=1, gpus_per_node=4, mean_image_tokens=0)
    model = step_time(cfg, SMALL_CONFIG, inputs)
    assert set(model.modes) == {"single", "per_node"}
    # the placement's own refusal: replica 3's engine would need GPUs 3 and 4 of a 4-GPU node
    assert model.unavailable == {"per_dp_group": "rollout.engines=per_dp_group: engine 3 needs GPUs 3..4 of node 0, "
                                                 "beyond the trainer's GPUs of its 4: lower rollout.engine_tp_size"}


def test_a_rate_that_is_not_positive_is_refused_by_name():
    with pytest.raises(ValueError, match="--gen-tokens-per-gpu must be positive"):
        step_time(small_run_config(), SMALL_CONFIG, StepTimeInputs(gen_tokens_per_gpu=0.0, mean_image_tokens=0))


@pytest.mark.parametrize("mode, nodes, gpus_per_node, engine_tp, tp, pp, engines", [
    ("single", 2, 8, 1, 2, 1, 1),
    ("single", 1, 8, 4, 4, 1, 1),
    ("per_node", 1, 8, 1, 2, 1, 8),
    ("per_node", 2, 8, 2, 2, 1, 8),
    ("per_node", 2, 8, 3, 1, 1, 4),     # 8 // 3 = 2 engines per node, two GPUs per node left out
    ("per_dp_group", 2, 8, 1, 2, 1, 8),  # DP 8
    ("per_dp_group", 1, 8, 2, 4, 1, 2),  # DP 2, engines of TP 2 on each replica's first GPUs
])
def test_engine_counts_per_mode(mode, nodes, gpus_per_node, engine_tp, tp, pp, engines):
    assert engine_count(mode, nodes, gpus_per_node, engine_tp, tp, pp) == engines


def test_engine_count_refuses_what_cannot_be_placed():
    with pytest.raises(ValueError, match="engine_tp_size=16 is larger than a node's 8"):
        engine_count("per_node", 2, 8, 16, 1, 1)
    with pytest.raises(ValueError, match="must be one of per_node, per_dp_group, single"):
        engine_count("per_gpu", 1, 8, 1, 1, 1)


def test_image_grid_has_the_requested_tokens():
    assert image_grid(512, 2) == (1, 32, 64)  # 16 x 32 merged tokens
    assert image_grid(7, 2) == (1, 2, 14)


def _run_cli(argv: list[str]) -> str:
    from mssr_megatron.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def test_mssr_plan_prints_the_step_time_table_and_json(tmp_path):
    path = tmp_path / "step.json"
    text = _run_cli(["plan", "examples/configs/qwen2_5_vl_7b_mssr.yaml", "--step-time", "--nodes", "2",
                     "--gen-tokens-per-gpu", "4000", "--json", str(path)])
    header = text.splitlines()[1].split()
    assert header == ["rollout.engines", "single", "per_dp_group", "per_node"]
    assert "16 x 1" in text and "4000 output tokens/s per GPU" in text and "[--gen-tokens-per-gpu]" in text
    data = json.loads(path.read_text())
    single, per_node = data["modes"]["single"], data["modes"]["per_node"]
    assert per_node["engines"] == 16 and single["engines"] == 1
    # 2048 rollouts x 1024 mean response tokens on one GPU at 4000 tokens/s, and on 16 at 2048 / 16 = 128 each
    assert single["seconds"]["generation"] == pytest.approx(2048 * 1024 / 4000)
    assert per_node["seconds"]["generation"] == pytest.approx(128 * 1024 / 4000)


DOC_BLOCK = re.compile(r"```text\n\$ (mssr plan [^\n]*)\n(.*?)```", re.S)


def test_docs_tables_are_the_tools_output():
    doc = open(os.path.join(ROOT, "docs", "step_time.md")).read()
    blocks = DOC_BLOCK.findall(doc)
    commands = [command for command, _ in blocks]
    assert "mssr plan examples/configs/qwen2_5_vl_7b_mssr.yaml --step-time" in commands
    assert "mssr plan examples/configs/qwen2_5_vl_7b_mssr.yaml --step-time --nodes 2" in commands
    for command, table in blocks:
        assert _run_cli(shlex.split(command)[1:]) == table, command


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "examples", "configs", "qwen2_5_vl_7b_*.yaml"))))
def test_every_7b_config_has_the_mssr_configs_step_time(path, tmp_path):
    # docs/step_time.md says the table of qwen2_5_vl_7b_mssr.yaml holds for every 7B config: same rollouts (2048 x 1
    # or 256 x 8), lengths, log-prob passes and layout
    def seconds(config):
        out = tmp_path / "step.json"
        _run_cli(["plan", config, "--step-time", "--json", str(out)])
        return json.loads(out.read_text())["modes"]

    assert seconds(os.path.relpath(path, ROOT)) == seconds("examples/configs/qwen2_5_vl_7b_mssr.yaml")


def test_docs_state_the_codes_defaults():
    from mssr_megatron.plan.step_time import DEFAULTS

    rows = {line.split("|")[2].strip(): line.split("|")[3].strip()
            for line in open(os.path.join(ROOT, "docs", "step_time.md")) if line.startswith("| ") and "`--" in line}
    for name, (value, _) in DEFAULTS.items():
        assert float(rows["`--" + name.replace("_", "-") + "`"]) == value, name
