"""Token-budget micro-batches (parallel.max_tokens_per_microbatch) against fixed micro-batches, on a mixed-length
synthetic step: images of 84..448 px a side (each side drawn on its own), prompts of 8..32 text tokens, responses of
4..64 tokens. One process, TP = PP = 1, the tiny Qwen2.5-VL (models/tiny_hf.py) on the CPU (or --device cuda).

    python tools/benchmark_token_budget.py                          # 32 rows, micro-batches of 4, 3 timed updates
    python tools/benchmark_token_budget.py --rows 64 --repeats 5 --json out.json

The budget defaults to the cost of the costliest fixed micro-batch (rows x padded width + image patches,
train/token_budget.py), so token budgets never hold more in one micro-batch than the fixed split did. Both splits
run the same rl_step.update_policy (one optimizer step over the whole step at lr 0, so every repeat sees the same
weights), timed interleaved (fixed, budget, fixed, ...). Reports each split's micro-batch count, padding fraction
(padded token slots / all token slots), vision patches, update time (median, min, max) and real tokens/s. Then,
for --dp data-parallel ranks (default 2), each rank's cost of the step (padded tokens + patches of its micro-batches)
with the rows in contiguous blocks and reordered by token_budget.balanced_row_order (arithmetic: bench/padding.py
rank_costs, no model run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import types

import torch

PATCH_PX = 28  # a Qwen2.5-VL image side is resized to a multiple of patch 14 x merge 2 pixels


def synthetic_rollouts(rows: int, hf_config, seed: int):
    """(rollouts, images): per row a prompt of 8..32 text tokens around one image of 84..448 px a side (sides drawn
    apart, rounded to 28 px: grid h, w = 2 * round(side / 28) patches) and a response of 4..64 tokens."""
    g = torch.Generator().manual_seed(seed)

    def draw(low, high):
        return int(torch.randint(low, high + 1, (1,), generator=g))

    rollouts, images = [], []
    for _ in range(rows):
        h, w = (2 * round(draw(84, 448) / PATCH_PX) for _ in range(2))
        text = torch.randint(10, 300, (draw(8, 32),), generator=g).tolist()
        image = ([hf_config.vision_start_token_id] + [hf_config.image_token_id] * (h * w // 4)
                 + [hf_config.vision_end_token_id])
        response = torch.randint(10, 300, (draw(4, 64),), generator=g).tolist()
        rollouts.append(types.SimpleNamespace(prompt_ids=text[:4] + image + text[4:], response_ids=response,
                                              response_logprobs=[-1.0] * len(response)))
        images.append((torch.randn(h * w, 3 * 2 * 14 * 14, generator=g), torch.tensor([[1, h, w]])))
    return rollouts, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32, help="rollouts in the step (one mini-batch)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="rows per fixed micro-batch")
    parser.add_argument("--budget", type=int, default=None, help="token budget (default: costliest fixed one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2, help="language layers of the tiny model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dp", type=int, default=2, help="data-parallel ranks of the rank-balance report")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from mssr_megatron.algorithms.losses import compute_policy_loss
    from mssr_megatron.bench.padding import microbatch_stats, rank_costs, update_microbatches
    from mssr_megatron.config import AlgorithmConfig, ModelConfig, OptimizerConfig, ParallelConfig, RunConfig
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.train import rl_step
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.train.experience import build_experience

    init_megatron(1, 1, seed=args.seed, device=args.device)
    try:
        hf_config = tiny_qwen2_5_vl_config(vocab_size=331, num_layers=args.layers)
        model_cfg = ModelConfig(params_dtype="float32")
        actor = MegatronActor(hf_config, model_cfg, OptimizerConfig(lr=0.0, weight_decay=0.0, grad_clip=1.0), 10,
                              device=args.device)
        rollouts, images = synthetic_rollouts(args.rows, hf_config, args.seed)
        exp = build_experience(rollouts, [1.0] * args.rows, list(range(args.rows)), list(range(args.rows)), images,
                               image_token_id=hf_config.image_token_id,
                               spatial_merge_size=hf_config.vision_config.spatial_merge_size, pad_id=0)
        rows = torch.arange(args.rows)
        advantages = torch.randn(args.rows, exp.input_ids.shape[1] - 1, generator=torch.Generator().manual_seed(1))
        algo_cfg = AlgorithmConfig()
        algo = types.SimpleNamespace(loss=lambda *a, **k: compute_policy_loss(algo_cfg, *a, **k))

        def context(budget):
            cfg = RunConfig(model=model_cfg, parallel=ParallelConfig(micro_batch_size=args.micro_batch_size,
                                                                     max_tokens_per_microbatch=budget))
            cfg.optimizer.mini_batch_size, cfg.optimizer.ppo_epochs = args.rows, 1
            return types.SimpleNamespace(cfg=cfg, actor=actor, algo=algo, blocked_ids=[])

        fixed = context(None)
        old, _ = rl_step.token_logprobs(fixed, actor, exp, rows, 1.0)
        budget = args.budget or microbatch_stats(exp, update_microbatches(fixed, exp, rows))["max_cost"]
        splits = {"fixed": fixed, "budget": context(budget)}
        stats = {name: microbatch_stats(exp, update_microbatches(ctx, exp, rows)) for name, ctx in splits.items()}
        seconds = {name: [] for name in splits}
        for i in range(args.warmup + args.repeats):
            for name, ctx in splits.items():
                start = time.perf_counter()
                rl_step.update_policy(ctx, exp, rows, advantages, old, old)
                if i >= args.warmup:
                    seconds[name].append(time.perf_counter() - start)
        real = int(exp.lengths.sum())
        balance = rank_costs(exp, args.dp, args.rows // args.dp, budget)
        for name in splits:
            s = seconds[name]
            stats[name].update(median_s=statistics.median(s), min_s=min(s), max_s=max(s), seconds=s,
                               tokens_per_s=real / statistics.median(s))
        result = {"rows": args.rows, "micro_batch_size": args.micro_batch_size, "budget": budget,
                  "layers": args.layers, "device": args.device, "threads": torch.get_num_threads(),
                  "machine": platform.node(), "real_tokens": real,
                  "time_ratio_budget_over_fixed": stats["budget"]["median_s"] / stats["fixed"]["median_s"],
                  "time_ratio_paired_median": statistics.median(
                      b / f for b, f in zip(seconds["budget"], seconds["fixed"])), "splits": stats,
                  "data_parallel_balance": dict(balance, dp=args.dp)}
    finally:
        destroy_megatron()
    print(f"{args.rows} rows, {real} real tokens, budget {budget}, {args.repeats} timed updates after "
          f"{args.warmup} warm-up, {torch.get_num_threads()} threads")
    print(f"{'split':<8}{'micro-batches':>15}{'padding':>10}{'patches':>10}{'largest cost':>14}"
          f"{'median s [min, max]':>26}{'tokens/s':>11}")
    for name, s in stats.items():
        print(f"{name:<8}{s['microbatches']:>15}{100 * s['padding_fraction']:>9.1f}%{s['vision_patches']:>10}"
              f"{s['max_cost']:>14}{s['median_s']:>10.3f} [{s['min_s']:.3f}, {s['max_s']:.3f}]"
              f"{s['tokens_per_s']:>11.1f}")
    print(f"budget / fixed update time: {result['time_ratio_budget_over_fixed']:.2f}x of the medians, "
          f"{result['time_ratio_paired_median']:.2f}x median of the interleaved pairs")
    for name, b in balance.items():
        print(f"{args.dp} data-parallel ranks, {name} rows: cost per rank {b['per_rank']} (padded tokens + patches), "
              f"costliest / mean {b['max_over_mean']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
