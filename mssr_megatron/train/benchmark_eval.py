"""The benchmark suite inside training (trainer.eval_every, eval.suite): the policy as the engine serves it after a
step's weight sync (the state validate() relies on too) answers the suite; per-benchmark accuracy is logged with the
step's metrics ("eval/<NAME>/accuracy", "eval/average") and the evaluation's files go to <run>/eval/step_<N>/.

Where it runs: on the first engine's host only (ctx.engine_slots[0]), through parallel.run_on_hosts like every
rollout, while the other ranks (and the other engines) wait outside any collective; the metrics come back to every
rank. The suite is read once, at set-up, on that host (`read_sets`), so a bad suite fails before step 1.
"""

from __future__ import annotations

import os
import shutil

from mssr_megatron.parallel import run_on_hosts


def read_sets(cfg, hosts: list[int]):
    """The suite's BenchmarkSets on the first engine host (None on every other rank, and when eval_every is 0)."""
    if not cfg.trainer.eval_every:
        return None
    from mssr_megatron.eval.suite import read_suite

    return run_on_hosts(lambda: read_suite(cfg.eval.suite, limit=cfg.eval.limit), hosts[:1], "reading eval.suite",
                        share=False)


def evaluate(ctx) -> dict[str, float]:
    """Run the suite on the current policy; returns {"eval/<NAME>/accuracy": ..., "eval/average": ...} on every rank.
    A step folder left by an earlier attempt of this run (killed mid-evaluation, resumed from an older checkpoint)
    is removed first: the resumed policy at that step need not equal the one that wrote it."""
    from mssr_megatron.data.prompts import PromptFormat
    from mssr_megatron.eval.runner import run_eval

    cfg = ctx.cfg
    out_dir = os.path.join(ctx.run_dir, "eval", f"step_{ctx.step}")

    def work() -> dict[str, float]:
        shutil.rmtree(out_dir, ignore_errors=True)
        results = run_eval(ctx.engine, ctx.extra["eval_sets"], PromptFormat.from_config(cfg.data), ctx.processor,
                           cfg.eval, out_dir, step=ctx.step, model=os.path.abspath(ctx.run_dir),
                           progress=cfg.logging.progress_bar)
        return eval_metrics(results)

    return run_on_hosts(work, ctx.engine_hosts[:1], "benchmark evaluation")[0]


def eval_metrics(results: dict) -> dict[str, float]:
    """RESULTS -> the logged metrics; a benchmark without questions (accuracy None) is left out."""
    metrics = {f"eval/{name}/accuracy": b["accuracy"] for name, b in results["benchmarks"].items()
               if b["accuracy"] is not None}
    if results["average"] is not None:
        metrics["eval/average"] = results["average"]
    return metrics
