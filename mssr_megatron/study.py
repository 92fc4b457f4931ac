"""The efficiency study: estimators at an equal rollout budget, several seeds, steps to a target accuracy.

    mssr bench --study [--configs A.yaml B.yaml ...] [--seeds 0 1 2] [--steps 100] [--val-every 10]
                       [--reference grpo] [--study-out runs/study] [--docs docs/efficiency_study.md]

Each (config, seed) pair is one ordinary `mssr train` run in its own process (trainer, data-order and rollout seeds all
set to the seed), written to <out>/<label>/seed_<s>. A config's label is its logging.run_name, else its estimator, so
two variants of one estimator (MSSR with full or sampled shaping entropy) are two rows. Finished runs (a summary.json)
are reused, so an interrupted study continues where it stopped. The report then reads every run's metrics.jsonl:

- target accuracy: the reference estimator's final validation accuracy: its seed-mean validation curve averaged over
  the last --final-window validation points (3: one point is too noisy);
- also fixed accuracies (--thresholds), which still compare when the reference barely moves;
- steps to a target: the first validation step after the start at which an estimator's seed-mean validation curve
  reaches it (and how many seeds' own curves do); the ratio is an estimator's steps over the reference's;
- final validation accuracy (mean, min, max over seeds) and the policy entropy at the start and the end.

It writes <out>/study.json, the figures (validation accuracy and entropy, mean with a min-max band over seeds) and a
Markdown report with the exact command, and prints the table. Whatever the outcome, the numbers are the measured ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

from mssr_megatron.metrics import SUMMARY_FILE, atomic_write_text, json_safe, read_metrics

DEFAULT_CONFIGS = ("examples/configs/tiny_cpu.yaml", "examples/configs/tiny_cpu_mvsr.yaml",
                   "examples/configs/tiny_cpu_grpo.yaml")
VAL_KEY = "val/accuracy"
ENTROPY_KEY = "actor/entropy"


def run_label(config: str) -> str:
    """The study's name for a config's runs: its logging.run_name, else its estimator."""
    from mssr_megatron.config import load_config

    cfg = load_config(config, [])
    return cfg.logging.run_name or cfg.algorithm.estimator


def _labels(configs: list[str]) -> list[str]:
    labels = [run_label(config) for config in configs]
    for label in set(labels):
        if labels.count(label) > 1:
            same = [c for c, name in zip(configs, labels) if name == label]
            raise ValueError(f"the study's configs {same} share the label {label!r}: give each a distinct "
                             "logging.run_name")
    return labels


def run_dir(out: str, label: str, seed: int) -> str:
    return os.path.join(out, label, f"seed_{seed}")


def train_command(config: str, seed: int, directory: str, steps: int, val_every: int) -> list[str]:
    """The `mssr train` command of one study run (checkpoints and HF export off: the study only reads metrics)."""
    return [sys.executable, "-m", "mssr_megatron.cli", "train", config,
            f"trainer.seed={seed}", f"rollout.seed={seed}", f"data.seed={seed}",
            f"trainer.total_steps={steps}", f"trainer.val_every={val_every}", f"trainer.output_dir={directory}",
            "checkpoint.save_every=0", "checkpoint.export_hf_at_end=false", "logging.progress_bar=false",
            "logging.tensorboard=false"]


def run_all(configs: list[str], seeds: list[int], out: str, steps: int, val_every: int) -> dict[str, list[str]]:
    """Train every (config, seed) not finished yet; returns {label: [run dirs]} in config order."""
    labels = _labels(configs)
    runs: dict[str, list[str]] = {name: [run_dir(out, name, seed) for seed in seeds] for name in labels}
    for seed in seeds:  # seed by seed: an interrupted study still has every run label at the seeds it finished
        for config, label in zip(configs, labels):
            directory = run_dir(out, label, seed)
            if os.path.isfile(os.path.join(directory, SUMMARY_FILE)):
                print(f"[study] {label} seed {seed}: done already ({directory})", flush=True)
                continue
            cmd = train_command(config, seed, directory, steps, val_every)
            print(f"[study] {label} seed {seed}: {shlex.join(cmd[1:])}", flush=True)
            start = time.time()
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "train.log"), "w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
            if rc != 0:
                raise RuntimeError(f"study run {directory} failed (exit {rc}); see {directory}/train.log")
            print(f"[study] {label} seed {seed}: {time.time() - start:.0f} s", flush=True)
    return runs


def _series(run: str, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in read_metrics(run)
            if key in r and r[key] is not None and np.isfinite(r[key])}


def steps_to_target(curve: dict[int, float], target: float) -> int | None:
    """First step after the start (step > 0: the initial policy has learned nothing) whose value is >= target."""
    return next((s for s in sorted(curve) if s > 0 and curve[s] >= target - 1e-12), None)


def _mean_curve(runs: list[str], key: str) -> dict[int, float]:
    """Mean over runs at the steps every run has."""
    series = [_series(r, key) for r in runs]
    common = set.intersection(*(set(s) for s in series)) if series else set()
    return {step: float(np.mean([s[step] for s in series])) for step in sorted(common)}


def _edge_mean(run: str, key: str, last: bool, span: int = 10) -> float:
    values = [v for _, v in sorted(_series(run, key).items())]
    part = values[-span:] if last else values[:span]
    return float(np.mean(part)) if part else float("nan")


def _target_row(curve: dict[int, float], dirs: list[str], target: float, ref_steps: int | None) -> dict:
    steps = steps_to_target(curve, target)
    per_seed = [steps_to_target(_series(d, VAL_KEY), target) for d in dirs]
    return {"target": target, "steps_mean_curve": steps,
            "ratio_vs_reference": steps / ref_steps if steps is not None and ref_steps else None,
            "steps_per_seed": per_seed, "seeds_reaching": sum(x is not None for x in per_seed)}


def summarise(runs: dict[str, list[str]], reference: str, final_window: int = 3,
              thresholds: tuple[float, ...] = ()) -> dict:
    """The study's numbers from the runs' metrics (see the module docstring).

    Targets: the reference's final accuracy (the mean of the last `final_window` points of its seed-mean validation
    curve: one point is too noisy) and each fixed accuracy in `thresholds`. For each estimator and target: the first
    validation step > 0 at which its seed-mean curve reaches the target, the ratio to the reference's step, and the
    same per seed."""
    if reference not in runs:
        raise ValueError(f"reference estimator {reference!r} is not among the study's runs {sorted(runs)}")
    mean_val = {name: _mean_curve(dirs, VAL_KEY) for name, dirs in runs.items()}
    ref_curve = mean_val[reference]
    final = float(np.mean([ref_curve[s] for s in sorted(ref_curve)[-final_window:]]))
    targets = {f"{reference} final ({final:.3f})": final, **{f"{t:.2f}": float(t) for t in thresholds}}
    ref_steps = {label: steps_to_target(ref_curve, t) for label, t in targets.items()}
    rows = {}
    for name, dirs in runs.items():
        curve = mean_val[name]
        finals = [_series(d, VAL_KEY)[max(_series(d, VAL_KEY))] for d in dirs]
        rows[name] = {
            "seeds": len(dirs),
            "initial_val_accuracy": curve[min(curve)],
            "final_val_accuracy_mean": float(np.mean(finals)),
            "final_val_accuracy_min": float(np.min(finals)),
            "final_val_accuracy_max": float(np.max(finals)),
            "best_val_accuracy_of_mean_curve": max(curve.values()),
            "targets": {label: _target_row(curve, dirs, t, ref_steps[label]) for label, t in targets.items()},
            "entropy_first10_mean": float(np.mean([_edge_mean(d, ENTROPY_KEY, last=False) for d in dirs])),
            "entropy_last10_mean": float(np.mean([_edge_mean(d, ENTROPY_KEY, last=True) for d in dirs])),
            "val_curve_mean": {str(k): v for k, v in curve.items()},
        }
    return {"reference": reference, "target_val_accuracy": final, "target_final_window": final_window,
            "targets": targets, "rows": rows}


def _fmt(x, spec: str = ".3f") -> str:
    return "not reached" if x is None else format(x, spec)


def _target_cell(t: dict) -> str:
    if t["steps_mean_curve"] is None:
        return f"not reached ({t['seeds_reaching']}/{len(t['steps_per_seed'])} seeds)"
    ratio = "" if t["ratio_vs_reference"] is None else f", x{t['ratio_vs_reference']:.2f}"
    return f"{t['steps_mean_curve']}{ratio} ({t['seeds_reaching']}/{len(t['steps_per_seed'])} seeds)"


def format_table(summary: dict) -> str:
    labels = list(summary["targets"])
    head = ("| run | seeds | val acc start | final val acc: mean [min, max] | "
            + " | ".join(f"steps to {label}" for label in labels) + " | entropy first 10 -> last 10 steps |")
    lines = [head, "|" + "---|" * (5 + len(labels))]
    for name, r in summary["rows"].items():
        lines.append(
            f"| {name} | {r['seeds']} | {r['initial_val_accuracy']:.3f} | {r['final_val_accuracy_mean']:.3f} "
            f"[{r['final_val_accuracy_min']:.3f}, {r['final_val_accuracy_max']:.3f}] | "
            + " | ".join(_target_cell(r["targets"][label]) for label in labels)
            + f" | {r['entropy_first10_mean']:.3f} -> {r['entropy_last10_mean']:.3f} |")
    return "\n".join(lines)


def plot_study(runs: dict[str, list[str]], fig_dir: str) -> list[str]:
    """Validation accuracy and entropy figures: per estimator the mean over seeds with a min-max band."""
    import shutil
    import tempfile

    from mssr_megatron.plots import plot_runs

    dirs = [d for group in runs.values() for d in group]
    labels = [name for name, group in runs.items() for _ in group]
    os.makedirs(fig_dir, exist_ok=True)
    kept = []
    with tempfile.TemporaryDirectory() as tmp:  # plot_runs draws every metric group; the study shows two
        for path in plot_runs(dirs, tmp, labels=labels):
            if os.path.basename(path) in ("accuracy.png", "entropy.png"):
                kept.append(shutil.move(path, os.path.join(fig_dir, os.path.basename(path))))
    return kept


def add_study_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                        help="configs to compare, all at the same rollouts per step; each one row, named by its "
                             "logging.run_name or else its estimator (default: tiny CPU MSSR, MVSR, GRPO)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--steps", type=int, default=100, help="RL steps per run (default 100)")
    parser.add_argument("--val-every", type=int, default=10, help="validation every N steps (default 10)")
    parser.add_argument("--reference", default="grpo", help="run (label) whose final accuracy is the target")
    parser.add_argument("--thresholds", nargs="*", type=float, default=[0.5, 0.55, 0.6],
                        help="fixed validation accuracies to report steps to (default 0.5 0.55 0.6)")
    parser.add_argument("--final-window", type=int, default=3,
                        help="validation points averaged for the reference's final accuracy (default 3)")
    parser.add_argument("--study-out", default="runs/study", help="folder of the runs, study.json and figures")
    parser.add_argument("--docs", default=None, help="also write the Markdown report here (e.g. "
                                                     "docs/efficiency_study.md; figures go next to it)")
    return parser


def setup_table(configs: list[str], steps: int, val_every: int) -> str:
    """The settings that make the comparison fair (equal rollouts per step), read from the configs themselves."""
    from mssr_megatron.config import load_config

    lines = ["| run | estimator | config | prompts x rollouts per step | lr | mini-batch | temperature (val) | steps "
             "| val every | val prompts |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config in configs:
        c = load_config(config, [])
        with open(c.data.val_path, encoding="utf-8") as f:
            n_val = sum(1 for line in f if line.strip())
        lines.append(f"| {run_label(config)} | {c.algorithm.estimator} | `{config}` "
                     f"| {c.data.prompts_per_step} x {c.rollout.n} | {c.optimizer.lr:g} "
                     f"| {c.optimizer.mini_batch_size} | {c.rollout.temperature:g} ({c.rollout.val_temperature:g}) "
                     f"| {steps} | {val_every} | {n_val} |")
    return "\n".join(lines)


def outcome(summary: dict) -> str:
    """Measured sentences: each estimator's final accuracy and steps to each target against the reference's."""
    ref = summary["reference"]
    rows = summary["rows"]
    out = []
    for name, r in rows.items():
        reached = [f"{label} at step {t['steps_mean_curve']}" for label, t in r["targets"].items()
                   if t["steps_mean_curve"] is not None]
        out.append(f"- {name}: validation accuracy {r['initial_val_accuracy']:.3f} -> {r['final_val_accuracy_mean']:.3f} "
                   f"(mean of {r['seeds']} seeds); seed-mean curve reached "
                   + (", ".join(reached) if reached else "none of the targets") + ".")
    ref_row = rows[ref]
    if ref_row["final_val_accuracy_mean"] <= ref_row["initial_val_accuracy"] + 0.02:
        out.append(f"- {ref} ended within 2 points of where it started, so a target set by its final accuracy is "
                   "at or below the initial accuracy and says little; the fixed thresholds carry the comparison.")
    return "\n".join(out)


def write_report(summary: dict, figures: list[str], command: str, path: str, setup: str) -> None:
    rel = [os.path.relpath(f, os.path.dirname(os.path.abspath(path))) for f in figures]
    text = [f"# Efficiency study: {', '.join(summary['rows'])} at equal rollouts per step", "",
            f"Made by `{command}` (generated file; the runs are in the study folder, the numbers in its study.json).",
            "", "## Setup", "", setup, "",
            "## Result", "",
            f"Targets: the final validation accuracy of {summary['reference']} (its seed-mean validation curve "
            f"averaged over the last {summary['target_final_window']} validation points) and fixed accuracies. "
            "Steps to a target: the first validation step after the start at which the seed-mean validation accuracy "
            f"reaches it; xR = those steps over {summary['reference']}'s; (k/n seeds) = seeds whose own curve reached "
            "it.", "",
            format_table(summary), "", outcome(summary), ""]
    text += [f"![{os.path.splitext(os.path.basename(r))[0]}]({r})" for r in rel]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")


def run_study(args: argparse.Namespace, command: str) -> int:
    runs = run_all(args.configs, args.seeds, args.study_out, args.steps, args.val_every)
    summary = summarise(runs, args.reference, args.final_window, tuple(args.thresholds))
    summary["command"] = command
    atomic_write_text(os.path.join(args.study_out, "study.json"), json.dumps(json_safe(summary), indent=2) + "\n")
    fig_dir = os.path.join(os.path.dirname(args.docs) or ".", "figures", "efficiency_study") if args.docs \
        else os.path.join(args.study_out, "figures")
    figures = plot_study(runs, fig_dir)
    print(format_table(summary))
    print(f"study: {os.path.join(args.study_out, 'study.json')}; figures: {', '.join(figures)}")
    if args.docs:
        write_report(summary, figures, command, args.docs, setup_table(args.configs, args.steps, args.val_every))
        print(f"report: {args.docs}")
    return 0
