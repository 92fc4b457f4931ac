"""Check the memory plan against measured CPU peaks: real Megatron ranks (gloo), the allocator's own events.

    python -m mssr_megatron.plan.measure [--cases tiny-tp1,...] [--out results.json]   # prints a markdown table

Each case builds, on every rank, the policy (DDP + optimizer) and the reference model, runs the forward-only log-prob
pass of both and two training steps (the second one with Adam's moments allocated) over text-only micro-batches of
the planned width, and records the peak of `profiling.peak_allocated_bytes` over all of it: net bytes the CPU
allocator held above the level before the models were built. Each micro-batch's last MAX_NEW_TOKENS positions are
its response (the actor computes the logits there only, as in training). The plan of the same run (no rollout
engine: none is built here; a fused Adam: torch's fused AdamW kernel on the CPU) is what it is compared with.
Parameters are float32 (the CPU dtype of this project), the layer implementation is 'local'.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

# name -> (model size, tp, world size, micro-batch size, sequence tokens, parallel options)
# options: "sp" = parallel.sequence_parallel, "distopt" = parallel.use_distributed_optimizer
CASES = {
    "tiny-tp1": ("tiny", 1, 1, 2, 96, ()),
    "tiny-tp2": ("tiny", 2, 2, 2, 96, ()),
    "tiny-dp2": ("tiny", 1, 2, 2, 96, ()),
    "tiny-tp2-sp": ("tiny", 2, 2, 2, 96, ("sp",)),
    "tiny-dp2-distopt": ("tiny", 1, 2, 2, 96, ("distopt",)),
    "100m-tp1": ("100m", 1, 1, 2, 256, ()),
    "100m-tp2": ("100m", 2, 2, 2, 256, ()),
    "100m-dp2": ("100m", 1, 2, 2, 256, ()),
    "100m-tp2-sp": ("100m", 2, 2, 2, 256, ("sp",)),
    "100m-dp2-distopt": ("100m", 1, 2, 2, 256, ("distopt",)),
}
MAX_NEW_TOKENS = 16


def model_config(size: str):
    """The HF config of a case: the project's tiny Qwen2.5-VL, or a ~125M-parameter one of the same family."""
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config

    if size == "tiny":
        return tiny_qwen2_5_vl_config(vocab_size=331, tie_word_embeddings=True, num_layers=4)
    return tiny_qwen2_5_vl_config(
        vocab_size=32000, tie_word_embeddings=False, num_layers=12,
        text_overrides=dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]}))


def run_config(tp: int, micro_batch: int, seq: int, options: tuple[str, ...] = ()):
    """The RunConfig the plan reads for a case (CPU dtype and layer spec, reference model on)."""
    from mssr_megatron.config import RunConfig

    cfg = RunConfig()
    cfg.model.params_dtype, cfg.model.transformer_impl = "float32", "local"
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.micro_batch_size = tp, micro_batch
    cfg.data.max_prompt_tokens, cfg.rollout.max_new_tokens = seq - MAX_NEW_TOKENS, MAX_NEW_TOKENS
    cfg.optimizer.mini_batch_size = 2 * micro_batch
    cfg.parallel.sequence_parallel = "sp" in options
    cfg.parallel.use_distributed_optimizer = "distopt" in options
    return cfg


def _worker(rank: int, size: str, tp: int, micro_batch: int, seq: int, options: tuple[str, ...],
            out_dir: str) -> None:
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.config import OptimizerConfig
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.profiling import peak_allocated_bytes

    init_megatron(tp, 1, seed=0)
    try:
        hf_config, cfg = model_config(size), run_config(tp, micro_batch, seq, options)
        g = torch.Generator().manual_seed(rank)
        batches = [{"input_ids": torch.randint(10, 300, (micro_batch, seq), generator=g),
                    "position_ids": torch.arange(seq).expand(3, micro_batch, seq).clone(),
                    "response_mask": (torch.arange(seq - 1) >= seq - 1 - MAX_NEW_TOKENS).expand(micro_batch, -1),
                    "rows": torch.arange(micro_batch)} for _ in range(2)]

        def loss(logprobs, entropy, batch):
            mask = batch["response_mask"].to(logprobs.dtype)
            return -((logprobs * mask).sum() + 0.01 * (entropy * mask).sum()) / mask.sum(), {}

        def run():
            actor = MegatronActor(hf_config, cfg.model, OptimizerConfig(lr=1e-4, weight_decay=0.0), 10,
                                  parallel_cfg=cfg.parallel)
            reference = MegatronActor(hf_config, cfg.model, parallel_cfg=cfg.parallel)
            actor.token_logprobs(batches)
            reference.token_logprobs(batches)
            for _ in range(2):
                actor.train_step(batches, loss)
            return sum(p.numel() for p in actor.module.parameters())

        peak, params = peak_allocated_bytes(run)
        torch.save({"peak": peak, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_megatron()


def _entry(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    _worker(rank, *args)


def measure_case(name: str) -> dict:
    """Measured peak (max over ranks) and the plan of one case."""
    import torch.multiprocessing as mp

    from mssr_megatron.parallel import free_port
    from mssr_megatron.plan.memory import plan_memory
    from mssr_megatron.plan.shapes import ModelShape

    size, tp, world, micro_batch, seq, options = CASES[name]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, free_port(), (size, tp, micro_batch, seq, options, out_dir)), nprocs=world,
                 join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    shape = ModelShape.from_dict(model_config(size).to_dict())
    plan = plan_memory(run_config(tp, micro_batch, seq, options), shape, world, image_tokens=0)
    planned = plan.total("training") - plan.line("engine").training
    measured = max(r["peak"] for r in ranks)
    return {"case": name, "tp": tp, "world_size": world, "options": list(options), "micro_batch_size": micro_batch,
            "sequence_tokens": seq,
            "params_on_rank": ranks[0]["params"], "planned_params_on_rank": plan.inputs["params_on_rank"],
            "measured_bytes": measured, "planned_bytes": planned, "ratio": planned / measured,
            "lines": {line.key: line.training for line in plan.lines if line.key != "engine"}}


def markdown(rows: list[dict]) -> str:
    head = ("| case | TP | ranks | mbs x tokens | params/rank (built = planned) | measured peak | plan | plan/measured |\n"
            "|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['case']} | {r['tp']} | {r['world_size']} | {r['micro_batch_size']} x {r['sequence_tokens']} | "
        f"{r['params_on_rank']:,} = {r['planned_params_on_rank']:,} | {r['measured_bytes'] / 2**20:.1f} MiB | "
        f"{r['planned_bytes'] / 2**20:.1f} MiB | {r['ratio']:.3f} |\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mssr_megatron.plan.measure", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    rows = [measure_case(name) for name in args.cases.split(",")]
    print(markdown(rows), end="")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
