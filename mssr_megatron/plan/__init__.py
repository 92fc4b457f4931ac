"""Per-rank memory plan of a run (`mssr plan`), and the checks `mssr launch` and `mssr train` make with it.

    mssr plan CONFIG [--gpu-memory-gb 80] [--world-size 8] [--json PATH] [key=value ...]
    mssr plan CONFIG --step-time [--nodes 1 --gpus-per-node 8 --gen-tokens-per-gpu ...] [--json PATH]

shapes.py reads the model's sizes from its config.json; memory.py turns a RunConfig into the plan's lines;
report.py formats it, searches settings that fit and raises the refusal; measure.py checks it against CPU peaks;
step_time.py models the time of one RL step per rollout-engine placement (docs/step_time.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mssr_megatron.plan.memory import GB, MemoryPlan, plan_memory
from mssr_megatron.plan.report import check_fits, fitting_settings, format_plan
from mssr_megatron.plan.shapes import ModelShape, resolve_config_json
from mssr_megatron.plan.step_time import add_step_time_arguments, format_step_time, inputs_from_args, step_time

__all__ = ["GB", "MemoryPlan", "ModelShape", "plan_memory", "check_fits", "format_plan", "add_plan_arguments",
           "run_plan", "check_launch", "check_training_start"]

SKIP_ENV = "MSSR_SKIP_MEMORY_PLAN"
"""Set to 1 to start `mssr train` even when the plan says the layout does not fit (the plan is an estimate)."""


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config, e.g. examples/configs/qwen2_5_vl_7b_mssr.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.micro_batch_size=2")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GB, 10^9 bytes (default 80, an H100 80GB)")
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 8)),
                        help="training ranks (GPUs) in all (default: $WORLD_SIZE, else 8: one node)")
    parser.add_argument("--model-config", default=None, help="config.json (or its directory) of the model; default: "
                        "model.hf_path's, else the shipped published shape its name matches")
    parser.add_argument("--image-tokens", type=int, default=None,
                        help="image tokens per rollout (default: half of data.max_prompt_tokens)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON here")
    add_step_time_arguments(parser)


def run_plan(args: argparse.Namespace) -> int:
    """`mssr plan`: print the table (and settings that fit when it does not); exit status 0 either way."""
    from mssr_megatron.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.step_time:
        return _run_step_time(args, cfg)
    cfg.validate(world_size=args.world_size)
    source = resolve_config_json(cfg.model.hf_path, args.model_config)
    shape = ModelShape.from_config_json(source)
    gpu_bytes = int(args.gpu_memory_gb * GB)
    plan = plan_memory(cfg, shape, args.world_size, gpu_bytes, image_tokens=args.image_tokens)
    print(format_plan(plan, f"memory plan of {args.config} (model shape: {source})"))
    fixes = [] if plan.fits else fitting_settings(cfg, shape, args.world_size, gpu_bytes, image_tokens=args.image_tokens)
    for settings in fixes:
        print("settings that fit: " + " ".join(settings))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**plan.to_dict(), "config": args.config, "model_config": source,
                       "settings_that_fit": fixes}, f, indent=1)
    return 0


def _run_step_time(args: argparse.Namespace, cfg) -> int:
    """`mssr plan --step-time`: the step-time table of `cfg` on --nodes x --gpus-per-node GPUs (+ JSON)."""
    world_size = args.nodes * args.gpus_per_node
    cfg.validate(world_size=world_size)
    source = resolve_config_json(cfg.model.hf_path, args.model_config)
    with open(source) as f:
        config = json.load(f)
    model = step_time(cfg, config, inputs_from_args(args))
    shown = os.path.relpath(source) if not os.path.relpath(source).startswith("..") else source
    print(format_step_time(model, f"step-time model of {args.config} (model shape: {shown}), seconds per RL step"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**model.to_dict(), "config": args.config, "model_config": source}, f, indent=1)
    return 0


def check_launch(cfg, world_size: int, gpu_memory_gb: float) -> None:
    """`mssr launch`: refuse (ValueError) a layout whose plan does not fit `gpu_memory_gb`; a model whose shape
    cannot be found is reported on stderr and not checked."""
    try:
        shape = ModelShape.from_config_json(resolve_config_json(cfg.model.hf_path))
    except FileNotFoundError as exc:
        print(f"mssr launch: memory plan skipped: {exc}", file=sys.stderr)
        return
    check_fits(cfg, shape, world_size, int(gpu_memory_gb * GB), where="mssr launch")


def check_training_start(cfg, hf_config, world_size: int, device) -> None:
    """`mssr train` on CUDA: refuse (ValueError) a layout whose plan does not fit this GPU, before any model is
    built; nothing on the CPU. GPU-only: not run (no GPU was available)."""
    if device.type != "cuda" or os.environ.get(SKIP_ENV) == "1":
        return
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    check_fits(cfg, ModelShape.from_dict(hf_config.to_dict()), world_size, total,
               where=f"mssr train (set {SKIP_ENV}=1 to start anyway)")
