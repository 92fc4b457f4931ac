"""Weight-sync throughput: Megatron shards -> HF tensors -> buckets, against a plain copy of the same bytes.

    python tools/benchmark_weight_sync.py                         # 1 process, a ~40M-parameter Qwen2.5-VL-shaped model
    python tools/benchmark_weight_sync.py --tp 2 --hidden 256     # 2 gloo processes

Both are timed in the same run on the same machine: "export" is `sync_weights` into an engine that only touches each
bucket (so the engine's own load cost is excluded), "plain copy" copies every exported tensor's bytes once into a
preallocated buffer. Reports medians over repeats, GB/s and the ratio, plus the owner's peak extra memory; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


class TouchEngine:
    """Reads each bucket once (a checksum-free sum over its bytes would cost more than the copy; a view suffices)."""

    def update_weights(self, buckets):
        for bucket in buckets:
            bucket.flat[-1:].clone()


def _worker(rank: int, args, out_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.tp * args.pp))
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.profiling import peak_allocated_bytes, timings
    from mssr_megatron.rollout.weight_export import export_full_weights, is_weight_owner, sync_weights

    init_megatron(args.tp, args.pp, seed=0)
    heads = args.hidden // 32
    hf_config = tiny_qwen2_5_vl_config(vocab_size=args.vocab, num_layers=args.layers, hidden_size=args.hidden,
                                       num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                                       intermediate_size=3 * args.hidden, tie_word_embeddings=False,
                                       text_overrides={"rope_parameters": {"rope_type": "default",
                                                                           "rope_theta": 1e6,
                                                                           "mrope_section": [4, 6, 6]}})
    actor = MegatronActor(hf_config, ModelConfig(params_dtype="float32"))
    bucket = int(args.bucket_mb * 2**20)
    tensors = [t.clone() for _, t in export_full_weights(actor.module, actor.dims)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    target = torch.empty(total, dtype=torch.uint8)

    def plain_copy():
        offset = 0
        for t in tensors:
            n = t.numel() * t.element_size()
            target[offset : offset + n].copy_(t.reshape(-1).view(torch.uint8))
            offset += n

    def timed(fn):
        return statistics.median(timings(fn, args.repeats))

    export_s = timed(lambda: sync_weights(actor.module, actor.dims, TouchEngine(), bucket_bytes=bucket))
    copy_s = timed(plain_copy) if is_weight_owner() else float("nan")
    del tensors
    peak, _ = peak_allocated_bytes(lambda: sync_weights(actor.module, actor.dims, TouchEngine(), bucket_bytes=bucket))
    if is_weight_owner():
        with open(out_path, "w") as f:
            json.dump({"tp": args.tp, "pp": args.pp, "model_bytes": total, "bucket_bytes": bucket,
                       "export_s": export_s, "plain_copy_s": copy_s, "export_gb_s": total / export_s / 1e9,
                       "plain_copy_gb_s": total / copy_s / 1e9, "export_vs_copy_time_ratio": export_s / copy_s,
                       "owner_peak_extra_bytes": peak, "repeats": args.repeats,
                       "torch_threads": torch.get_num_threads()}, f, indent=1)
    destroy_megatron()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--bucket-mb", type=float, default=16.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="runs/bench/weight_sync.json")
    args = parser.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    world = args.tp * args.pp
    from mssr_megatron.parallel import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if world == 1:
        _worker(0, args, args.json)
    else:
        torch.multiprocessing.spawn(_worker, args=(args, args.json), nprocs=world, join=True)
    with open(args.json) as f:
        r = json.load(f)
    mib = 2**20
    print(f"model {r['model_bytes'] / mib:.1f} MiB, bucket {r['bucket_bytes'] / mib:.1f} MiB, TP={r['tp']} PP={r['pp']}, "
          f"median of {r['repeats']}")
    print(f"{'path':<34}{'seconds':>10}{'GB/s':>9}")
    print(f"{'export (gather+map+bucket)':<34}{r['export_s']:>10.4f}{r['export_gb_s']:>9.2f}")
    print(f"{'plain copy of the same bytes':<34}{r['plain_copy_s']:>10.4f}{r['plain_copy_gb_s']:>9.2f}")
    print(f"export / plain copy time: {r['export_vs_copy_time_ratio']:.2f}x; "
          f"owner peak extra memory {r['owner_peak_extra_bytes'] / mib:.1f} MiB; wrote {args.json}")


if __name__ == "__main__":
    main()
