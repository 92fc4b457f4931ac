"""PNG figures of one or several runs' metrics.jsonl, for a person to read (`mssr plot RUN_DIR ...`).

One figure per metric group, each run overlaid in its own colour (the same colour in every figure):
    accuracy.png          training reward / accuracy and validation accuracy
    entropy.png           policy entropy
    response_length.png   response lengths
    advantage_clip.png    advantage mean / std, PPO clip fractions
    kl_rho.png            KL loss and old/ref KL, the tracker's forgetting factor rho and coverage
    logprob_mismatch.png  rollout-engine vs trainer log-prob mismatch (mismatch/*)
    eval.png              benchmark accuracy of the eval suite (eval/<NAME>/accuracy, eval/average)
    step_time.png         seconds per step, stacked by phase (time/*), one panel per run
A figure (and a panel) is left out when no run has its metrics. With smoothing, the raw curve is drawn faint under a
centred moving average. Runs that share a label (several seeds) are drawn as their mean with a shaded min-max band.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass

import numpy as np

from mssr_megatron.metrics import METRICS_FILE, read_metrics


@dataclass(frozen=True)
class _Panel:
    keys: tuple[str, ...] = ()
    """Exact keys, each its own panel when present; with first_of=True only the first present key gets a panel."""
    pattern: str | None = None
    """Regular expression: one panel per matching key (sorted)."""
    first_of: bool = False
    exclude: str | None = None


@dataclass(frozen=True)
class _Figure:
    name: str
    title: str
    panels: tuple[_Panel, ...]


FIGURES = (
    _Figure("accuracy", "Reward and validation accuracy", (
        _Panel(keys=("reward/mean", "reward/accuracy", "reward/score_mean"), first_of=True),
        _Panel(keys=("val/accuracy",)),
        _Panel(pattern=r"^val/.+/accuracy$"),
    )),
    _Figure("entropy", "Policy entropy", (_Panel(keys=("actor/entropy",)),)),
    _Figure("response_length", "Response length", (
        _Panel(pattern=r"length", exclude=r"^time/"),
    )),
    _Figure("advantage_clip", "Advantages and PPO clipping", (
        _Panel(keys=("adv/mean", "adv/std", "actor/pg_clipfrac", "actor/pg_clipfrac_dual")),
    )),
    _Figure("kl_rho", "KL to the reference and the baseline tracker", (
        _Panel(keys=("actor/kl_loss", "kl/old_ref_k3", "tracker/rho", "tracker/coverage")),
    )),
    _Figure("logprob_mismatch", "Rollout engine vs trainer log-probs", (
        _Panel(pattern=r"^mismatch/", exclude=r"num_tokens$"),
    )),
)
EVAL_FIGURE = _Figure("eval", "Benchmark accuracy (eval suite, every trainer.eval_every steps)", (
    _Panel(keys=("eval/average",)),
    _Panel(pattern=r"^eval/.+/accuracy$"),
))
FIGURES = (*FIGURES, EVAL_FIGURE)
STEP_TIME = "step_time"
_TIME_PREFIX = "time/"


@dataclass
class _Run:
    path: str
    label: str
    series: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (steps, values); non-finite values as NaN


def _load_run(run_dir: str, label: str) -> _Run:
    by_step: dict[int, dict] = {}
    for record in read_metrics(run_dir):
        step = record.get("step")
        if not isinstance(step, (int, float)):
            continue
        merged = by_step.setdefault(int(step), {})  # several lines of one step (train, then validation) merge
        for key, value in record.items():
            if key in ("step", "time", "nonfinite"):
                continue
            if value is None:
                merged[key] = math.nan
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                merged[key] = float(value)
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            series.setdefault(key, []).append((step, value))
    return _Run(run_dir, label, {k: (np.array([s for s, _ in v], dtype=float), np.array([x for _, x in v], dtype=float))
                                 for k, v in series.items()})


def _default_label(run_dir: str) -> str:
    """The config's algorithm.estimator if <run_dir>/config.yaml names one, else the run directory's name."""
    name = os.path.basename(os.path.normpath(run_dir)) or run_dir
    config = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(config):
        try:
            import yaml

            with open(config, encoding="utf-8") as f:
                estimator = (yaml.safe_load(f) or {}).get("algorithm", {}).get("estimator")
            if isinstance(estimator, str) and estimator:
                return estimator
        except Exception:  # noqa: BLE001 - a label is not worth failing the plot for
            pass
    return name


def _auto_labels(run_dirs: list[str]) -> list[str]:
    """Default labels; runs whose default labels collide are told apart by their directory names."""
    labels = [_default_label(d) for d in run_dirs]
    names = [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    return [f"{label} ({name})" if labels.count(label) > 1 and name != label else label
            for label, name in zip(labels, names)]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over `window` points, ignoring NaNs (NaN where the whole window is NaN)."""
    if window <= 1 or len(values) < 2:
        return values
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    kernel = np.ones(window)
    total = np.convolve(filled, kernel, mode="same")
    count = np.convolve(finite.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _aggregate(curves: list[tuple[np.ndarray, np.ndarray]]):
    """Union of steps; per step mean, min, max over the runs that have a finite value there."""
    steps = np.unique(np.concatenate([s for s, _ in curves]))
    grid = np.full((len(curves), len(steps)), np.nan)
    for i, (s, v) in enumerate(curves):
        grid[i, np.searchsorted(steps, s)] = v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN is the right answer
        return steps, np.nanmean(grid, axis=0), np.nanmin(grid, axis=0), np.nanmax(grid, axis=0)


def _panel_keys(figure: _Figure, present: set[str]) -> list[str]:
    keys: list[str] = []
    for panel in figure.panels:
        if panel.pattern is not None:
            found = sorted(k for k in present if re.search(panel.pattern, k)
                           and not (panel.exclude and re.search(panel.exclude, k)))
        elif panel.first_of:
            found = next(([k] for k in panel.keys if k in present), [])
        else:
            found = [k for k in panel.keys if k in present]
        keys.extend(k for k in found if k not in keys)
    return keys


def _has_data(run: _Run, key: str) -> bool:
    return key in run.series and bool(np.isfinite(run.series[key][1]).any())


def _groups(runs: list[_Run]) -> dict[str, list[_Run]]:
    groups: dict[str, list[_Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def _colors(labels: list[str]) -> dict[str, str]:
    cycle = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
             "tab:olive", "tab:cyan"]
    return {label: cycle[i % len(cycle)] for i, label in enumerate(labels)}


def _new_figure(n_panels: int, ncols_max: int = 3, panel_size=(4.6, 3.2)):
    from matplotlib.figure import Figure

    ncols = 2 if n_panels == 4 else min(n_panels, ncols_max)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _legend_label(label: str, n: int) -> str:
    return label if n == 1 else f"{label} (mean, min-max of {n} runs)"


def _draw_curve(ax, group: list[_Run], key: str, color: str, smooth: int) -> None:
    curves = [r.series[key] for r in group if _has_data(r, key)]
    if not curves:
        return
    sparse = key.startswith(("val/", "eval/"))  # a few points (every val_every/eval_every steps): markers, no smoothing
    window = 1 if sparse else smooth
    marker = dict(marker="o", markersize=3) if sparse or len(curves[0][0]) == 1 else {}
    if len(curves) == 1:
        steps, raw = curves[0]
        if window > 1:
            ax.plot(steps, raw, color=color, alpha=0.25, linewidth=0.8)
            ax.plot(steps, _smooth(raw, window), color=color, linewidth=1.6, **marker)
        else:
            ax.plot(steps, raw, color=color, linewidth=1.6, **marker)
        return
    steps, raw_mean, _, _ = _aggregate(curves)
    _, mean, lo, hi = _aggregate([(s, _smooth(v, window)) for s, v in curves])
    ax.fill_between(steps, lo, hi, color=color, alpha=0.18, linewidth=0)
    if window > 1:
        ax.plot(steps, raw_mean, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(steps, mean, color=color, linewidth=1.6, **marker)


def _finish(fig, title: str, handles, labels, path: str) -> str:
    fig.suptitle(title, fontsize=12)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.savefig(path, dpi=110)
    return path


def _legend_handles(groups: dict[str, list[_Run]], colors: dict[str, str], keys: list[str]):
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for label, group in groups.items():
        if any(_has_data(r, k) for r in group for k in keys):
            handles.append(Line2D([], [], color=colors[label], linewidth=2))
            labels.append(_legend_label(label, len(group)))
    return handles, labels


def _plot_group(figure: _Figure, runs: list[_Run], groups, colors, path: str, smooth: int) -> str | None:
    present = {k for r in runs for k in r.series if _has_data(r, k)}
    keys = _panel_keys(figure, present)
    if not keys:
        return None
    fig, axes = _new_figure(len(keys))
    for ax, key in zip(axes, keys):
        for label, group in groups.items():
            _draw_curve(ax, group, key, colors[label], smooth)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylabel(key.split("/", 1)[-1])
        ax.grid(alpha=0.3)
    handles, labels = _legend_handles(groups, colors, keys)
    suffix = f" (moving average over {smooth} steps; raw faint)" if smooth > 1 else ""
    return _finish(fig, figure.title + suffix, handles, labels, path)


def _plot_step_time(groups: dict[str, list[_Run]], out_dir: str) -> str | None:
    """One panel per label: phases stacked (mean over the label's runs), the measured step time as a line."""
    panels = []
    for label, group in groups.items():
        keys = sorted({k for r in group for k in r.series if k.startswith(_TIME_PREFIX) and _has_data(r, k)})
        if keys:
            panels.append((label, group, keys))
    if not panels:
        return None
    phase_keys = sorted({k for _, _, keys in panels for k in keys if k != "time/step"})
    phase_colors = {k: c for k, c in zip(phase_keys, _colors(phase_keys).values())}
    fig, axes = _new_figure(len(panels), ncols_max=2, panel_size=(6.0, 3.4))
    for ax, (label, group, keys) in zip(axes, panels):
        phases = [k for k in keys if k != "time/step"]
        curves = {k: _aggregate([r.series[k] for r in group if _has_data(r, k)]) for k in keys}
        if phases:
            steps = np.unique(np.concatenate([curves[k][0] for k in phases]))
            stack = [np.nan_to_num(np.interp(steps, curves[k][0], curves[k][1], left=np.nan, right=np.nan))
                     for k in phases]
            ax.stackplot(steps, stack, colors=[phase_colors[k] for k in phases], alpha=0.75,
                         labels=[k[len(_TIME_PREFIX):] for k in phases])
        if "time/step" in curves:
            steps, mean, _, _ = curves["time/step"]
            ax.plot(steps, mean, color="black", linewidth=1.2, label="step (total)")
        ax.set_title(label if len(group) == 1 else f"{label} (mean of {len(group)} runs)", fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        bottom, top = ax.get_ylim()
        ax.set_ylim(0, top + 0.35 * (top - min(bottom, 0)))  # headroom: the legend sits above the curves
        ax.legend(fontsize=8, loc="upper left", ncol=3)
    return _finish(fig, "Step time by phase (untimed work = gap below the total)", [], [],
                   os.path.join(out_dir, f"{STEP_TIME}.png"))


def plot_runs(run_dirs: list[str], out_dir: str, labels: list[str] | None = None, smooth: int = 1) -> list[str]:
    """Draw the metric-group figures of the runs in run_dirs into out_dir; returns the PNG paths written.

    labels: one per run (default: the config's algorithm.estimator, else the directory name). Runs sharing a label
    are drawn as one curve: the mean over them with a shaded min-max band. smooth: moving-average window in steps
    (1 = none); the raw curve is then drawn faint underneath. Validation metrics are never smoothed.
    """
    runs = _load_runs(run_dirs, labels)
    groups = _groups(runs)
    colors = _colors(list(groups))
    os.makedirs(out_dir, exist_ok=True)
    paths = [_plot_group(figure, runs, groups, colors, os.path.join(out_dir, f"{figure.name}.png"),
                         max(int(smooth), 1)) for figure in FIGURES]
    paths.append(_plot_step_time(groups, out_dir))
    return [p for p in paths if p is not None]


def _load_runs(run_dirs: list[str], labels: list[str] | None) -> list[_Run]:
    if not run_dirs:
        raise ValueError("no run directories given")
    if labels is None:
        labels = _auto_labels(list(run_dirs))
    elif len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    for d in run_dirs:
        if not os.path.isfile(os.path.join(d, METRICS_FILE)) and not os.path.isfile(d):
            raise FileNotFoundError(f"{d!r} has no {METRICS_FILE}")
    return [_load_run(d, label) for d, label in zip(run_dirs, labels)]


def plot_figure(figure: _Figure, run_dirs: list[str], out_path: str, labels: list[str] | None = None) -> str | None:
    """Draw one of FIGURES for the runs into out_path (labels as in plot_runs); None when no run has its metrics."""
    runs = _load_runs(run_dirs, labels)
    groups = _groups(runs)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    return _plot_group(figure, runs, groups, _colors(list(groups)), out_path, 1)


def add_plot_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `mssr plot` (for wiring as a subcommand)."""
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None,
                        help="output folder for the PNGs (default: RUN_DIR/plots for one run, ./plots for several)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one label per run; runs sharing a label (seeds) are drawn as mean and min-max band "
                             "(default: config.yaml's algorithm.estimator, else the directory name)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N",
                        help="moving-average window in steps, raw curve drawn faint (default 1 = no smoothing)")
    return parser


def run_plot(args: argparse.Namespace) -> int:
    out = args.out or (os.path.join(args.run_dirs[0], "plots") if len(args.run_dirs) == 1 else "plots")
    try:
        paths = plot_runs(args.run_dirs, out, labels=args.labels, smooth=args.smooth)
    except (FileNotFoundError, ValueError) as e:
        print(f"mssr plot: error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print("mssr plot: no plottable metrics in the given runs", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def main_plot(argv: list[str] | None = None) -> int:
    """`mssr plot RUN_DIR [RUN_DIR ...] [--out DIR] [--labels L ...] [--smooth N]`; returns the exit code."""
    parser = add_plot_arguments(argparse.ArgumentParser(prog="mssr plot", description="plot runs' metrics as PNGs"))
    return run_plot(parser.parse_args(argv))
