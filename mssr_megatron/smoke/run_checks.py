"""Smoke checks on the training run: RL steps of the tiny default, the HF engine with a weight sync, `mssr bench`, and
the optional GPU libraries (Transformer Engine, SGLang, vLLM).

Assets are built once per smoke run directory and reused by later checks: the tiny random model + synthetic data that
tests/trainer_assets.py uses (no warm start: these checks test plumbing, not learning), and for the benchmark a model
of the bench shape (smoke_hf_config) with the tiny tokenizer, plus prompts padded to the bench prompt length.
"""

from __future__ import annotations

import json
import math
import os

import torch

from mssr_megatron.smoke import SmokeOptions

TINY_CONFIG = os.path.join("examples", "configs", "tiny_cpu.yaml")
BENCH_GPU = dict(prompt=1024, response=1024, prompts=4, micro_batch=1)
BENCH_CPU = dict(prompt=96, response=16, prompts=4, micro_batch=4)


def tiny_assets(opts: SmokeOptions) -> dict:
    """The tiny random Qwen2.5-VL directory and 24/16 synthetic prompts (built on first use)."""
    from mssr_megatron.data.synthetic import generate_dataset
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    root = os.path.join(opts.run_dir, "assets", "tiny")
    paths = {"model": os.path.join(root, "model"), "train": os.path.join(root, "data", "train.jsonl"),
             "val": os.path.join(root, "data", "val.jsonl")}
    if not os.path.isfile(os.path.join(root, "done")):
        build_tiny_model_dir(paths["model"], seed=0, num_layers=4)
        generate_dataset(os.path.join(root, "data"), 24, 16, seed=0)
        open(os.path.join(root, "done"), "w").close()
    return paths


def _run_overrides(paths: dict, run_dir: str, device: str) -> list[str]:
    return [f"model.hf_path={paths['model']}", f"data.train_path={paths['train']}", f"data.val_path={paths['val']}",
            f"trainer.output_dir={run_dir}", f"trainer.device={device}", "parallel.backend=auto",
            "logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.save_every=0",
            "checkpoint.export_hf_at_end=false", "data.reward_workers=0"]


def check_rl_steps(opts: SmokeOptions) -> dict:
    """3 RL steps of the tiny default (examples/configs/tiny_cpu.yaml) through trainer.train, with validation before
    and after; on CUDA with trainer.device=cuda (GPU-only: not run (no GPU was available))."""
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    run_dir = os.path.join(opts.run_dir, "rl_steps")
    overrides = _run_overrides(tiny_assets(opts), run_dir, opts.device.type) + [
        "trainer.total_steps=3", "trainer.val_every=3", "data.val_size=4", "data.prompts_per_step=8",
        "optimizer.mini_batch_size=4", "parallel.micro_batch_size=4", "rollout.hf_batch_size=8"]
    summary = train(load_config(os.path.join(opts.repo, TINY_CONFIG), overrides))
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        steps = [m for m in map(json.loads, fh) if m.get("step", 0) > 0 and "actor/loss" in m]
    if [m["step"] for m in steps] != [1, 2, 3]:
        raise AssertionError(f"expected RL steps 1, 2, 3 in metrics.jsonl, got {[m['step'] for m in steps]}")
    bad = [m["step"] for m in steps if not (math.isfinite(m["actor/loss"]) and math.isfinite(m["actor/grad_norm"])
                                            and m["actor/update_skipped"] == 0.0)]
    if bad:
        raise AssertionError(f"non-finite loss or grad norm, or a skipped update, at steps {bad}")
    mismatch = max(m["mismatch/max_abs_diff"] for m in steps)
    if not mismatch <= 1e-3:  # float32 engine and trainer: their log-probs of the sampled tokens agree
        raise AssertionError(f"rollout-engine and trainer log-probs differ by {mismatch:.2e} (limit 1e-3)")
    seconds = [m["time/step"] for m in steps]
    return dict(figure=f"3 steps, {_joined(seconds)} s/step; loss {steps[-1]['actor/loss']:+.4f}; "
                       f"engine-trainer log-prob diff {mismatch:.1e}; val acc {summary.get('initial_val_accuracy')}"
                       f" -> {summary.get('final_val_accuracy')}",
                step_seconds=seconds, max_logprob_mismatch=mismatch, summary=summary)


def _joined(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _requests(paths: dict, processor, n: int) -> list:
    from mssr_megatron.config import DataConfig
    from mssr_megatron.data.prompts import build_request
    from mssr_megatron.data.records import read_records

    data = DataConfig()
    records = read_records(paths["train"], data, "train", apply_val_size=False)
    return [build_request(r, data.prompt_template, processor) for r in records.records[:n]]


def sync_changed_weights(opts: SmokeOptions, paths: dict, engine, verify: bool) -> dict:
    """Sync a Megatron model of the tiny checkpoint, every weight scaled by 1.5 (other weights than the engine's, so
    the sync has something to change), into `engine` on the smoke device; returns the sync's report."""
    from mssr_megatron.checkpoint.dist_io import HFTensors
    from mssr_megatron.checkpoint.hf_bridge import load_hf_weights
    from mssr_megatron.checkpoint.mapping import ModelDims
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.provider import build_model
    from mssr_megatron.models.qwen2_5_vl import padded_vocab_size
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.rollout.weight_export import sync_weights
    from mssr_megatron.train.run_context import load_hf_config

    init_megatron(1, 1, seed=0, device=opts.device.type)
    try:
        hf_config = load_hf_config(paths["model"])
        model = build_model(hf_config, ModelConfig(params_dtype="float32"), opts.device)
        dims = ModelDims.from_hf_config(hf_config, padded_vocab_size(hf_config.text_config.vocab_size, 1))
        load_hf_weights(model, HFTensors(paths["model"]), dims)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5)
        return sync_weights(model, dims, engine, bucket_bytes=1 << 20, verify=verify)
    finally:
        destroy_megatron()


def check_hf_engine(opts: SmokeOptions) -> dict:
    """The HF engine on the smoke device: seeded generation (twice: identical), then a weight sync from a Megatron
    model holding other weights, verified by checksums (sync_weights(verify=True)), then generation again; on CUDA
    also the memory freed by release_memory (GPU-only: not run (no GPU was available))."""
    from mssr_megatron.rollout.hf_engine import HFEngine
    from mssr_megatron.rollout.protocol import SamplingParams

    paths = tiny_assets(opts)
    engine = HFEngine(paths["model"], device=opts.device, dtype="float32", max_batch_size=8)
    requests = _requests(paths, engine.processor, 4)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=1)
    first, again = engine.generate(requests, sampling), engine.generate(requests, sampling)
    if any(r.finish_reason == "error" for r in first) or [r.response_ids for r in first] != [
            r.response_ids for r in again]:
        raise AssertionError(f"generation failed or is not reproducible: {[r.error for r in first]}")
    sync = sync_changed_weights(opts, paths, engine, verify=True)
    after = engine.generate(requests, sampling)
    if any(r.finish_reason == "error" for r in after):
        raise AssertionError(f"generation after the weight sync failed: {[r.error for r in after]}")
    released = None
    if opts.device.type == "cuda":  # GPU-only: not run (no GPU was available)
        before = torch.cuda.memory_allocated()
        engine.release_memory()
        released = before - torch.cuda.memory_allocated()
        engine.resume_memory()
        if released <= 0:
            raise AssertionError("HFEngine.release_memory freed no CUDA memory")
    engine.shutdown()
    tokens = sum(len(r.response_ids) for r in first)
    return dict(figure=f"{len(first)} rollouts ({tokens} tokens), reproducible; sync {sync['sync/bytes'] / 1e6:.1f} MB "
                       f"verified ({int(sync['sync/verified_tensors'])} tensors, {sync['sync/gb_per_s']:.2f} GB/s)"
                       + (f"; release_memory freed {released / 2**20:.0f} MiB" if released is not None else ""),
                sync=sync, released_bytes=released, response_tokens=tokens)
