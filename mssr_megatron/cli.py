"""The `mssr` command.

    mssr demo  [--steps N] [--estimators mssr,grpo,...] [--out DIR] [key=value ...]   algorithms end to end on a toy task
    mssr config [CONFIG] [key=value ...] [--fields]                                   print the resolved, validated config
"""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    from mssr_megatron.algorithms import ESTIMATORS
    from mssr_megatron.config import load_config
    from mssr_megatron.toy_task import ToyTaskConfig, format_table, run_toy_task

    algo_cfg = load_config(None, [f"algorithm.{o}" for o in args.overrides]).algorithm
    estimators = args.estimators.split(",") if args.estimators else ESTIMATORS.names()
    for name in estimators:
        ESTIMATORS.get(name)
    cfg = ToyTaskConfig(steps=args.steps, seed=args.seed)
    print(f"Toy single-rollout RL: {cfg.prompts} prompts, {cfg.rollouts_per_step} rollouts/step for every estimator "
          f"(group estimators: {cfg.rollouts_per_step // cfg.group_size} prompts x {cfg.group_size}), "
          f"{cfg.steps} steps, seed {cfg.seed}")
    curves = run_toy_task(estimators, cfg, algo_cfg, args.out)
    print(format_table(curves))
    print(f"curves: {args.out}/toy_task.json, plot: {args.out}/toy_task.png")
    return 0


def _config(args: argparse.Namespace) -> int:
    from mssr_megatron.config import dump_yaml, help_text, load_config

    if args.fields:
        print(help_text())
        return 0
    if args.config and "=" in args.config and not os.path.exists(args.config):  # only overrides were given
        args.overrides, args.config = [args.config, *args.overrides], None
    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mssr", description="MSSR single-rollout RL for Qwen2.5-VL on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run every advantage estimator on a toy task (CPU, about a minute)")
    demo.add_argument("--steps", type=int, default=60, help="RL steps per estimator (default 60)")
    demo.add_argument("--seed", type=int, default=0, help="seed of task, policy and sampling (default 0)")
    demo.add_argument("--estimators", default=None, help="comma-separated estimator names (default: all registered)")
    demo.add_argument("--out", default="runs/demo", help="output directory for JSON curves and the plot")
    demo.add_argument("overrides", nargs="*", help="algorithm settings, e.g. shaping_alpha=0.2 baseline.rho_rule=spo")
    demo.set_defaults(func=_demo)

    config = sub.add_parser("config", help="print the resolved and validated config as YAML")
    config.add_argument("config", nargs="?", default=None, help="YAML config file (default: built-in defaults)")
    config.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=2e-6")
    config.add_argument("--fields", action="store_true", help="list every config key with its type and docstring")
    config.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mssr_megatron.config import ConfigError

    try:
        return args.func(args)
    except (ConfigError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"mssr {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
