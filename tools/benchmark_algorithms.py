"""Micro-benchmark of the algorithm core on CPU: estimator + shaping + loss (forward and backward) for a batch of
rollouts x tokens, and the Beta tracker's update with many prompts tracked. Medians over repeats after warm-up.

    python tools/benchmark_algorithms.py                       # 4096 rollouts x 1024 tokens, 1M-prompt tracker
    python tools/benchmark_algorithms.py --rollouts 512 --tokens 256 --json out.json

Prints a table and writes JSON. Timings are wall-clock on this machine, for comparison between versions of this code.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import torch

from mssr_megatron.algorithms import BetaBaselineTracker, compute_advantages, compute_policy_loss, shape_advantages
from mssr_megatron.algorithms.advantages import AdvantageBatch
from mssr_megatron.config import AlgorithmConfig
from mssr_megatron.profiling import timings


def timed(fn, repeats: int, warmup: int) -> dict[str, float]:
    times = timings(fn, repeats, warmup)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--tracked-prompts", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", default="runs/bench/algorithms.json")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    b, t = args.rollouts, args.tokens
    cfg = AlgorithmConfig()
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    rewards = torch.randint(0, 2, (b,), generator=gen).float()
    baseline = torch.rand(b, generator=gen, dtype=torch.float64)
    old = -torch.rand(b, t, generator=gen) * 3
    ref = old + 0.05 * torch.randn(b, t, generator=gen)
    logp0 = old + 0.05 * torch.randn(b, t, generator=gen)
    entropy = torch.rand(b, t, generator=gen) * 2

    def estimator():
        return compute_advantages("mssr", AdvantageBatch(rewards, mask, baseline=baseline), cfg).advantages

    adv = estimator()

    def shaping():
        return shape_advantages(adv, entropy, mask, cfg.shaping_alpha, cfg.shaping_kappa)[0]

    shaped = shaping()

    def loss():
        logp = logp0.clone().requires_grad_()
        value, _ = compute_policy_loss(cfg, logp, old, shaped, mask, ref_logprobs=ref)
        value.backward()

    def full_step():
        estimator()
        shaping()
        loss()

    tracker = BetaBaselineTracker(n0=8.0, capacity=args.tracked_prompts)
    all_ids = list(range(args.tracked_prompts))
    tracker.initialize(all_ids, torch.randint(0, 2, (args.tracked_prompts,), generator=gen).double())
    batch_ids = torch.randint(0, args.tracked_prompts, (b,), generator=gen).tolist()

    def tracker_step():
        tracker.baseline(batch_ids)
        tracker.update(batch_ids, rewards, rho=0.93)

    rows = {
        "estimator (mssr)": timed(estimator, args.repeats, args.warmup),
        "shaping": timed(shaping, args.repeats, args.warmup),
        "loss fwd+bwd (ppo_clip + k3 kl)": timed(loss, args.repeats, args.warmup),
        "estimator + shaping + loss": timed(full_step, args.repeats, args.warmup),
        f"tracker read+update ({args.tracked_prompts:,} tracked)": timed(tracker_step, args.repeats, args.warmup),
    }
    result = {
        "rollouts": b, "tokens": t, "response_tokens": int(mask.sum()), "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "timings": rows,
    }
    print(f"{b} rollouts x {t} tokens ({int(mask.sum()):,} response tokens), torch threads {torch.get_num_threads()}")
    print(f"{'part':<46}{'median ms':>11}{'min ms':>10}")
    for name, row in rows.items():
        print(f"{name:<46}{row['median_ms']:>11.1f}{row['min_ms']:>10.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
