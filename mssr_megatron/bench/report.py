"""The printed table and the JSON record of `mssr bench`.

Every row says where its numbers come from: times, bytes and memory are MEASURED in this run; FLOPs are COMPUTED
analytically (bench/flops.py) from the model config and the real token counts; TFLOP/s and MFU combine the two
(analytic FLOPs / measured seconds, over the peak of `peak.label`, which is itself a datasheet or a measured figure).
"""

from __future__ import annotations

import json
import math
import os

from mssr_megatron.bench.device import mfu

SCHEMA = "mssr-bench/1"

#: phase key -> label in the table, in table order.
PHASE_LABELS = {
    "generation": "rollout generation (engine.generate)",
    "logprobs": "log-prob recompute (old-policy fwd)",
    "update": "training update (Megatron)",
    "update_no_crossmodal": "training update without cross-modal KL",
    "update_fixed_microbatches": "training update, fixed micro-batches",
    "hf_update": "training update (plain HF, same data)",
    "weight_sync": "weight sync (actor -> engine)",
}
BREAKDOWN_ORDER = ("rollout", "reward", "logprobs", "update", "weight_sync", "other", "step")


def add_rates(phase: dict, peak_flops_per_s: float) -> dict:
    """tokens/s, TFLOP/s and MFU of a measured phase (median seconds), in place."""
    s = phase["median_s"]
    if "tokens" in phase:
        phase["tokens_per_s"] = phase["tokens"] / s if s > 0 else float("nan")
    if "flops" in phase:
        phase["tflops_per_s"] = phase["flops"] / s / 1e12 if s > 0 else float("nan")
        phase["mfu"] = mfu(phase["flops"], s, peak_flops_per_s)
    return phase


def _num(x, fmt: str = "{:.3g}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return fmt.format(x)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _timing(p: dict) -> str:
    return f"{p['median_s']:.3f} [{p['min_s']:.3f}, {p['max_s']:.3f}]"


def format_table(result: dict) -> str:
    """The human-readable report: per-phase throughput, the step breakdown, the HF ratio, peak and memory."""
    header = (f"{'phase':<40}{'tokens':>9}{'median s [min, max]':>28}{'tokens/s':>13}{'TFLOP/s':>11}{'MFU':>8}"
              f"{'peak mem':>11}  source")
    lines = [header, "-" * len(header)]
    for key, label in PHASE_LABELS.items():
        p = result["phases"].get(key)
        if p is None:
            continue
        if key == "weight_sync":
            tokens, rate = f"{p['bytes'] / 1e6:.3g} MB", f"{p['gb_per_s']:.3g} GB/s"
            source = "measured (bytes, time)"
        else:
            tokens, rate = str(p["tokens"]), _num(p["tokens_per_s"], "{:.1f}")
            source = "measured time; analytic FLOPs"
        mfu_text = _num(100 * p["mfu"], "{:.2g}%") if "mfu" in p else "-"
        lines.append(f"{label:<40}{tokens:>9}{_timing(p):>28}{rate:>13}{_num(p.get('tflops_per_s')):>11}"
                     f"{mfu_text:>8}{_bytes(p.get('peak_memory_bytes')):>11}  {source}")
    b = result.get("step_breakdown")
    if b:
        lines.append(f"RL step breakdown: trainer.train_step, median over {b['steps']} step(s) after "
                     f"{b['warmup']} warm-up (the trainer's own time/* metrics)")
        for name in BREAKDOWN_ORDER:
            p = b["phases"].get(name)
            if p is None:
                continue
            is_step = name == "step"
            tokens = str(b["tokens_median"]) if is_step else ""
            rate = _num(b["tokens_per_s"], "{:.1f}") if is_step else ""
            tf = _num(b["tflops_per_s"]) if is_step else ""
            mfu_text = _num(100 * b["mfu"], "{:.2g}%") if is_step else ""
            share = f"{100 * p['median_s'] / b['phases']['step']['median_s']:.0f}% of step" if not is_step else (
                "measured time; analytic FLOPs")
            label = f"  step: {name}" + (f" ({b['logprob_forwards']} fwd)" if name == "logprobs" else "")
            lines.append(f"{label:<40}{tokens:>9}{_timing(p):>28}{rate:>13}{tf:>11}{mfu_text:>8}"
                         f"{'':>11}  {share}")
    xm = result.get("crossmodal_cost")
    if xm:
        lines.append(f"cross-modal regulariser (coef {xm['coef']:g}): update time {xm['time_ratio']:.2f}x of the same "
                     f"update without it ({xm['time_ratio_paired_median']:.2f}x median of the interleaved pairs)")
    for name, s in result.get("microbatches", {}).items():
        lines.append(f"update micro-batches ({name}): {s['microbatches']} per epoch, padding "
                     f"{100 * s['padding_fraction']:.1f}% of {s['token_slots']} token slots, {s['vision_patches']} "
                     f"vision patches, largest rows x width + patches {s['max_cost']}")
    tb = result.get("token_budget")
    if tb:
        lines.append(f"token-budget / fixed micro-batches update time: {tb['time_ratio']:.2f}x of the medians, "
                     f"{tb['time_ratio_paired_median']:.2f}x median of the interleaved pairs")
    if result.get("vision_balance"):
        from mssr_megatron.bench.vision import vision_line

        lines.append(vision_line(result["vision_balance"]))
    hf = result.get("hf_compare")
    if hf:
        lines.append(f"Megatron / HF update time: {hf['time_ratio']:.2f}x of the medians, "
                     f"{hf['time_ratio_paired_median']:.2f}x median of the interleaved pairs  (tokens/s Megatron "
                     f"{hf['megatron_tokens_per_s']:.1f}, HF {hf['hf_tokens_per_s']:.1f}; {hf['what']})")
    elif result.get("hf_compare_skipped"):
        lines.append(f"plain-HF comparison skipped: {result['hf_compare_skipped']}")
    peak, mem = result["peak"], result["memory"]
    lines.append(f"peak for MFU: {peak['flops_per_s'] / 1e12:.4g} TFLOP/s ({peak['label']}; {peak['source']})")
    lines.append(f"tokens: generation = generated response tokens; other phases = real prompt + response tokens "
                 f"(image placeholder tokens included, padding excluded); FLOPs: {result['flops']['convention']}")
    lines.append(f"memory: peak mem column = {mem['phase_memory_kind']}; process max RSS "
                 f"{_bytes(mem['max_rss_bytes'])} (rank 0; max over ranks {_bytes(mem['max_rss_bytes_all_ranks'])})")
    f = result["flops"]["per_token"]
    vision = (f", vision {f['vision_forward_per_image_token'] / 1e6:.3g} MFLOP per image token "
              f"(image grid {f['image_grid_thw']})" if "vision_forward_per_image_token" in f else "")
    lines.append(f"model forward FLOPs (analytic): language {f['language_forward_per_token'] / 1e6:.3g} MFLOP per "
                 f"token at S={f['seq_len']} ({f['language_weights_per_token'] / 1e6:.3g} from weights, "
                 f"{f['language_attention_per_token'] / 1e6:.3g} attention){vision}; training = 3x forward")
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    """Strict JSON (non-finite floats as null), written atomically."""
    from mssr_megatron.metrics import atomic_write_text, json_safe

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n")
