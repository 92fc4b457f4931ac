"""The Megatron training update against a plain PyTorch (Hugging Face) one over the same micro-batches, at two model
sizes: the embedded tiny default (0.9M parameters) and a ~100M-parameter Qwen2.5-VL (language model hidden 768, 16
layers, 12 heads / 2 key-value groups, intermediate 2048; vision tower hidden 256, 4 blocks), both with random
weights, on the tiny task's data (runs/tiny, `mssr make-tiny`; the 100M model shares its tokenizer).

    python tools/benchmark_update.py                       # tiny: examples/configs/tiny_cpu.yaml as it is
    python tools/benchmark_update.py --size 100m --repeats 3 --json update_100m.json

One RL step (trainer.train_step) records the update's inputs; then the update phase of `mssr bench`
(bench.phases.bench_update) times rl_step.update_policy (Megatron: forward, backward, gradient finalisation, the
non-finite check, clipping, Adam) and bench/hf_baseline.py's HFBaseline.update (transformers' model, torch's default
AdamW: "plain PyTorch"; and the same with torch's fused AdamW, the kernel Megatron's optimizer uses on the CPU) on the
same micro-batches, interleaved (M H Hf M H Hf ...). Prints the medians and the ratios (of the medians, the median
of the per-round ratios, of the total times) and in how many rounds Megatron's update was the faster: on a shared
2-core machine single rounds vary by +-10%, so the paired statistics are the ones to read. --json writes everything.
The 100M model directory is written once to --model-dir (default runs/bench_100m/model) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SIZES = {
    "tiny": {"overrides": []},
    "100m": {
        "overrides": ["data.prompts_per_step=16", "optimizer.mini_batch_size=16", "parallel.micro_batch_size=4"],
        "layers": 16,
        "text": dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=2, intermediate_size=2048,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}),
        "vision": dict(hidden_size=256, num_heads=4, intermediate_size=512, depth=4, fullatt_block_indexes=[1, 3]),
    },
}


def model_dir_100m(path: str) -> str:
    """The ~100M model directory (random weights, the tiny tokenizer and processor), written once."""
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    if not os.path.exists(os.path.join(path, "config.json")):
        size = SIZES["100m"]
        build_tiny_model_dir(path, num_layers=size["layers"], text_overrides=size["text"],
                             vision_overrides=size["vision"])
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--config", default="examples/configs/tiny_cpu.yaml")
    parser.add_argument("--model-dir", default="runs/bench_100m/model", help="where the 100M model is kept")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from mssr_megatron.bench import phases as P
    from mssr_megatron.config import load_config
    from mssr_megatron.train import trainer
    from mssr_megatron.train.run_context import build_context

    overrides = list(SIZES[args.size]["overrides"]) + ["logging.jsonl=false", "logging.tensorboard=false",
                                                       "logging.progress_bar=false"]
    if args.size == "100m":
        overrides.append(f"model.hf_path={model_dir_100m(args.model_dir)}")
    cfg = load_config(args.config, overrides)
    cfg.trainer.output_dir = os.path.join(cfg.trainer.output_dir, "bench_update")
    ctx = build_context(cfg)
    try:
        device = next(ctx.actor.module.parameters()).device
        with P.StepRecorder() as rec:
            rec.begin_step()
            trainer.train_step(ctx)
        result = P.bench_update(ctx, rec.last, warmup=args.warmup, repeats=args.repeats, device=device,
                                hf_baseline=True, hf_fused_adam=True)
        params = sum(p.numel() for p in ctx.actor.module.parameters())
    finally:
        ctx.close()
    megatron = result["update"]
    ratios = {}
    for key in ("hf_update", "hf_update_fused_adam"):
        hf = result[key]
        pairs = [m / h for m, h in zip(megatron["seconds"], hf["seconds"])]
        ratios[key] = {"ratio_of_medians": megatron["median_s"] / hf["median_s"],
                       "median_of_paired_ratios": statistics.median(pairs),
                       "ratio_of_totals": sum(megatron["seconds"]) / sum(hf["seconds"]),
                       "megatron_faster_rounds": sum(p < 1.0 for p in pairs), "rounds": len(pairs)}
    summary = {"size": args.size, "parameters": params, "threads": torch.get_num_threads(), "ratios": ratios,
               "phases": result}
    print(f"{args.size}: {params / 1e6:.1f}M parameters, {args.repeats} interleaved rounds after {args.warmup} "
          f"warm-up, {torch.get_num_threads()} threads")
    names = {"update": "Megatron update", "hf_update": "plain HF update",
             "hf_update_fused_adam": "HF, fused AdamW"}
    for key, name in names.items():
        r = result[key]
        print(f"  {name:<16} median {r['median_s']:.3f} s [{r['min_s']:.3f}, {r['max_s']:.3f}]")
    for key, r in ratios.items():
        print(f"  Megatron / {names[key]}: {r['ratio_of_medians']:.3f}x of the medians, "
              f"{r['median_of_paired_ratios']:.3f}x median of the paired rounds, {r['ratio_of_totals']:.3f}x of "
              f"the totals; Megatron faster in {r['megatron_faster_rounds']} of {r['rounds']} rounds")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
