"""The `mssr` command.

    mssr demo  [--steps N] [--estimators mssr,grpo,...] [--out DIR] [key=value ...]   algorithms end to end on a toy task
    mssr config [CONFIG] [key=value ...] [--fields]                                   print the resolved, validated config
    mssr convert --to {megatron,hf} --input DIR --output DIR [--tp N] [--pp N] [--dtype D] [--overwrite]
                                                          checkpoints HF <-> Megatron (= tools/convert_checkpoint.py)
    mssr make-tiny [--out runs/tiny]                      the embedded default: tiny Qwen2.5-VL + synthetic data
    mssr train CONFIG [key=value ...]                     RL training (torchrun/srun for several processes)
    mssr plot RUN_DIR [RUN_DIR ...] [--out DIR]           PNG curves, several runs overlaid
    mssr eval --model HF_DIR --suite SUITE.yaml [--out DIR] [key=value ...]
                                                          benchmark accuracy (table beside the paper's Table 1)
    mssr eval --compare A B [C ...]                       evaluations (eval folders or runs) side by side
    mssr bench CONFIG [key=value ...] [--out F.json]      throughput: tokens/s per phase, MFU, memory (+ HF ratio)
    mssr bench --study [--seeds ...] [--docs F.md]        efficiency study: estimators at equal rollouts, seeds
    mssr launch [--nodes N --gpus-per-node G --time T --partition P --dry-run] CONFIG [key=value ...]
                                                          SLURM batch script (examples/slurm) written and submitted
    mssr plan CONFIG [--gpu-memory-gb 80] [--world-size 8] [--json F] [key=value ...]
                                                          per-rank memory plan; settings that fit when it does not
    mssr plan CONFIG --step-time [--nodes N --gpus-per-node G --gen-tokens-per-gpu R ...]
                                                          time of one RL step per engine placement (single/per_node)
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


def _make_tiny(args: argparse.Namespace) -> int:
    from mssr_megatron.warmstart import TinySetup, make_tiny

    _setup_logging()
    manifest = make_tiny(TinySetup(out_dir=args.out, seed=args.seed))
    history = [h for h in manifest["warm_start"] if "val_greedy_accuracy" in h]
    print(f"tiny model: {manifest['model_dir']} (warm start stopped at greedy validation accuracy "
          f"{history[-1]['val_greedy_accuracy']:.3f}; always-the-most-common-answer floor "
          f"{manifest['val_floor_accuracy']:.3f})")
    print(f"data: {manifest['train_path']}, {manifest['val_path']}")
    print(f"benchmark suite: {manifest['eval_suite']} "
          f"(mssr eval --model {manifest['model_dir']} --suite {manifest['eval_suite']})")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    _setup_logging()
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if "preempted_at_step" in summary:  # the batch script requeues the job; no plots or summary now
        if rank0:
            print(_stopped_line(summary))
        return 0
    if rank0:
        from mssr_megatron.plots import plot_runs

        figures = plot_runs([cfg.trainer.output_dir], os.path.join(cfg.trainer.output_dir, "plots"))
        print(f"run: {cfg.trainer.output_dir}  (metrics.jsonl, summary.json, config.yaml)")
        print(f"validation accuracy: {summary.get('initial_val_accuracy')} at the start -> "
              f"{summary.get('final_val_accuracy')} at the end (best {summary.get('best_val_accuracy')})")
        print(f"plots: {os.path.join(cfg.trainer.output_dir, 'plots')} ({len(figures)} figures)")
        print(f"checkpoints: {cfg.checkpoint_dir}" + (f"; Hugging Face export: {summary['hf_export']}"
                                                         if summary.get("hf_export") else ""))
    return 0


def _stopped_line(summary: dict) -> str:
    """What a run stopped by a signal left: a checkpoint saved now, one saved before, or nothing (step 0)."""
    step, path = summary["preempted_at_step"], summary["checkpoint_saved"]
    if path:
        left = f"checkpoint saved: {path}; continue with checkpoint.resume=auto"
    elif step:
        left = "its checkpoint was saved before; continue with checkpoint.resume=auto"
    else:
        left = "nothing trained yet, no checkpoint; checkpoint.resume=auto starts the run over"
    return f"stopped by {summary['signal']} at step {step}: {left}"


def _plot(args: argparse.Namespace) -> int:
    from mssr_megatron.plots import main_plot

    return main_plot(args.plot_args)


def _eval(args: argparse.Namespace) -> int:
    from mssr_megatron.eval.report import run_eval_command

    _setup_logging()
    return run_eval_command(args)


def _bench(args: argparse.Namespace) -> int:
    if args.study:
        from mssr_megatron.study import run_study

        return run_study(args, "mssr " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "mssr bench")
    from mssr_megatron.bench.throughput import run_benchmark

    _setup_logging()
    return run_benchmark(args)


def _launch(args: argparse.Namespace) -> int:
    from mssr_megatron.launch import run_launch

    return run_launch(args)


def _plan(args: argparse.Namespace) -> int:
    from mssr_megatron.plan import run_plan

    return run_plan(args)


def _setup_logging() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")  # megatron's CPU fallback notices
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s [rank {rank}] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mssr").setLevel(logging.INFO if rank == "0" else logging.WARNING)


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

    tiny = sub.add_parser("make-tiny", help="build the embedded default: tiny Qwen2.5-VL, synthetic data, warm start")
    tiny.add_argument("--out", default="runs/tiny", help="output directory (default runs/tiny; reused when present)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of data, weights and warm start (default 0)")
    tiny.set_defaults(func=_make_tiny)

    train = sub.add_parser("train", help="RL training (MSSR or a baseline) on Megatron-Core")
    train.add_argument("config", help="YAML config, e.g. examples/configs/tiny_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. algorithm.estimator=grpo")
    train.set_defaults(func=_train)

    plot = sub.add_parser("plot", help="draw PNG curves of one or more runs (run `mssr plot -- --help` for options)",
                          add_help=False)
    plot.add_argument("plot_args", nargs=argparse.REMAINDER, help="run directories and plot options")
    plot.set_defaults(func=_plot)

    from mssr_megatron.eval.report import add_eval_arguments

    evaluate = sub.add_parser("eval", help="benchmark accuracy of a model on a suite of local benchmark files, or "
                                           "--compare evaluations")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_eval)

    bench = sub.add_parser("bench", help="throughput benchmark of a config, or (--study) the efficiency study")
    bench.add_argument("--study", action="store_true", help="run the estimator efficiency study instead")
    from mssr_megatron.bench.throughput import add_bench_arguments
    from mssr_megatron.study import add_study_arguments

    add_bench_arguments(bench)
    add_study_arguments(bench.add_argument_group("study (--study)"))
    bench.set_defaults(func=_bench)

    from mssr_megatron.launch import add_launch_arguments

    launch = sub.add_parser("launch", help="write a SLURM batch script for a config (examples/slurm) and submit it; "
                                           "options go before CONFIG")
    add_launch_arguments(launch)
    launch.set_defaults(func=_launch)

    from mssr_megatron.plan import add_plan_arguments

    plan = sub.add_parser("plan", help="per-rank GPU memory plan of a config (weights, optimizer, activations, "
                                       "engine) and settings that fit")
    add_plan_arguments(plan)
    plan.set_defaults(func=_plan)

    from mssr_megatron.checkpoint.convert_cli import add_convert_arguments

    add_convert_arguments(sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron "
                                                         "(any TP/PP)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    # building the parser imports megatron (the planner's arguments), whose CPU fallback notices would come before
    # every command's output, errors included
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    args = build_parser().parse_args(argv)
    from mssr_megatron.config import ConfigError
    from mssr_megatron.train.checkpoint_files import CheckpointError
    from mssr_megatron.train import RunStopped

    try:
        return args.func(args)
    except (ConfigError, CheckpointError, KeyError, FileNotFoundError, ValueError) as exc:
        # Bad input (config, paths, data, layouts): one line that names the problem. MSSR_TRACEBACK=1 shows more.
        if os.environ.get("MSSR_TRACEBACK"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"mssr {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RunStopped as exc:  # non-finite values, the mismatch alarm: the reason in one line
        if os.environ.get("MSSR_TRACEBACK"):
            raise
        print(f"mssr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C during training, or Ctrl-C in any other command
        if os.environ.get("MSSR_TRACEBACK"):
            raise
        print(f"mssr {args.command}: interrupted: exited at once, nothing saved (checkpoints already on disk are "
              "intact)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
