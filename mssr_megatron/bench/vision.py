"""Vision tower time per rank under each model.vision_balance option, measured in the same run (`mssr bench`).

On the recorded step's update micro-batches (this data-parallel rank's rows, parallel.micro_batch_size), each option
runs the tower's forward (`Qwen2_5_VLMegatron.vision_features`: for tp_balanced this rank's share of the images plus
the all-gather of the features) and, with model.train_vision, its backward from a fixed cotangent (the features'
sum). A third entry, `tp_balanced_share`, times this rank's share alone (`encode_share`, no collective): the encoder's
own compute, apart from the gather and from waiting for the other rank. All are timed interleaved (replicate,
tp_balanced, tp_balanced_share, replicate, ...) on the same model, so a change of background load hits them alike,
each call started by all ranks together (`_timed_rounds`).
The once-per-step sum of the tower's gradients over TP (tp_balanced) is in none of them.
Per rank: the median seconds of all micro-batches together, and the patches it encoded (`assign_images`). The step
waits for the slowest rank of the TP group, so the ratios compare the slowest ranks' medians.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from mssr_megatron.models.vision_balance import assign_images, encode_share

OPTIONS = ("replicate", "tp_balanced", "tp_balanced_share")


def _image_microbatches(exp, rows, micro_batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixel_values, image_grid_thw) of each update micro-batch that holds images."""
    return [(b["pixel_values"], b["image_grid_thw"]) for b in exp.microbatches(rows, micro_batch_size)
            if "pixel_values" in b]


def _patches_per_rank(batches, option: str, rank: int, tp: int) -> int:
    """Patches this TP rank encodes over the micro-batches under `option`."""
    total = 0
    for _, grid in batches:
        patches = grid.prod(-1).tolist()
        owners = [rank] * len(patches) if option == "replicate" else assign_images(patches, tp)
        total += sum(n for n, owner in zip(patches, owners) if owner == rank)
    return total


def _timed_rounds(run, warmup: int, repeats: int, device) -> dict[str, list[float]]:
    """Seconds of run(option) per option, round by round (options interleaved), each call started by all ranks
    together (a barrier): a rank's time then includes its waits in the option's collectives for a slower rank, as
    in a training step, but not the other rank's lag from the previous call."""
    seconds: dict[str, list[float]] = {o: [] for o in OPTIONS}
    for i in range(warmup + repeats):
        for option in OPTIONS:
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            run(option)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                seconds[option].append(time.perf_counter() - start)
    return seconds


def bench_vision(ctx, rec, *, warmup: int, repeats: int, device) -> dict | None:
    """{"per_option": {option: {"median_s_per_rank", "patches_per_rank", "slowest_rank_median_s"}}, "time_ratio":
    tp_balanced / replicate (slowest ranks), "chosen": model.vision_balance, ...} on every rank; None when the
    step's update micro-batches hold no image (or this pipeline stage has no vision tower)."""
    from megatron.core import parallel_state as ps


    module = ctx.actor.module
    args, _, _ = rec.first("update_policy")
    _, exp, rows = args[:3]
    batches = [(p.to(device), g.to(device)) for p, g in
               _image_microbatches(exp, rows, ctx.cfg.parallel.micro_batch_size)]
    from mssr_megatron.parallel import collective_device

    has_work = torch.tensor([float(bool(batches) and module.vision_model is not None)], device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(has_work, op=dist.ReduceOp.MIN)  # every rank skips together (collectives below)
    if not has_work.item():
        return None
    chosen = module.vision_balance
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()

    def run(option: str):
        module.vision_balance = "replicate" if option == "replicate" else "tp_balanced"
        try:
            for pixels, grid in batches:
                if option == "tp_balanced_share":
                    features = encode_share(module.vision_model, pixels, grid, assign_images(
                        grid.prod(-1).tolist(), tp), tp_rank)
                else:
                    features = module.vision_features(pixels, grid)
                if features.requires_grad:  # model.train_vision
                    features.sum().backward()
        finally:
            module.vision_balance = chosen

    try:
        times = _timed_rounds(run, warmup, repeats, device)
    finally:  # the backward passes wrote into the gradient buffers: the next train_step zeroes them anyway
        ctx.actor.model.zero_grad_buffer()
    mine = {o: (times[o], _patches_per_rank(batches, o, tp_rank, tp)) for o in OPTIONS}
    everyone = [mine]
    if tp > 1:
        everyone = [None] * tp
        dist.all_gather_object(everyone, mine, group=ps.get_tensor_model_parallel_group())
    per_option = {}
    for o in OPTIONS:
        medians = [statistics.median(r[o][0]) for r in everyone]
        slowest = [max(r[o][0][i] for r in everyone) for i in range(repeats)]  # round by round
        per_option[o] = {"median_s_per_rank": medians, "patches_per_rank": [r[o][1] for r in everyone],
                         "slowest_rank_median_s": max(medians), "slowest_rank_s_per_round": slowest}

    def paired(option: str) -> float:  # median over rounds of option / replicate (each round's slowest rank)
        rounds = zip(per_option[option]["slowest_rank_s_per_round"],
                     per_option["replicate"]["slowest_rank_s_per_round"])
        return statistics.median(a / b for a, b in rounds)

    base = per_option["replicate"]["slowest_rank_median_s"]
    return {"per_option": per_option, "time_ratio": per_option["tp_balanced"]["slowest_rank_median_s"] / base,
            "share_time_ratio": per_option["tp_balanced_share"]["slowest_rank_median_s"] / base,
            "time_ratio_paired_median": paired("tp_balanced"),
            "share_time_ratio_paired_median": paired("tp_balanced_share"),
            "chosen": chosen, "tp": tp,
            "images": sum(len(g) for _, g in batches), "microbatches": len(batches),
            "image_grids": sorted({tuple(t) for _, g in batches for t in g.tolist()}),
            "what": "vision tower forward" + (" + backward" if ctx.cfg.model.train_vision else "")
                    + " per TP rank over this data-parallel rank's update micro-batches, options interleaved; "
                    "tp_balanced includes the features' all-gather, tp_balanced_share is this rank's images alone "
                    "(no collective), neither the once-per-step gradient all-reduce; time_ratio = tp_balanced / "
                    "replicate, share_time_ratio = tp_balanced_share / replicate, of the slowest rank's medians; "
                    "*_paired_median: the median over rounds of the same ratios, each round's slowest rank"}


def vision_line(result: dict) -> str:
    """One report line: per-rank medians and patches of each option, and the ratios to replicate."""
    parts = []
    for o in OPTIONS:
        r = result["per_option"][o]
        secs = "/".join(f"{s:.4f}" for s in r["median_s_per_rank"])
        parts.append(f"{o} {secs} s, patches {'/'.join(map(str, r['patches_per_rank']))}")
    return (f"vision tower per TP rank (median s, ranks 0..{result['tp'] - 1}): " + "; ".join(parts)
            + f"; tp_balanced / replicate {result['time_ratio']:.2f}x ({result['time_ratio_paired_median']:.2f}x "
              f"paired), its share alone {result['share_time_ratio']:.2f}x "
              f"({result['share_time_ratio_paired_median']:.2f}x paired) (slowest rank; option in use: "
              f"{result['chosen']}; {result['images']} images in {result['microbatches']} micro-batches)")

