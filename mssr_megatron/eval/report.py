"""Reports of benchmark evaluations: the results table (with the paper's Table 1 rows beside ours), results.json /
results.md, `mssr eval --compare`, the accuracy-over-steps figure, and the `mssr eval` command.

RESULTS (a dict, results.json; see eval/types.py for the folder it lives in):
    {"model", "step", "suite", "k", "temperature", "max_new_tokens",
     "benchmarks": {NAME: {"accuracy": fraction in [0, 1], "correct", "total", "skipped": {reason: n},
                           "graded_by": {"rule": n, "judge": n, "rule_fallback": n}}},
     "average": unweighted mean of the benchmarks' accuracies}
Tables print accuracies in percent with one decimal, as the paper does.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re

from mssr_megatron.eval.types import RESULTS_FILE, RESULTS_MARKDOWN, SAMPLES_FILE
from mssr_megatron.metrics import METRICS_FILE, atomic_write_text, json_safe, read_metrics

# The paper's Table 1 (Liu et al. 2025, arXiv 2512.18215): accuracy in percent, Qwen2.5-VL base models and the models
# trained with GRPO and MSSR; offline, greedy pass@1, at most 4,096 new tokens, judged by Qwen2.5-72B-Instruct.
# Keys are the reader names of our suite; "avg" is the paper's own average column.
PAPER_COLUMNS = {"mathverse": "MathVerse", "mathvista": "MathVista", "mmk12": "MMK12",
                 "r1_onevision_bench": "R1-OneVision-Bench", "hallusionbench": "HallusionBench"}
_PAPER_ROWS = {  # MathVerse, MathVista, MMK12, R1-OneVision-Bench, HallusionBench, avg
    ("Qwen2.5-VL-3B", "base"): (33.3, 59.5, 42.5, 27.6, 59.9, 44.6),
    ("Qwen2.5-VL-3B", "GRPO"): (36.8, 61.7, 46.1, 30.2, 62.3, 47.4),
    ("Qwen2.5-VL-3B", "MSSR"): (39.6, 63.0, 49.2, 29.0, 66.6, 49.5),
    ("Qwen2.5-VL-7B", "base"): (45.8, 67.2, 48.1, 34.6, 68.4, 52.8),
    ("Qwen2.5-VL-7B", "GRPO"): (48.5, 70.0, 55.8, 37.7, 69.7, 56.3),
    ("Qwen2.5-VL-7B", "MSSR"): (49.8, 71.1, 62.5, 39.2, 70.6, 58.6),
}
PAPER_TABLE1: dict[str, dict[str, dict[str, float]]] = {
    model: {method: dict(zip((*PAPER_COLUMNS, "avg"), values))
            for (row_model, method), values in _PAPER_ROWS.items() if row_model == model}
    for model in dict.fromkeys(model for model, _ in _PAPER_ROWS)}
"""model -> method ('base', 'GRPO', 'MSSR') -> column (a PAPER_COLUMNS key, or 'avg') -> accuracy in percent."""
_DASH = "-"


def _pct(fraction) -> str:
    """A fraction as a percent with one decimal; '-' for a missing or non-finite value."""
    if not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
        return _DASH
    return f"{100 * fraction:.1f}"


def _count(x) -> str:
    """Sample counts: whole numbers as integers (avg@k may give fractional 'correct')."""
    if not isinstance(x, (int, float)):
        return _DASH
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.2f}"


def _paper_column(name: str, entry: dict) -> str | None:
    """Which paper column a benchmark entry is: by its reader when the results name one, else by its name."""
    key = entry.get("reader", name)
    return key if key in PAPER_COLUMNS else None


def _settings_line(results: dict) -> str:
    k, temperature = results.get("k", 1), results.get("temperature", 0.0)
    sampling = ("greedy pass@1" if k == 1 and not temperature else f"avg@{k} at temperature {temperature}")
    parts = [f"model `{results.get('model')}`"]
    if results.get("step") is not None:
        parts.append(f"step {results['step']}")
    parts += [f"suite `{results.get('suite')}`", sampling, f"max {results.get('max_new_tokens')} new tokens"]
    return ", ".join(parts)


def _graded_by(entry: dict) -> str:
    """'rule 90, judge 5, **rule_fallback 5 (judge failed)**, engine errors 1' (zero counts left out)."""
    counts, parts = entry.get("graded_by", {}), []
    for method in ("rule", "judge", "rule_fallback"):
        n = counts.get(method, 0)
        if n:
            parts.append(f"**rule_fallback {_count(n)} (judge failed)**" if method == "rule_fallback"
                         else f"{method} {_count(n)}")
    if entry.get("errors"):  # responses the engine failed to produce: graded wrong, by no method
        parts.append(f"engine errors {_count(entry['errors'])}")
    return ", ".join(parts) or _DASH


def _paper_table(results: dict) -> list[str]:
    """The paper's Table 1 rows under a row of ours, for the paper's benchmarks this evaluation ran."""
    ours: dict[str, float] = {}
    for name, entry in results.get("benchmarks", {}).items():
        column = _paper_column(name, entry)
        if column is not None and column not in ours:
            ours[column] = entry.get("accuracy")
    if not ours:
        return []
    columns = list(PAPER_COLUMNS)
    # our avg is comparable with the paper's only over the same five benchmarks
    ours_avg = (sum(ours[c] for c in columns) / len(columns)
                if all(isinstance(ours.get(c), (int, float)) for c in columns) else None)
    lines = ["", "Beside the paper's Table 1 (Qwen2.5-VL base, GRPO, MSSR; greedy pass@1, judged by "
             "Qwen2.5-72B-Instruct):", "",
             "| model | " + " | ".join(PAPER_COLUMNS[c] for c in columns) + " | avg |",
             "|---|" + "---:|" * (len(columns) + 1),
             "| **ours** | " + " | ".join(_pct(ours.get(c)) for c in columns) + f" | {_pct(ours_avg)} |"]
    for model, rows in PAPER_TABLE1.items():
        for method, row in rows.items():
            lines.append(f"| paper {model} {method} | " + " | ".join(f"{row[c]:.1f}" for c in columns)
                         + f" | {row['avg']:.1f} |")
    if ours_avg is None:
        lines.append("")
        lines.append("Our avg is left out: it is comparable with the paper's only when all five of its benchmarks "
                     "were run.")
    return lines


def format_results(results: dict) -> str:
    """The RESULTS dict as markdown: per-benchmark accuracy (%), counts, skipped rows, how answers were graded
    (answers graded by rule because the judge failed are flagged), then the paper's Table 1 rows beside ours."""
    benchmarks = results.get("benchmarks", {})
    lines = ["## Benchmark accuracy", "", _settings_line(results), "",
             "| benchmark | accuracy (%) | correct / total | skipped | graded by |", "|---|---:|---:|---|---|"]
    fallback = 0.0
    for name, entry in benchmarks.items():
        skipped = ", ".join(f"{reason} {n}" for reason, n in entry.get("skipped", {}).items() if n) or "0"
        fallback += entry.get("graded_by", {}).get("rule_fallback", 0)
        lines.append(f"| {name} | {_pct(entry.get('accuracy'))} | {_count(entry.get('correct'))} / "
                     f"{_count(entry.get('total'))} | {skipped} | {_graded_by(entry)} |")
    lines.append(f"| **average** | **{_pct(results.get('average'))}** | | | |")
    if fallback:
        lines += ["", f"**{_count(fallback)} answers were graded by rule because the judge did not answer** "
                      "(timeouts, HTTP errors or malformed replies: the `error` field of samples.jsonl); "
                      "those accuracies are not judge accuracies."]
    lines += _paper_table(results)
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, results: dict) -> list[str]:
    """Write <out_dir>/results.json and results.md (each atomically); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, RESULTS_FILE), os.path.join(out_dir, RESULTS_MARKDOWN)
    atomic_write_text(json_path, json.dumps(json_safe(results), indent=2) + "\n")
    atomic_write_text(md_path, format_results(results))
    return [json_path, md_path]


# ---- --compare ----------------------------------------------------------------------------------------------------

def _step_of(folder: str) -> int:
    match = re.fullmatch(r"step_(\d+)", os.path.basename(folder))
    return int(match.group(1)) if match else -1


def _results_from_metrics(run_dir: str) -> dict | None:
    """The last step's eval/* metrics of a run as a RESULTS dict (accuracies only), or None when it logged none."""
    latest: dict = {}
    for record in read_metrics(run_dir):
        values = {k: v for k, v in record.items() if k.startswith("eval/")}
        if values and isinstance(record.get("step"), (int, float)):
            if latest.get("step") != record["step"]:
                latest = {"step": int(record["step"])}
            latest.update(values)
    if not latest:
        return None
    benchmarks = {key[len("eval/"):-len("/accuracy")]: {"accuracy": value} for key, value in latest.items()
                  if key.startswith("eval/") and key.endswith("/accuracy")}
    return {"model": None, "step": latest["step"], "suite": None, "benchmarks": benchmarks,
            "average": latest.get("eval/average")}


def load_results(path: str) -> tuple[dict, str]:
    """(RESULTS, where it came from) of an eval folder, a results.json, or a run directory: its newest
    eval/step_<N>/results.json, else the last step's eval/* metrics in metrics.jsonl."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder (give an eval folder with {RESULTS_FILE}, or a run "
                                "directory)")
    candidates = [path] if os.path.isfile(path) else [os.path.join(path, RESULTS_FILE)]
    candidates += sorted(glob.glob(os.path.join(path, "eval", "step_*", RESULTS_FILE)),
                         key=lambda p: _step_of(os.path.dirname(p)), reverse=True)
    for candidate in candidates:
        if os.path.isfile(candidate) and candidate.endswith(".json"):
            with open(candidate, encoding="utf-8") as f:
                return json.load(f), candidate
    if os.path.isfile(os.path.join(path, METRICS_FILE)):
        results = _results_from_metrics(path)
        if results is not None:
            return results, f"{os.path.join(path, METRICS_FILE)} (step {results['step']})"
    raise FileNotFoundError(f"{path}: no {RESULTS_FILE}, no eval/step_<N>/{RESULTS_FILE} and no eval/* metrics in "
                            f"{METRICS_FILE} (run `mssr eval --out {path}`, or train with trainer.eval_every)")


def _labels(paths: list[str], loaded: list[dict]) -> list[str]:
    """Folder names (with the step when known); the full path where names collide."""
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    labels = [f"{n}@{r['step']}" if r.get("step") is not None and not n.startswith("step_") else n
              for n, r in zip(names, loaded)]
    return [label if labels.count(label) == 1 else os.path.normpath(p) for label, p in zip(labels, paths)]


def _diff(a, b) -> str:
    ok = all(isinstance(x, (int, float)) and math.isfinite(x) for x in (a, b))
    return f"{100 * (b - a):+.1f}" if ok else _DASH


def compare(paths: list[str]) -> str:
    """Markdown table of two or more evaluations side by side (accuracy %, and each one's difference in percentage
    points from the first), per benchmark and for the average; a line per column says where its numbers came from."""
    if len(paths) < 2:
        raise ValueError(f"--compare needs two or more evaluations, got {len(paths)}")
    loaded, sources = zip(*(load_results(p) for p in paths))
    labels = _labels(list(paths), list(loaded))
    names: list[str] = []
    for results in loaded:
        names += [n for n in results.get("benchmarks", {}) if n not in names]
    header = labels + [f"{label} - {labels[0]}" for label in labels[1:]]
    lines = ["| benchmark | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    rows = [(n, [r.get("benchmarks", {}).get(n, {}).get("accuracy") for r in loaded]) for n in names]
    rows.append(("**average**", [r.get("average") for r in loaded]))
    for name, values in rows:
        cells = [_pct(v) for v in values] + [_diff(values[0], v) for v in values[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {label}: {source}" for label, source in zip(labels, sources)]
    if len({tuple(r.get("benchmarks", {})) for r in loaded}) > 1:
        lines.append("- the averages are over different benchmark sets ('-': not in that evaluation)")
    return "\n".join(lines) + "\n"


# ---- the figure ---------------------------------------------------------------------------------------------------

def plot_eval_over_steps(run_dirs: list[str], out_path: str, labels: list[str] | None = None) -> str:
    """PNG of each benchmark's accuracy and the average over training steps ("eval/<NAME>/accuracy", "eval/average"
    in each run's metrics.jsonl), runs overlaid as in `mssr plot`; returns out_path."""
    from mssr_megatron.plots import EVAL_FIGURE, plot_figure

    path = plot_figure(EVAL_FIGURE, run_dirs, out_path, labels=labels)
    if path is None:
        raise ValueError(f"no eval/* metrics in {', '.join(run_dirs)} (train with trainer.eval_every and eval.suite)")
    return path


# ---- `mssr eval` --------------------------------------------------------------------------------------------------

def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `mssr eval`."""
    parser.add_argument("--model", default=None, help="Hugging Face model folder, or a run's exported checkpoint")
    parser.add_argument("--suite", default=None, help="suite YAML: benchmark name -> reader and local path")
    parser.add_argument("--out", default=None,
                        help="output folder: samples.jsonl (the resume cache), results.json, results.md "
                             "(default runs/eval/<model folder name>)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="PATH",
                        help="print two or more evaluations side by side: eval folders or run directories")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.limit=50 "
                                                     "eval.judge.url=http://judge:30000/v1 rollout.engine=sglang")
    return parser


def run_eval_command(args: argparse.Namespace) -> int:
    """`mssr eval`: evaluate a model on a suite (write and print the results), or --compare evaluations."""
    if args.compare is not None:
        if args.model or args.suite or args.overrides:
            raise ValueError("--compare takes evaluation paths only (no --model, --suite or overrides)")
        print(compare(args.compare), end="")
        return 0
    for flag, value, what in (("--model", args.model, "a Hugging Face model folder or a run's checkpoint"),
                              ("--suite", args.suite, "a suite YAML")):
        if not value:
            raise ValueError(f"{flag} is required ({what}); or --compare A B to compare evaluations")
        if not os.path.exists(value):
            raise FileNotFoundError(f"{flag} {value}: no such file or folder")
    from mssr_megatron.eval.runner import evaluate_model

    out = args.out or os.path.join("runs", "eval", os.path.basename(os.path.normpath(args.model)))
    results = evaluate_model(args.model, args.suite, out, list(args.overrides))  # writes results.json and .md
    paths = [os.path.join(out, RESULTS_FILE), os.path.join(out, RESULTS_MARKDOWN)]
    print(format_results(results), end="")
    print(f"\nresults: {', '.join(paths)}; samples: {os.path.join(out, SAMPLES_FILE)}")
    return 0
