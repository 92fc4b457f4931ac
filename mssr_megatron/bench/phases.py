"""Run the trainer's own step and replay its phases one at a time, timed, with their token counts and model FLOPs.

`StepRecorder` wraps, for as long as it is entered, the `rl_step` functions that `trainer.train_step` calls through
the module (generate, make_experience, token_logprobs, update_policy), so that driving the REAL step function also
hands back that step's inputs and outputs. The phase benchmarks then call the same functions again with those
inputs: rollout generation, the old-policy log-prob forward, the policy update, the weight sync.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from mssr_megatron.train import rl_step
from mssr_megatron.bench import flops as F
from mssr_megatron.profiling import peak_allocated_bytes, timings

_WRAPPED = ("generate", "make_experience", "token_logprobs", "update_policy")


@dataclass
class StepRecord:
    """What one trainer step called: {function name: [(args, kwargs, result), ...]}."""

    calls: dict = field(default_factory=dict)

    def first(self, name: str):
        return self.calls[name][0]

    def count(self, name: str) -> int:
        return len(self.calls.get(name, ()))


class StepRecorder:
    """with StepRecorder() as rec: rec.begin_step(); trainer.train_step(ctx)  ->  rec.last.calls[...]

    Only the latest step is kept (its tensors are what the phase benchmarks replay)."""

    def __init__(self):
        self.last = StepRecord()
        self._originals: dict = {}

    def __enter__(self) -> "StepRecorder":
        for name in _WRAPPED:
            self._originals[name] = getattr(rl_step, name)
            setattr(rl_step, name, self._wrap(name, self._originals[name]))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._originals.items():
            setattr(rl_step, name, fn)
        self._originals.clear()

    def begin_step(self) -> None:
        self.last = StepRecord()

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            result = fn(*args, **kwargs)
            self.last.calls.setdefault(name, []).append((args, kwargs, result))
            return result
        return recorded


def rollout_shapes(rollouts, exp=None) -> dict:
    """Token counts of a step's rollouts (all rows, every data-parallel replica): prompt_lens, response_lens, lengths
    (prompt + response: the real tokens of each row), padded_tokens (rows x the experience width L)."""
    prompt = [len(r.prompt_ids) for r in rollouts]
    response = [len(r.response_ids) for r in rollouts]
    out = {"prompt_lens": prompt, "response_lens": response, "lengths": [p + n for p, n in zip(prompt, response)]}
    if exp is not None:
        out["padded_tokens"] = int(exp.input_ids.numel())
    return out


def row_grids(exp, rows=None) -> list[list[int]]:
    """[(t, h, w), ...] of every image of the given rows (default: all), one entry per row and image."""
    rows = range(len(exp)) if rows is None else rows
    grids = []
    for i in rows:
        g = exp.image_grid_thw[int(i)] if exp.image_grid_thw else None
        if g is not None:
            grids.extend(g.tolist())
    return grids


def step_flops(hf_config, rec: StepRecord, exp, train_vision: bool, ppo_epochs: int) -> dict:
    """Model FLOPs of one recorded trainer step: generation + every log-prob forward (policy, reference, ...) +
    the update (training FLOPs x PPO epochs), all rows (all replicas)."""
    shapes = rollout_shapes(rec.first("generate")[2])
    grids = row_grids(exp)
    gen = F.generation_flops(hf_config, shapes["prompt_lens"], shapes["response_lens"], grids)["total"]
    fwd = F.forward_flops(hf_config, shapes["lengths"], grids)
    train = F.training_flops(fwd, train_vision)["total"] * ppo_epochs * max(rec.count("update_policy"), 1)
    logprob = fwd["total"] * rec.count("token_logprobs")
    return {"generation": gen, "logprobs": logprob, "update": train, "total": gen + logprob + train,
            "tokens": sum(shapes["lengths"]), "logprob_forwards": rec.count("token_logprobs")}


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def measure(fn, *, warmup: int, repeats: int, device: torch.device, memory: bool = True) -> dict:
    """Seconds of `repeats` calls after `warmup` untimed ones (all ranks start together), their median/min/max, and
    the peak memory of the phase: CUDA max_memory_allocated over the timed calls, or on CPU the profiler's peak net
    allocation during one extra untimed call (`profiling.peak_allocated_bytes`)."""
    return measure_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, device=device, memory=memory)["fn"]


def measure_interleaved(fns: dict, *, warmup: int, repeats: int, device: torch.device,
                        memory: bool = True) -> dict[str, dict]:
    """`measure` for functions whose times are compared: round i calls each of them once, back to back
    (A B A B ...), so that a change of background load on a shared machine hits all of them alike."""
    cuda = device.type == "cuda"

    def call(fn):
        result = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return result

    _barrier()
    for _ in range(warmup):
        for fn in fns.values():
            call(fn)
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    peaks = dict.fromkeys(fns, 0)
    for _ in range(repeats):
        for key, fn in fns.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            seconds[key] += timings(lambda fn=fn: call(fn), 1, 0)
            if cuda:
                peaks[key] = max(peaks[key], int(torch.cuda.max_memory_allocated(device)))
    out = {}
    for key, fn in fns.items():
        s = seconds[key]
        out[key] = {"seconds": s, "median_s": statistics.median(s), "min_s": min(s), "max_s": max(s)}
        if cuda:
            out[key].update(peak_memory_bytes=peaks[key], memory_kind="cuda max_memory_allocated (timed calls)")
        elif memory:
            _barrier()
            peak, _ = peak_allocated_bytes(lambda fn=fn: call(fn))
            out[key].update(peak_memory_bytes=int(peak),
                            memory_kind="CPU peak net allocation, one extra call (profiler)")
    return out


def bench_generation(ctx, rec: StepRecord, *, warmup: int, repeats: int, device) -> dict:
    """engine.generate (through rl_step.generate, as the trainer calls it) on the recorded step's prompts with its
    sampling settings and seed. Tokens: the generated (response) tokens; FLOPs: prefill + KV-cached decode."""
    args, kwargs, rollouts = rec.first("generate")
    exp = rec.first("make_experience")[2]
    result = measure(lambda: rl_step.generate(*args, **kwargs), warmup=warmup, repeats=repeats, device=device)
    shapes = rollout_shapes(rollouts, exp)
    gen = F.generation_flops(ctx.hf_config, shapes["prompt_lens"], shapes["response_lens"], row_grids(exp))
    result.update(tokens=sum(shapes["response_lens"]), token_kind="generated tokens (responses)",
                  prompt_tokens=sum(shapes["prompt_lens"]), rollouts=len(rollouts), flops=gen["total"],
                  flops_parts=gen)
    return result


def bench_logprobs(ctx, rec: StepRecord, *, warmup: int, repeats: int, device) -> dict:
    """actor.token_logprobs (through rl_step.token_logprobs) on the recorded step's rows: the old-policy forward.
    Tokens: real prompt + response tokens of all rows (padding excluded)."""
    args, kwargs, _ = rec.first("token_logprobs")
    exp = rec.first("make_experience")[2]
    result = measure(lambda: rl_step.token_logprobs(*args, **kwargs), warmup=warmup, repeats=repeats, device=device)
    shapes = rollout_shapes(rec.first("generate")[2], exp)
    fwd = F.forward_flops(ctx.hf_config, shapes["lengths"], row_grids(exp))
    result.update(tokens=sum(shapes["lengths"]), token_kind="prompt + response tokens (no padding)",
                  padded_tokens=shapes["padded_tokens"], flops=fwd["total"], flops_parts=fwd)
    return result


def update_flops(ctx, rec: StepRecord) -> dict:
    exp = rec.first("make_experience")[2]
    shapes = rollout_shapes(rec.first("generate")[2], exp)
    epochs = ctx.cfg.optimizer.ppo_epochs
    fwd = F.forward_flops(ctx.hf_config, shapes["lengths"], row_grids(exp))
    train = {k: v * epochs for k, v in F.training_flops(fwd, ctx.cfg.model.train_vision).items()}
    return {"tokens": sum(shapes["lengths"]) * epochs,
            "token_kind": f"prompt + response tokens (no padding) x {epochs} PPO epoch(s)",
            "padded_tokens": shapes["padded_tokens"] * epochs, "flops": train["total"], "flops_parts": train,
            "optimizer_steps": ctx.cfg.optimizer_steps_per_step}


def bench_update(ctx, rec: StepRecord, *, warmup: int, repeats: int, device, hf_baseline: bool = False,
                 hf_fused_adam: bool = False) -> dict:
    """rl_step.update_policy (every mini-batch: actor.train_step = forward, backward, gradient finalisation,
    clipping, optimizer step) on the recorded step's experience, advantages and old/reference log-probs.
    hf_baseline=True: also the plain Hugging Face update (hf_baseline.HFBaseline) on the same inputs, timed
    interleaved with it; hf_fused_adam=True: also that update with torch's fused AdamW kernel (the one Megatron's
    optimizer steps with on the CPU, actor.use_fused_torch_adam), a second baseline on the same inputs.
    Returns {"update": ..., "hf_update": ..., "hf_update_fused_adam": ...} (the HF entries only when asked for)."""
    args, kwargs, _ = rec.first("update_policy")
    skipped = []

    def megatron():
        out = rl_step.update_policy(*args, **kwargs)
        if ctx.actor.nonfinite is not None:
            skipped.append(ctx.actor.nonfinite)
        return out

    fns = {"update": megatron}
    crossmodal = ctx.cfg.algorithm.crossmodal_coef != 0.0
    if crossmodal:  # the same update without the regulariser, interleaved with it: its cost in this run
        fns["update_no_crossmodal"] = lambda: without_crossmodal(ctx, megatron)
    if ctx.cfg.parallel.max_tokens_per_microbatch is not None:  # token budget vs fixed micro-batches, same run
        from mssr_megatron.bench.padding import with_fixed_microbatches

        fns["update_fixed_microbatches"] = lambda: with_fixed_microbatches(ctx, megatron)
    if hf_baseline:
        from mssr_megatron.bench.hf_baseline import HFBaseline

        _, exp, rows, advantages, old, ref = args
        lengths = torch.tensor(rollout_shapes(rec.first("generate")[2])["lengths"])
        baselines = {"hf_update": HFBaseline(ctx.cfg.model.hf_path, ctx, device)}
        if hf_fused_adam:
            baselines["hf_update_fused_adam"] = HFBaseline(ctx.cfg.model.hf_path, ctx, device, fused_adam=True)
        for name, baseline in baselines.items():
            # the plain-HF update has no text-only pass: it is compared with the update without the regulariser
            fns[name] = lambda baseline=baseline: without_crossmodal(
                ctx, lambda: baseline.update(ctx, exp, rows, lengths, advantages, old, ref))
    results = measure_interleaved(fns, warmup=warmup, repeats=repeats, device=device)
    for result in results.values():
        result.update(update_flops(ctx, rec))
    results["update"]["skipped_updates"] = len(skipped)
    if crossmodal:
        results["update"]["crossmodal_coef"] = ctx.cfg.algorithm.crossmodal_coef
        results["update"]["flops_note"] = ("tokens and FLOPs count each row once: the text-only copies of the "
                                           "cross-modal regulariser are extra work, not counted")
    return results


def without_crossmodal(ctx, fn):
    """fn() with algorithm.crossmodal_coef set to 0 (the update's pairing and loss both read it), then restored."""
    cfg = ctx.cfg.algorithm
    coef, cfg.crossmodal_coef = cfg.crossmodal_coef, 0.0
    try:
        return fn()
    finally:
        cfg.crossmodal_coef = coef


def bench_weight_sync(ctx, *, warmup: int, repeats: int, device) -> dict:
    """sync_weights(actor -> engine) as the trainer calls it; bytes and GB/s from its own report."""
    from mssr_megatron.rollout.weight_export import sync_weights

    bucket = ctx.cfg.rollout.weight_bucket_bytes
    reports = []
    result = measure(lambda: reports.append(sync_weights(ctx.actor.module, ctx.actor.dims, ctx.engine, bucket,
                                                         hosts=ctx.engine_hosts)),
                     warmup=warmup, repeats=repeats, device=device)
    nbytes = int(max((r["sync/bytes"] for r in reports), default=0))  # the owner's count (0 on other ranks)
    if dist.is_initialized() and dist.get_world_size() > 1:
        from mssr_megatron.parallel import collective_device

        box = torch.tensor([float(nbytes)], device=collective_device())  # NCCL: a CUDA tensor
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        nbytes = int(box.item())
    result.update(bytes=nbytes, buckets=int(reports[-1]["sync/buckets"]) if reports else 0,
                  gb_per_s=nbytes / result["median_s"] / 1e9 if result["median_s"] > 0 else float("nan"),
                  bucket_bytes=bucket)
    return result
