"""`mssr bench`: the device peak table, MFU arithmetic, the step recorder, the plain-HF baseline's inputs (the same
log-probs as Megatron on the same micro-batch), and the JSON record and table of a short real run. No assertion is
made on a timing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mssr_megatron.bench import device as D
from mssr_megatron.bench.report import add_rates, format_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),  # the SXM part's device name
    ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H200", "fp8", 1978.9),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
])
def test_datasheet_peaks_are_dense(name, precision, tflops):
    peak, label = D.datasheet_peak(name, precision)
    assert peak == pytest.approx(tflops * 1e12) and "dense" in label


def test_unknown_gpu_or_precision_has_no_datasheet_peak():
    assert D.datasheet_peak("NVIDIA GeForce RTX 4090", "bf16") is None
    assert D.datasheet_peak("NVIDIA A100-SXM4-80GB", "fp8") is None  # A100 has no FP8 tensor cores


def test_precision_follows_the_run_numerics():
    assert D.precision_of("bfloat16", None) == "bf16"
    assert D.precision_of("float16", None) == "bf16"
    assert D.precision_of("bfloat16", "e4m3") == "fp8"
    assert D.precision_of("float32", None) == "fp32"
    assert D.precision_of("float32", None, allow_tf32=True) == "tf32"


def test_gpu_peak_chosen_by_device_name_and_fp8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak = D.device_peak(torch.device("cuda"), "bfloat16", "hybrid", world_size=8)
    assert peak["source"] == "datasheet" and peak["precision"] == "fp8"
    assert peak["per_device_flops_per_s"] == pytest.approx(1978.9e12)
    assert peak["flops_per_s"] == pytest.approx(8 * 1978.9e12)
    assert D.device_peak(torch.device("cuda"), "bfloat16", None)["flops_per_s"] == pytest.approx(989.4e12)


def test_cpu_peak_is_measured_and_labelled_so():
    peak = D.device_peak(torch.device("cpu"), "float32", None, world_size=2, measure_repeats=2, matmul_n=128)
    assert peak["source"] == "measured" and peak["label"].startswith("measured")
    m = peak["matmul"]
    assert m["n"] == 128 and len(m["seconds"]) == 2 and m["threads"] == torch.get_num_threads()
    assert m["best_flops_per_s"] == pytest.approx(2 * 128**3 / min(m["seconds"]))
    assert peak["flops_per_s"] == pytest.approx(2 * m["best_flops_per_s"])


def test_mfu_and_rates_arithmetic():
    assert D.mfu(1e12, 2.0, 1e12) == pytest.approx(0.5)
    assert math.isnan(D.mfu(1e12, 0.0, 1e12)) and math.isnan(D.mfu(1.0, 1.0, 0.0))
    phase = add_rates({"median_s": 4.0, "tokens": 1000, "flops": 8e12}, peak_flops_per_s=4e12)
    assert phase["tokens_per_s"] == 250 and phase["tflops_per_s"] == pytest.approx(2.0)
    assert phase["mfu"] == pytest.approx(0.5)


def test_step_recorder_records_and_restores(monkeypatch):
    from mssr_megatron.train import rl_step
    from mssr_megatron.bench.phases import StepRecorder

    monkeypatch.setattr(rl_step, "generate", lambda ctx, records, sampling: ["rollout"])
    original = rl_step.generate
    with StepRecorder() as rec:
        rec.begin_step()
        assert rl_step.generate is not original
        assert rl_step.generate("ctx", ["record"], "sampling") == ["rollout"]
    assert rl_step.generate is original
    assert rec.last.first("generate") == (("ctx", ["record"], "sampling"), {}, ["rollout"])
    assert rec.last.count("generate") == 1 and rec.last.count("update_policy") == 0


def test_interleaved_timing_alternates_the_functions():
    from mssr_megatron.bench.phases import measure_interleaved

    calls = []
    out = measure_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=2,
                              device=torch.device("cpu"), memory=False)
    assert calls == ["a", "b"] * 3
    assert set(out) == {"a", "b"} and all(len(r["seconds"]) == 2 for r in out.values())
    assert all(r["min_s"] <= r["median_s"] <= r["max_s"] for r in out.values())


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from trainer_assets import build_assets

    return build_assets(str(tmp_path_factory.mktemp("bench_assets")))


def _hf_logprob_worker(rank: int, config_overrides: list, out: str) -> None:
    from mssr_megatron.train import trainer
    from mssr_megatron.bench.hf_baseline import HFBaseline
    from mssr_megatron.bench.phases import StepRecorder, rollout_shapes
    from mssr_megatron.config import load_config
    from mssr_megatron.train.run_context import build_context

    ctx = build_context(load_config("examples/configs/tiny_cpu.yaml", config_overrides))
    try:
        with StepRecorder() as rec:
            rec.begin_step()
            trainer.train_step(ctx)
        (_, actor, exp, rows, temperature), _, (megatron_lp, _) = rec.last.first("token_logprobs")
        # The policy changed in the update: recompute Megatron's log-probs and sync the engine (the HF start point).
        from mssr_megatron.train import rl_step
        from mssr_megatron.rollout.weight_export import sync_weights

        megatron_lp, _ = rl_step.token_logprobs(ctx, ctx.actor, exp, rows, temperature)
        sync_weights(ctx.actor.module, ctx.actor.dims, ctx.engine, 2**24)
        baseline = HFBaseline(ctx.cfg.model.hf_path, ctx, torch.device("cpu"))
        lengths = torch.tensor(rollout_shapes(rec.last.first("generate")[2])["lengths"])
        hf_lp = []
        with torch.no_grad():
            for batch in exp.microbatches(rows, ctx.cfg.parallel.micro_batch_size):
                hf_lp.append(baseline.logprobs(batch, lengths, temperature, ctx.blocked_ids)[0])
        torch.save({"megatron": megatron_lp, "hf": torch.cat(hf_lp), "mask": exp.response_mask[rows]}, out)
    finally:
        ctx.close()


@pytest.mark.slow
def test_hf_baseline_sees_the_same_tokens_as_megatron(tmp_path, assets):
    from megatron_harness import spawn
    from trainer_assets import overrides

    out = str(tmp_path / "lp.pt")
    spawn(_hf_logprob_worker, 1, overrides(assets, str(tmp_path / "run"), "trainer.total_steps=1"), out)
    r = torch.load(out)
    mask = r["mask"].bool()
    assert mask.sum() > 0
    torch.testing.assert_close(r["hf"][mask], r["megatron"][mask], atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_bench_cli_writes_json_and_table(tmp_path, assets):
    from trainer_assets import overrides

    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mssr_megatron.cli", "bench", "examples/configs/tiny_cpu.yaml",
           *overrides(assets, str(tmp_path / "run")), "--out", str(out), "--warmup", "0", "--repeats", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["schema"] == "mssr-bench/1" and result["repeats"] == 2
    assert result["config"]["rollouts_per_step"] == 8 and result["config"]["tp"] == 1
    assert {"torch", "transformers", "megatron_core", "device", "torch_threads"} <= set(result["environment"])
    assert result["peak"]["source"] == "measured"
    phases = result["phases"]
    assert set(phases) == {"generation", "logprobs", "update", "weight_sync", "hf_update"}
    for key, p in phases.items():
        assert len(p["seconds"]) == 2 and p["min_s"] <= p["median_s"] <= p["max_s"], key
        assert p["peak_memory_bytes"] > 0, key
    for key in ("generation", "logprobs", "update", "hf_update"):
        assert phases[key]["tokens"] > 0 and phases[key]["flops"] > 0 and phases[key]["mfu"] > 0, key
    assert phases["generation"]["token_kind"].startswith("generated")
    assert phases["update"]["tokens"] == phases["logprobs"]["tokens"] == phases["hf_update"]["tokens"]
    assert phases["update"]["flops"] == pytest.approx(3 * phases["logprobs"]["flops"], rel=0.05)
    assert phases["weight_sync"]["bytes"] > 0 and phases["weight_sync"]["gb_per_s"] > 0
    b = result["step_breakdown"]
    assert b["steps"] == 2 and {"rollout", "reward", "logprobs", "update", "weight_sync", "step"} <= set(b["phases"])
    assert result["hf_compare"]["time_ratio"] > 0 and result["hf_compare"]["time_ratio_paired_median"] > 0
    assert result["memory"]["max_rss_bytes"] > 0
    vision = result["vision_balance"]  # bench/vision.py: at TP1 every option encodes every image on the one rank
    assert vision["tp"] == 1 and vision["chosen"] == "replicate"
    assert len({tuple(p["patches_per_rank"]) for p in vision["per_option"].values()}) == 1
    table = proc.stdout
    for label in ("rollout generation", "log-prob recompute", "training update (Megatron)",
                  "training update (plain HF", "weight sync", "step: update", "Megatron / HF update time",
                  "peak for MFU", "measured", "vision tower per TP rank"):
        assert label in table, label
    assert format_table(result).splitlines()[0] in table
