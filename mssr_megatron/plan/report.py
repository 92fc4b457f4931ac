"""The memory plan for people and for the launch paths: a table, JSON, settings that would fit, and the refusal.

    print(format_plan(plan, title))                        # the table `mssr plan` prints
    fixes = fitting_settings(cfg, shape, world_size, gpu_bytes)   # [["parallel.micro_batch_size=1", ...], ...]
    check_fits(cfg, shape, world_size, gpu_bytes, where="mssr launch")   # ValueError naming line and fixes
"""

from __future__ import annotations

import copy
import itertools

from mssr_megatron.plan.memory import GB, MemoryPlan, plan_memory
from mssr_megatron.plan.shapes import ModelShape

_ENGINE_HEADROOM = 0.05  # of the GPU, left free beside the engine (CUDA context, NCCL buffers, fragmentation)


def format_plan(plan: MemoryPlan, title: str) -> str:
    gpu = f"{plan.gpu_bytes / GB:.0f} GB per GPU" if plan.gpu_bytes else "no GPU size given"
    width = max(len(line.label) for line in plan.lines) + 2
    rows = [f"{title}: {plan.layout}; {gpu}",
            f"{'':{width}}{'rollout':>10}{'training':>10}   GB per rank; notes"]
    for line in plan.lines:
        rows.append(f"{line.label:{width}}{line.rollout / GB:10.1f}{line.training / GB:10.1f}   {line.note}")
    rows.append(f"{'total':{width}}{plan.total('rollout') / GB:10.1f}{plan.total('training') / GB:10.1f}")
    rows.append(verdict(plan))
    return "\n".join(rows)


def verdict(plan: MemoryPlan) -> str:
    if plan.gpu_bytes is None:
        return f"peak {plan.peak / GB:.1f} GB per rank"
    over = plan.overflow()
    if over is None:
        return f"fits: peak {plan.peak / GB:.1f} GB of {plan.gpu_bytes / GB:.0f} GB"
    phase, line = over
    return (f"DOES NOT FIT: the {phase} phase needs {plan.total(phase) / GB:.1f} GB of "
            f"{plan.gpu_bytes / GB:.0f} GB; it overflows at '{line.label}' ({getattr(line, phase) / GB:.1f} GB: "
            f"{line.note})")


def _candidates(cfg, world_size: int, shape: ModelShape):
    """Override dicts around cfg: larger TP (dividing the heads and the world), sequence parallelism, the
    distributed optimizer, recompute, smaller micro-batches."""
    p, m = cfg.parallel, cfg.model
    tps = [t for t in (p.tensor_model_parallel_size * f for f in (1, 2, 4, 8))
           if shape.heads % t == 0 and shape.kv_heads % t == 0 and world_size % (t * p.pipeline_model_parallel_size) == 0]
    mbs = sorted({max(p.micro_batch_size // f, 1) for f in (1, 2, 4, 8)}, reverse=True)
    recompute = [(m.recompute_granularity, m.recompute_method, m.recompute_num_layers),
                 ("selective", None, None), ("full", "uniform", 1)]
    for tp, sp, dist_opt, rec, mb in itertools.product(tps, (p.sequence_parallel, True), (p.use_distributed_optimizer, True),
                                                       recompute, mbs):
        yield {"parallel.tensor_model_parallel_size": tp, "parallel.sequence_parallel": sp and tp > 1,
               "parallel.use_distributed_optimizer": dist_opt, "model.recompute_granularity": rec[0],
               "model.recompute_method": rec[1], "model.recompute_num_layers": rec[2],
               "parallel.micro_batch_size": mb}


def _apply(cfg, overrides: dict):
    new = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(new, section), name, value)
    return new


def _fit_engine(cfg, shape: ModelShape, world_size: int, gpu_bytes: int, kw) -> dict:
    """rollout.mem_fraction lowered (in steps of 0.05) until the rollout phase fits, when the engine takes a
    fraction of the GPU; {} when nothing needs changing or no fraction leaves the engine room beyond its weights."""
    if cfg.rollout.engine == "hf":
        return {}
    plan = plan_memory(cfg, shape, world_size, gpu_bytes, **kw)
    if plan.total("rollout") <= gpu_bytes:
        return {}
    engine = plan.line("engine")
    resident = plan.total("rollout") - engine.rollout
    fraction = int((1 - _ENGINE_HEADROOM - resident / gpu_bytes) / 0.05) * 0.05
    weights = shape.total_params() * 2 // cfg.rollout.engine_tp_size
    return {"rollout.mem_fraction": round(fraction, 2)} if fraction * gpu_bytes > 1.25 * weights else {}


def fitting_settings(cfg, shape: ModelShape, world_size: int, gpu_bytes: int, limit: int = 3, **kw) -> list[list[str]]:
    """Up to `limit` sets of key=value overrides under which the plan fits, fewest changes first."""
    from mssr_megatron.config import ConfigError

    found = []
    for overrides in _candidates(cfg, world_size, shape):
        candidate = _apply(cfg, overrides)
        engine_fix = _fit_engine(candidate, shape, world_size, gpu_bytes, kw)
        candidate = _apply(candidate, engine_fix)
        try:
            candidate.validate(world_size=world_size)
        except ConfigError:
            continue
        plan = plan_memory(candidate, shape, world_size, gpu_bytes, **kw)
        if not plan.fits:
            continue
        changed = {k: v for k, v in {**overrides, **engine_fix}.items() if _get(cfg, k) != v}
        found.append((len(changed), plan.peak, [f"{k}={_text(v)}" for k, v in changed.items()]))
    found.sort(key=lambda item: (item[0], item[1]))
    unique = []
    for _, _, settings in found:
        if settings not in unique:
            unique.append(settings)
    return unique[:limit]


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _text(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_fits(cfg, shape: ModelShape, world_size: int, gpu_bytes: int, *, where: str, **kw) -> MemoryPlan:
    """The plan, or a ValueError naming the overflowing phase and line and settings that would fit."""
    plan = plan_memory(cfg, shape, world_size, gpu_bytes, **kw)
    if plan.fits:
        return plan
    fixes = fitting_settings(cfg, shape, world_size, gpu_bytes, **kw)
    hint = ("; settings that fit: " + " | ".join(" ".join(f) for f in fixes) if fixes else
            "; no nearby layout fits: use more GPUs or a smaller model")
    raise ValueError(f"{where}: this layout does not fit in memory ({plan.layout}): {verdict(plan)}{hint}. "
                     "`mssr plan CONFIG` shows the whole plan")
