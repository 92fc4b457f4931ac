"""Throughput benchmark of one config: `mssr bench CONFIG [key=value ...] [--out F.json] [--warmup N] [--repeats N]
[--no-hf-compare]` (also under torchrun: every rank runs it, rank 0 prints and writes).

What it does, with the run's own objects (`run_context.build_context`, exactly as `mssr train` builds them):
 1. weight sync actor -> engine (as the trainer does before step 1);
 2. `warmup + repeats` real RL steps through `trainer.train_step`, the trainer's step function, reporting the median
    (min, max) of its own `time/*` phase metrics (StepTimer) over the `repeats` timed steps; the tracker is not
    seeded with `initialize_tracker` (that pass only sets baseline values, not the cost of a step);
 3. each phase alone, replayed `warmup` (untimed) + `repeats` times on the LAST step's recorded inputs, through the
    same calls the trainer makes: rollout generation (rl_step.generate -> engine.generate, same prompts, sampling and
    seed), the old-policy log-prob forward (rl_step.token_logprobs -> actor.token_logprobs), the policy update
    (rl_step.update_policy -> actor.train_step per mini-batch), the weight sync (sync_weights, bytes and GB/s);
 3a. the vision tower per TP rank under model.vision_balance replicate and tp_balanced, interleaved (bench/vision.py);
 3b. with algorithm.crossmodal_coef > 0, the same update with the regulariser off as well, interleaved with it
    (`update_no_crossmodal`): `crossmodal_cost` is the time ratio with / without, measured in the same run;
 4. single process at TP = PP = 1 (the tiny CPU default): the same update with plain transformers + torch AdamW
    (bench/hf_baseline.py) on the same micro-batches, timed interleaved with Megatron's (M H M H ...), and the
    Megatron / HF time ratio;
 5. the peak for MFU (bench/device.py: datasheet for known GPUs, a measured matmul on CPU) and memory.

Counted tokens: generation = generated response tokens; log-probs, update (x PPO epochs) and the RL step = real
prompt + response tokens of the step's rollouts (image placeholder tokens included, padding excluded). FLOPs are
analytic (bench/flops.py). Repeated updates keep changing the policy (as training does); the step's other inputs
(old log-probs, advantages) stay those recorded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

BREAKDOWN_KEYS = ("rollout", "reward", "logprobs", "update", "weight_sync")


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", nargs="?", default=None, help="YAML config to benchmark")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    parser.add_argument("--out", default=None, help="JSON output (default <trainer.output_dir>/bench.json)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls / RL steps (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls / RL steps; medians reported (default 5)")
    parser.add_argument("--no-hf-compare", action="store_true", help="skip the plain Hugging Face update baseline")
    return parser


def run_benchmark(args: argparse.Namespace) -> int:
    from mssr_megatron.bench.report import format_table, write_json
    from mssr_megatron.config import load_config

    if not args.config:
        print("mssr bench: give a CONFIG (e.g. examples/configs/tiny_cpu.yaml), or --study", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.warmup < 0:
        print("mssr bench: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    cfg = load_config(args.config, args.overrides)
    out_path = args.out or os.path.join(cfg.trainer.output_dir, "bench.json")
    result = benchmark(cfg, warmup=args.warmup, repeats=args.repeats, hf_compare=not args.no_hf_compare,
                       command=" ".join(["mssr bench", args.config, *args.overrides]))
    if result is not None:  # rank 0
        write_json(result, out_path)
        print(format_table(result))
        print(f"wrote {out_path}")
    return 0


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.start = enabled, time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[bench {time.perf_counter() - self.start:6.1f}s] {message}", flush=True)


def benchmark(cfg, *, warmup: int = 1, repeats: int = 5, hf_compare: bool = True, command: str = "") -> dict | None:
    """Run the benchmark for a loaded RunConfig; the result dict on rank 0, None elsewhere."""
    from mssr_megatron.train.run_context import build_context

    run_dir = cfg.trainer.output_dir
    cfg.trainer.output_dir = os.path.join(run_dir, "bench")  # config.yaml of the bench, apart from a real run's
    cfg.logging.jsonl = cfg.logging.tensorboard = cfg.logging.progress_bar = False
    progress = _Progress(int(os.environ.get("RANK", "0")) == 0)
    progress("building the run: model, reference, engine, data, reward workers")
    ctx = build_context(cfg)
    try:
        return _benchmark(ctx, warmup, repeats, hf_compare, progress, command)
    finally:
        ctx.close()


def _benchmark(ctx, warmup: int, repeats: int, hf_compare: bool, progress, command: str) -> dict | None:
    from mssr_megatron.train import trainer
    from mssr_megatron.bench import device as D
    from mssr_megatron.bench import flops as F
    from mssr_megatron.bench import phases as P
    from mssr_megatron.bench.report import add_rates
    from mssr_megatron.bench.vision import bench_vision
    from mssr_megatron.rollout.weight_export import sync_weights

    cfg = ctx.cfg
    device = next(ctx.actor.module.parameters()).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    sync_weights(ctx.actor.module, ctx.actor.dims, ctx.engine, cfg.rollout.weight_bucket_bytes, hosts=ctx.engine_hosts)

    progress(f"RL steps through trainer.train_step: {warmup} warm-up + {repeats} timed")
    times, steps = [], []
    with P.StepRecorder() as rec:
        for i in range(warmup + repeats):
            rec.begin_step()
            metrics = trainer.train_step(ctx)
            ctx.step += 1
            exp = rec.last.first("make_experience")[2]
            progress(f"  step {i + 1}: {metrics['time/step']:.2f} s" + (" (warm-up)" if i < warmup else ""))
            if i >= warmup:
                times.append({k.removeprefix("time/"): v for k, v in metrics.items() if k.startswith("time/")})
                steps.append(P.step_flops(ctx.hf_config, rec.last, exp, cfg.model.train_vision,
                                          cfg.optimizer.ppo_epochs))
    last = rec.last
    kw = dict(warmup=warmup, repeats=repeats, device=device)
    phases = {}
    progress("phase: rollout generation")
    phases["generation"] = P.bench_generation(ctx, last, **kw)
    progress("phase: log-prob recomputation")
    phases["logprobs"] = P.bench_logprobs(ctx, last, **kw)
    n_params = sum(p.numel() for p in ctx.actor.module.parameters())
    skip = _hf_skip_reason(hf_compare, world, cfg.parallel, device, n_params)
    progress("phase: training update (Megatron" + (", and plain Hugging Face on the same batches, interleaved)"
                                                   if skip is None else ")"))
    phases.update(P.bench_update(ctx, last, **kw, hf_baseline=skip is None))
    progress("phase: vision tower per TP rank (replicate and tp_balanced, interleaved)")
    vision = bench_vision(ctx, last, **kw)
    progress("phase: weight sync")
    phases["weight_sync"] = P.bench_weight_sync(ctx, **kw)
    progress("device peak" + (" (measuring a matmul)" if device.type != "cuda" else ""))
    if world > 1:
        dist.barrier()  # CPU ranks measure at the same time: they share the cores
    peak = D.device_peak(device, cfg.model.params_dtype, cfg.model.fp8, world_size=world)
    if peak["source"] == "measured" and world > 1:  # the job's peak: every rank's own measurement, summed
        per_rank = _gather(peak["per_device_flops_per_s"], world)
        peak.update(flops_per_s=sum(per_rank), per_rank_flops_per_s=per_rank,
                    label=peak["label"].replace(f", x{world} ranks", f", on all {world} ranks at once, summed"))
    micro = _microbatch_stats(ctx, last)
    rss = D.max_rss_bytes()
    all_rss = _gather(rss, world)
    if ctx.rank != 0:
        return None

    engine_devices = 1 if cfg.rollout.engine == "hf" else cfg.rollout.engine_tp_size
    add_rates(phases["generation"], peak["per_device_flops_per_s"] * engine_devices)
    for key in ("logprobs", "update", "update_no_crossmodal", "update_fixed_microbatches", "hf_update"):
        if key in phases:
            add_rates(phases[key], peak["flops_per_s"])
    exp = last.first("make_experience")[2]
    lengths = P.rollout_shapes(last.first("generate")[2])["lengths"]
    grids = P.row_grids(exp)
    result = {
        "schema": "mssr-bench/1", "command": command, "config": _config_summary(cfg, world, ctx.hf_config),
        "environment": D.environment(device), "peak": peak, "warmup": warmup, "repeats": repeats,
        "phases": phases,
        "step_breakdown": _breakdown(times, steps, warmup, peak["flops_per_s"]),
        "flops": {"per_token": F.per_token_summary(ctx.hf_config, int(statistics.median(lengths)),
                                                   grids[0] if grids else None),
                  "convention": "matmuls only, 2*m*k*n; attention as full SxS; training 3x forward "
                                "(patch embedding 2x)"},
        "memory": {"phase_memory_kind": phases["update"].get("memory_kind", "-"), "max_rss_bytes": rss,
                   "max_rss_bytes_all_ranks": max(all_rss), "max_rss_bytes_per_rank": all_rss,
                   "max_rss_kind": "process max RSS (resource.getrusage ru_maxrss) over the whole run"},
        "params_rank0": n_params, "microbatches": micro,
    }
    if "update_fixed_microbatches" in phases:
        b, f = phases["update"], phases["update_fixed_microbatches"]
        result["token_budget"] = {
            "budget": cfg.parallel.max_tokens_per_microbatch, **_time_ratios(b, f),
            "what": "the update with token-budget micro-batches over the same update with fixed "
                    f"micro-batches of {cfg.parallel.micro_batch_size} rows, timed interleaved"}
    if vision is not None:
        result["vision_balance"] = vision
    if "update_no_crossmodal" in phases:
        w, wo = phases["update"], phases["update_no_crossmodal"]
        result["crossmodal_cost"] = {
            "coef": cfg.algorithm.crossmodal_coef, **_time_ratios(w, wo),
            "what": "the update with the cross-modal regulariser (text-only copies of the rows, KL with gradient) "
                    "over the same update without it, timed interleaved"}
    if "hf_update" in phases:  # the HF update has no cross-modal term: compared with the update without it
        # ... and, with a token budget, with the fixed micro-batches it uses too
        m = phases.get("update_no_crossmodal", phases.get("update_fixed_microbatches", phases["update"]))
        h = phases["hf_update"]
        result["hf_compare"] = {
            **_time_ratios(m, h),
            "megatron_tokens_per_s": m["tokens_per_s"],
            "hf_tokens_per_s": h["tokens_per_s"],
            "what": f"{cfg.optimizer_steps_per_step} optimizer step(s) of fwd+bwd+clip+Adam over the same "
                    f"micro-batches of {cfg.parallel.micro_batch_size}"
                    + (", both without the cross-modal regulariser" if "update_no_crossmodal" in phases else "")}
    else:
        result["hf_compare_skipped"] = skip
    return result


def _microbatch_stats(ctx, last) -> dict:
    """Padding of the update's micro-batches on this rank (rank 0's are reported): the configured split, and with a
    token budget also the fixed split of the same rows (bench/padding.py). Every rank calls it (a collective)."""
    from mssr_megatron.bench.padding import microbatch_stats, update_microbatches, with_fixed_microbatches

    _, exp, rows, *_ = last.first("update_policy")[0]
    out = {"configured": microbatch_stats(exp, update_microbatches(ctx, exp, rows))}
    if ctx.cfg.parallel.max_tokens_per_microbatch is not None:
        out["fixed"] = microbatch_stats(exp, with_fixed_microbatches(ctx, lambda: update_microbatches(ctx, exp, rows)))
    return out


def _hf_skip_reason(wanted: bool, world: int, p, device, n_params: int) -> str | None:
    if not wanted:
        return "--no-hf-compare"
    if world > 1 or p.tensor_model_parallel_size > 1 or p.pipeline_model_parallel_size > 1:
        return "only in a single process at TP = PP = 1"
    if device.type == "cuda" and n_params > 1e9:
        return "the model is too large to train a second copy beside the Megatron one"
    return None


def _gather(value, world: int) -> list:
    if world == 1:
        return [value]
    out = [None] * world
    dist.all_gather_object(out, value)
    return out


def _stats(values: list[float]) -> dict:
    return {"seconds": values, "median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}


def _time_ratios(a: dict, b: dict) -> dict:
    """Phase a's time over phase b's, timed interleaved: the ratio of the medians and the median of the paired
    per-round ratios."""
    return {"time_ratio": a["median_s"] / b["median_s"],
            "time_ratio_paired_median": statistics.median(x / y for x, y in zip(a["seconds"], b["seconds"]))}


def _breakdown(times: list[dict], steps: list[dict], warmup: int, peak_flops_per_s: float) -> dict:
    """Median/min/max per trainer phase over the timed steps ('other' = step minus the timed phases), plus the
    step's tokens/s and MFU (per step, then the median)."""
    phases = {}
    for key in (*BREAKDOWN_KEYS, "step"):
        if all(key in t for t in times):
            phases[key] = _stats([t[key] for t in times])
    phases["other"] = _stats([t["step"] - sum(t.get(k, 0.0) for k in BREAKDOWN_KEYS) for t in times])
    rates = [s["tokens"] / t["step"] for s, t in zip(steps, times)]
    tflops = [s["total"] / t["step"] / 1e12 for s, t in zip(steps, times)]
    return {"steps": len(times), "warmup": warmup, "phases": phases, "per_step_flops": steps,
            "logprob_forwards": steps[0]["logprob_forwards"],
            "tokens_median": int(statistics.median(s["tokens"] for s in steps)),
            "tokens_per_s": statistics.median(rates), "tflops_per_s": statistics.median(tflops),
            "mfu": statistics.median(x * 1e12 / peak_flops_per_s for x in tflops),
            "token_kind": "prompt + response tokens of the step's rollouts (no padding)"}


def _config_summary(cfg, world: int, hf_config) -> dict:
    text, vision = hf_config.text_config, hf_config.vision_config
    p = cfg.parallel
    return {
        "model": cfg.model.hf_path, "params_dtype": cfg.model.params_dtype, "fp8": cfg.model.fp8,
        "transformer_impl": cfg.model.transformer_impl, "train_vision": cfg.model.train_vision,
        "text": {k: getattr(text, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "intermediate_size", "vocab_size")},
        "vision": {k: getattr(vision, k) for k in ("hidden_size", "depth", "num_heads", "intermediate_size",
                                                   "out_hidden_size", "patch_size", "spatial_merge_size",
                                                   "window_size", "fullatt_block_indexes")},
        "world_size": world, "tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
        "dp": world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size),
        "micro_batch_size": p.micro_batch_size, "mini_batch_size": cfg.optimizer.mini_batch_size,
        "ppo_epochs": cfg.optimizer.ppo_epochs, "prompts_per_step": cfg.data.prompts_per_step, "n": cfg.rollout.n,
        "rollouts_per_step": cfg.rollouts_per_step, "max_new_tokens": cfg.rollout.max_new_tokens,
        "engine": cfg.rollout.engine, "hf_batch_size": cfg.rollout.hf_batch_size,
        "estimator": cfg.algorithm.estimator, "reference_model": bool(
            cfg.algorithm.use_kl_loss or cfg.algorithm.kl_in_reward or cfg.algorithm.baseline.rho_rule == "kl_window"),
        "torch_threads": torch.get_num_threads(),
    }
