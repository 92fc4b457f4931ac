"""Step-time model of one RL step on a cluster, per rollout-engine placement (`mssr plan CONFIG --step-time`).

    inputs = StepTimeInputs(nodes=2, gpus_per_node=8, gen_tokens_per_gpu=3000.0)   # None = the stated default
    model = step_time(cfg, config_json_dict, inputs)     # model.modes["per_node"].seconds, model.inputs, ...
    print(format_step_time(model, title))

A model with stated inputs, not a simulator. The phases run one after the other (synchronous RL: the trainer waits
for the rollouts, the engines wait for the update and the weight sync); each takes
  generation       ceil(rollouts / engines) x mean response tokens / (engine TP x output tokens/s per GPU): the
                   busiest engine's share at the engine's throughput (measured as generated tokens / wall time, so
                   prefill is inside it)
  generation tail  (rollout.max_new_tokens - mean response tokens) / one sequence's decode rate: the extra time of
                   the longest response, which decodes alone once its engine's queue has drained. An explicit,
                   rough term, not a bound: every engine has one response that runs to the cap and is among the
                   last to start. The same for every placement: more engines shrink the bulk, never the tail
  log-prob passes  passes x forward FLOPs of the step's sequences / (training GPUs x achieved FLOP/s per GPU):
                   the old policy, the reference when a KL term needs it, the SPO rule's two post-update passes
  update           ppo_epochs x training FLOPs (forward + backward) / (training GPUs x achieved FLOP/s per GPU)
  weight sync      the engine's bf16 weights / GB/s: CUDA IPC on the same GPU when colocated, NCCL otherwise;
                   every engine receives its copy at the same time, so one copy's time for any engine count
FLOPs come from bench/flops.py (the convention `mssr bench` reports MFU in, so its measured MFU plugs in here).
Not modelled: reward grading (CPU workers), data loading and image preprocessing, validation, checkpoints.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

from mssr_megatron.bench.flops import forward_flops, training_flops
from mssr_megatron.plan.memory import GB
from mssr_megatron.plan.shapes import ModelShape

TABLE_MODES = ("single", "per_dp_group", "per_node")  # placement.ENGINE_MODES, the baseline (single) first
PHASES = ("generation", "generation_tail", "logprobs", "update", "weight_sync")
ENGINE_BYTES_PER_PARAM = 2  # SGLang/vLLM serve bf16 weights

DEFAULTS = {
    "gen_tokens_per_gpu": (2500.0, "default, an assumption for a bf16 7B model on one H100 at a KV cache of a few "
                                   "GB; not measured (no GPU run yet): measure with `mssr bench` on the node"),
    "tail_tokens_per_s": (100.0, "default, an assumption: ~10 ms per decode step of one 7B sequence on an H100"),
    "train_mfu": (0.30, "default, an assumption; not measured (no GPU run yet): `mssr bench` on the node prints it"),
    "sync_gbps_ipc": (50.0, "default, an assumption for the exporter's gather + CUDA IPC copy on the node"),
    "sync_gbps_nccl": (20.0, "default, an assumption for one NCCL broadcast stream over InfiniBand/RoCE"),
}
"""Defaults of the rates (value, where it comes from). Every one is an assumption until measured on the cluster."""


def engine_count(mode: str, nodes: int, gpus_per_node: int, engine_tp_size: int, tp: int, pp: int) -> int:
    """Rollout engines that `rollout.engines=mode` runs on a cluster whose every GPU holds a trainer rank (colocated
    engines): the placement module's own count (`rollout.placement.engine_slots`). A ConfigError (a ValueError)
    names what cannot be placed."""
    from mssr_megatron.rollout.placement import engine_slots

    return len(engine_slots(mode, world_size=nodes * gpus_per_node, ranks_per_node=gpus_per_node,
                            gpus_per_node=gpus_per_node, tp=tp, pp=pp, engine_tp_size=engine_tp_size, colocate=True))


@dataclass
class StepTimeInputs:
    """What the model is given beyond the run config; None = the default stated in DEFAULTS or in `_workload`."""

    nodes: int = 1
    """Nodes of the cluster."""
    gpus_per_node: int = 8
    """GPUs per node; the trainer runs on all nodes x gpus_per_node of them."""
    gen_tokens_per_gpu: float | None = None
    """Engine throughput: output (response) tokens/s per GPU at the engine's batch, prefill included."""
    tail_tokens_per_s: float | None = None
    """Decode rate of one sequence alone (tokens/s), for the generation tail; 0 leaves the tail out."""
    train_mfu: float | None = None
    """Model FLOPs utilisation of the log-prob passes and the update (bench/flops.py's FLOPs)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s per GPU for the MFU; None = the H100 SXM datasheet at the config's precision."""
    train_tokens_per_gpu: float | None = None
    """Training (forward + backward) tokens/s per GPU; replaces train_mfu x peak_tflops when given."""
    sync_gbps_ipc: float | None = None
    """Weight-sync GB/s (10^9 bytes) into a colocated engine (CUDA IPC on the node)."""
    sync_gbps_nccl: float | None = None
    """Weight-sync GB/s into an engine on other GPUs (NCCL broadcast, across nodes)."""
    mean_prompt_tokens: int | None = None
    """Mean prompt length in tokens, image tokens included; None = half of data.max_prompt_tokens."""
    mean_image_tokens: int | None = None
    """Mean image tokens per prompt; None = half of the mean prompt."""
    mean_response_tokens: int | None = None
    """Mean response length in tokens; None = a quarter of rollout.max_new_tokens."""


@dataclass
class ModeTime:
    """Seconds per phase of one step with one engine placement."""

    mode: str
    engines: int
    engine_tp: int
    rollouts_per_engine: int
    seconds: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def share(self, phase: str) -> float:
        return self.seconds[phase] / self.total


@dataclass
class StepTimeModel:
    """The model's result: its inputs as (name, value, source) rows and the time per placement."""

    inputs: list[tuple[str, str, str]]
    modes: dict[str, ModeTime]
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"inputs": [{"name": n, "value": v, "source": s} for n, v, s in self.inputs],
                "modes": {m: {**asdict(t), "total": t.total} for m, t in self.modes.items()},
                "unavailable": self.unavailable}


def _flops_view(config: dict) -> SimpleNamespace:
    """The attribute view of a config.json dict that bench/flops.py reads (vision `in_chans` -> `in_channels`)."""
    text = config.get("text_config") or config
    vision = dict(config["vision_config"])
    vision.setdefault("in_channels", vision.get("in_chans", 3))
    return SimpleNamespace(text_config=SimpleNamespace(**text), vision_config=SimpleNamespace(**vision))


def image_grid(image_tokens: int, merge: int) -> tuple[int, int, int]:
    """A one-frame patch grid (1, h, w) with image_tokens merged tokens, as square as the factors allow."""
    rows = max(d for d in range(1, math.isqrt(image_tokens) + 1) if image_tokens % d == 0)
    return 1, rows * merge, image_tokens // rows * merge


def _value(inputs: StepTimeInputs, name: str, flag: str) -> tuple[float, str]:
    given = getattr(inputs, name)
    return (given, flag) if given is not None else DEFAULTS[name]


def _training_rate(cfg, inputs: StepTimeInputs, train_flops_per_token: float) -> tuple[float, tuple[str, str, str]]:
    """Achieved FLOP/s per GPU of the log-prob passes and the update, and its input row: the given training
    tokens/s x FLOPs per token, else MFU x peak (default: the H100 SXM datasheet at the config's precision)."""
    from mssr_megatron.bench.device import datasheet_peak, precision_of

    if inputs.train_tokens_per_gpu is not None:
        rate = inputs.train_tokens_per_gpu * train_flops_per_token
        return rate, ("training rate", f"{inputs.train_tokens_per_gpu:g} tokens/s per GPU = {rate / 1e12:.1f} "
                                       "TFLOP/s per GPU", "--train-tokens-per-gpu")
    if inputs.peak_tflops is not None:
        peak, peak_source = inputs.peak_tflops * 1e12, "--peak-tflops"
    else:
        precision = precision_of(cfg.model.params_dtype, cfg.model.fp8)
        peak, peak_source = datasheet_peak("H100 SXM", precision) or (None, None)
        if peak is None:
            raise ValueError(f"step time: no H100 datasheet peak for precision {precision}: pass --peak-tflops")
    mfu, mfu_source = _value(inputs, "train_mfu", "--train-mfu")
    return mfu * peak, ("training rate", f"MFU {mfu:g} x {peak / 1e12:g} TFLOP/s = {mfu * peak / 1e12:.1f} TFLOP/s "
                                         "per GPU", f"MFU: {mfu_source}; peak: {peak_source}")


def step_time(cfg, config: dict, inputs: StepTimeInputs) -> StepTimeModel:
    """The model of one step of `cfg` (a validated RunConfig) for the model of config.json dict `config`."""
    r, a, p = cfg.rollout, cfg.algorithm, cfg.parallel
    gpus = inputs.nodes * inputs.gpus_per_node
    dp = gpus // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    rollouts = cfg.data.prompts_per_step * r.n
    prompt = inputs.mean_prompt_tokens if inputs.mean_prompt_tokens is not None else cfg.data.max_prompt_tokens // 2
    images = inputs.mean_image_tokens if inputs.mean_image_tokens is not None else prompt // 2
    response = inputs.mean_response_tokens if inputs.mean_response_tokens is not None else r.max_new_tokens // 4
    if not 0 <= images <= prompt or not 0 < response <= r.max_new_tokens:
        raise ValueError(f"step time: need 0 <= image tokens ({images}) <= prompt tokens ({prompt}) and 0 < response "
                         f"tokens ({response}) <= rollout.max_new_tokens ({r.max_new_tokens})")
    seq = prompt + response

    view = _flops_view(config)
    merge = view.vision_config.spatial_merge_size
    forward = forward_flops(view, [seq], [image_grid(images, merge)] if images else [])
    train = training_flops(forward, cfg.model.train_vision)["total"]
    passes = ["old policy"]
    if a.use_kl_loss or a.kl_in_reward or a.baseline.rho_rule == "kl_window":  # as run_context builds the reference
        passes.append("reference")
    if a.baseline.rho_rule == "spo":
        from mssr_megatron.algorithms import ESTIMATORS

        if ESTIMATORS.get(a.estimator).uses_tracker:  # the rule scores, after the update, this step's responses
            passes += ["SPO post-update", "SPO previous responses"]  # and each prompt's kept one (forgetting.SPORho)

    flop_rate, rate_row = _training_rate(cfg, inputs, train / seq)
    gen_rate, gen_source = _value(inputs, "gen_tokens_per_gpu", "--gen-tokens-per-gpu")
    tail_rate, tail_source = _value(inputs, "tail_tokens_per_s", "--tail-tokens-per-s")
    sync_name = "sync_gbps_ipc" if r.colocate else "sync_gbps_nccl"
    sync_gbps, sync_source = _value(inputs, sync_name, "--" + sync_name.replace("_", "-"))
    weight_bytes = ModelShape.from_dict(config).total_params() * ENGINE_BYTES_PER_PARAM
    for flag, value in (("--gen-tokens-per-gpu", gen_rate), ("--train-mfu/--peak-tflops/--train-tokens-per-gpu",
                        flop_rate), (f"--{sync_name.replace('_', '-')}", sync_gbps), ("--nodes", inputs.nodes),
                        ("--gpus-per-node", inputs.gpus_per_node)):
        if value <= 0:
            raise ValueError(f"step time: {flag} must be positive (got a rate or count of {value:g})")
    if tail_rate < 0:
        raise ValueError(f"step time: --tail-tokens-per-s must be >= 0 (0 leaves the tail out), got {tail_rate:g}")

    shared = {"generation_tail": (r.max_new_tokens - response) / tail_rate if tail_rate else 0.0,
              "logprobs": len(passes) * rollouts * forward["total"] / (gpus * flop_rate),
              "update": cfg.optimizer.ppo_epochs * rollouts * train / (gpus * flop_rate),
              "weight_sync": weight_bytes / (sync_gbps * GB)}
    modes, unavailable = {}, {}
    for mode in TABLE_MODES:
        try:
            engines = engine_count(mode, inputs.nodes, inputs.gpus_per_node, r.engine_tp_size,
                                   p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
        except ValueError as exc:
            unavailable[mode] = str(exc)
            continue
        per_engine = -(-rollouts // engines)
        bulk = per_engine * response / (r.engine_tp_size * gen_rate)
        modes[mode] = ModeTime(mode, engines, r.engine_tp_size, per_engine, {"generation": bulk, **shared})

    image_note = f", {images} of them image tokens (grid {image_grid(images, merge)})" if images else ""
    rows = [
        ("cluster", f"{inputs.nodes} node(s) x {inputs.gpus_per_node} GPUs = {gpus} training ranks, "
                    f"TP{p.tensor_model_parallel_size} PP{p.pipeline_model_parallel_size} DP{dp}",
         "--nodes, --gpus-per-node"),
        ("rollouts per step", f"{rollouts} = {cfg.data.prompts_per_step} prompts x {r.n}",
         "config: data.prompts_per_step x rollout.n"),
        ("mean prompt", f"{prompt} tokens{image_note}",
         "--mean-prompt-tokens" if inputs.mean_prompt_tokens is not None
         else "default, an assumption: half of data.max_prompt_tokens"),
        ("mean response", f"{response} tokens", "--mean-response-tokens" if inputs.mean_response_tokens is not None
         else "default, an assumption: a quarter of rollout.max_new_tokens"),
        ("longest response", f"{r.max_new_tokens} tokens", "config: rollout.max_new_tokens"),
        ("generation rate", f"{gen_rate:g} output tokens/s per GPU, engine TP {r.engine_tp_size}", gen_source),
        ("tail decode rate", f"{tail_rate:g} tokens/s of one sequence", tail_source),
        rate_row,
        ("FLOPs per rollout", f"forward {forward['total'] / 1e12:.2f} TFLOP ({forward['vision'] / 1e12:.2f} vision), "
                              f"training {train / 1e12:.2f} TFLOP", f"bench/flops.py at {seq} tokens"),
        ("log-prob passes", f"{len(passes)} forward: {', '.join(passes)}",
         "config: algorithm (KL loss/in reward, rho rule)"),
        ("update", f"{cfg.optimizer.ppo_epochs} epoch(s) of forward + backward", "config: optimizer.ppo_epochs"),
        ("weight sync", f"{weight_bytes / GB:.1f} GB bf16 at {sync_gbps:g} GB/s "
                        f"({'CUDA IPC, colocated' if r.colocate else 'NCCL, separate GPUs'})", sync_source),
    ]
    return StepTimeModel(rows, modes, unavailable)


_LABELS = {"generation": "generation", "generation_tail": "generation tail", "logprobs": "log-prob passes",
           "update": "update (fwd+bwd)", "weight_sync": "weight sync"}


def format_step_time(model: StepTimeModel, title: str) -> str:
    """The side-by-side table (seconds and share of the step per placement), then every input and its source."""
    modes = list(model.modes.values())
    width, col = 24, 18
    single = model.modes.get("single")

    def row(label: str, cells: list[str]) -> str:
        return f"{label:{width}}" + "".join(f"{c:>{col}}" for c in cells)

    lines = [title, row("rollout.engines", [m.mode for m in modes]),
             row("engines x engine TP", [f"{m.engines} x {m.engine_tp}" for m in modes]),
             row("rollouts per engine", [str(m.rollouts_per_engine) for m in modes])]
    for phase in PHASES:
        lines.append(row(_LABELS[phase], [f"{m.seconds[phase]:.1f} s {100 * m.share(phase):3.0f}%" for m in modes]))
    lines.append(row("total per step", [f"{m.total:.1f} s" for m in modes]))
    if single is not None:
        def generating(m: ModeTime) -> float:
            return m.seconds["generation"] + m.seconds["generation_tail"]

        lines.append(row("generation speed-up", [f"{generating(single) / generating(m):.2f}x" for m in modes]))
        lines.append(row("step speed-up", [f"{single.total / m.total:.2f}x" for m in modes]))
    lines += [f"{mode}: not possible: {why}" for mode, why in model.unavailable.items()]
    lines.append("inputs:")
    name_width = max(len(n) for n, _, _ in model.inputs) + 2
    lines += [f"  {n:{name_width}}{v}  [{s}]" for n, v, s in model.inputs]
    return "\n".join(lines)


def add_step_time_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("step time (--step-time; docs/step_time.md)")
    group.add_argument("--step-time", action="store_true", help="print the step-time model of one RL step for "
                       "single / per_dp_group / per_node engines instead of the memory plan")
    group.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    group.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    for name, doc in (("gen_tokens_per_gpu", "engine output tokens/s per GPU"),
                      ("tail_tokens_per_s", "decode tokens/s of one sequence alone (0: no tail term)"),
                      ("train_mfu", "MFU of log-prob passes and update"),
                      ("sync_gbps_ipc", "weight-sync GB/s into colocated engines"),
                      ("sync_gbps_nccl", "weight-sync GB/s into engines on other GPUs")):
        group.add_argument("--" + name.replace("_", "-"), type=float, default=None,
                           help=f"{doc} (default {DEFAULTS[name][0]:g}, an assumption)")
    group.add_argument("--peak-tflops", type=float, default=None,
                       help="peak dense TFLOP/s per GPU (default: H100 SXM datasheet at the config's precision)")
    group.add_argument("--train-tokens-per-gpu", type=float, default=None,
                       help="training tokens/s per GPU (replaces --train-mfu x --peak-tflops)")
    group.add_argument("--mean-prompt-tokens", type=int, default=None,
                       help="mean prompt tokens, images included (default half of data.max_prompt_tokens)")
    group.add_argument("--mean-image-tokens", type=int, default=None, help="mean image tokens per prompt "
                       "(default half of the mean prompt)")
    group.add_argument("--mean-response-tokens", type=int, default=None,
                       help="mean response tokens (default a quarter of rollout.max_new_tokens)")


def inputs_from_args(args: argparse.Namespace) -> StepTimeInputs:
    return StepTimeInputs(**{name: getattr(args, name) for name in StepTimeInputs.__dataclass_fields__})
