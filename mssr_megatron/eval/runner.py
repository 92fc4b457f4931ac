"""Generation and grading of a benchmark suite through a rollout engine, with a resumable per-sample cache.

    results = run_eval(engine, sets, PromptFormat.from_config(cfg.data), processor, cfg.eval, out_dir)

Prompts are built as in training (data/prompts.py `build_request` on `EvalSample.as_record()`: the same template and
image bounds), so a score measures the policy on the prompts it was trained with. Questions go to the engine in
batches of eval.batch_size (k samples each: n=k; greedy when eval.temperature is 0); each finished batch is graded
and appended to <out_dir>/samples.jsonl (types.SampleResult fields, flushed and fsynced), so a killed evaluation loses
at most the batch in flight. On start the finished (benchmark, sample_id, k_index) lines are read back and not
generated again; a torn last line (a kill mid-write) is cut off and its sample generated again.

What produced the cache is stored in <out_dir>/eval_meta.json (model, step, benchmarks and their files, prompt format,
sampling and judge settings); a folder holding another evaluation is refused in one line, never mixed in.

Seeds (eval.temperature > 0): the batch whose first question has position p in the suite gets seed + p * k, so
engines that seed request i's samples with seed + i * n (SGLang, vLLM) give every question the same samples whatever
the batching or an interruption; the HF engine seeds each call once (its samples depend on the batch boundaries).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Callable, Sequence

from mssr_megatron.eval.config import EvalConfig
from mssr_megatron.eval.types import (
    SAMPLES_FILE,
    BenchmarkSet,
    EvalSample,
    Grade,
    SampleResult,
)
from mssr_megatron.eval.report import write_results
from mssr_megatron.metrics import atomic_write_text
from mssr_megatron.rollout.protocol import Rollout, SamplingParams

log = logging.getLogger("mssr")

META_FILE = "eval_meta.json"
GradeFn = Callable[..., list]
"""grade(samples, responses, judge, cache_dir) -> list[Grade] (grading.grade_responses' signature)."""


# ------------------------------------------------------------------------------------------- what produced a cache
def eval_meta(model: str | None, sets: Sequence[BenchmarkSet], prompt_format, cfg: EvalConfig,
              step: int | None) -> dict:
    """What a cached sample depends on: the model (and step), each benchmark's layout and file, the prompt format
    (a hash of its template, and the image bounds) and the generation and judge settings. eval.limit and
    eval.batch_size are not in it: they change which questions are asked and how, not an answer."""
    judge = cfg.judge
    return {
        "model": model, "step": step,
        "benchmarks": {s.name: {"reader": s.reader, "path": os.path.abspath(s.path)} for s in sets},
        "prompt": {"template_sha256": hashlib.sha256(prompt_format.template.encode()).hexdigest()[:16],
                   "jinja": prompt_format.jinja, "min_pixels": prompt_format.min_pixels,
                   "max_pixels": prompt_format.max_pixels},
        "k": cfg.k, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed, "judge": {"url": judge.url, "model": judge.model if judge.url else None},
    }


def check_cache_meta(out_dir: str, meta: dict) -> None:
    """Write <out_dir>/eval_meta.json, or check that the one there describes the same evaluation (a benchmark that
    is new to the suite is allowed: it has no cached samples). Raises ValueError in one line naming what differs."""
    path = os.path.join(out_dir, META_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            stored = json.load(fh)
        stored_benchmarks = stored.get("benchmarks", {})
        changed = [f"{key}: {stored.get(key)!r} -> {meta[key]!r}" for key in meta
                   if key != "benchmarks" and stored.get(key) != meta[key]]
        changed += [f"benchmark {name}: {stored_benchmarks[name]} -> {entry}"
                    for name, entry in meta["benchmarks"].items()
                    if name in stored_benchmarks and stored_benchmarks[name] != entry]
        if changed:
            raise ValueError(f"{out_dir} holds the samples of another evaluation ({'; '.join(changed)}): give a new "
                             f"--out folder, or delete {out_dir} to start this one over")
        meta = {**meta, "benchmarks": {**stored_benchmarks, **meta["benchmarks"]}}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(path, json.dumps(meta, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------- sample cache
def read_cache(path: str) -> dict[tuple[str, str, int], SampleResult]:
    """The finished samples in samples.jsonl by (benchmark, sample_id, k_index). A last line that is cut short (no
    newline, or not JSON: a kill mid-write) is removed from the file, so that appending starts on a clean line; a
    bad line before it raises ValueError naming it."""
    done: dict[tuple[str, str, int], SampleResult] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as fh:
        pieces = fh.read().split(b"\n")
    # every piece but the last had its newline; the last is b"" after a whole file, else a line cut short
    lines = [piece + b"\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    kept = 0  # bytes of the whole, parsed lines before the current one
    for number, line in enumerate(lines, 1):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("no end of line")
            result = SampleResult(**json.loads(line))
        except (ValueError, TypeError) as exc:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is not a sample result ({exc}): delete the folder to start "
                                 "the evaluation over") from None
            log.warning("%s: the last line is cut short (%s): its sample is generated again", path, exc)
            with open(path, "r+b") as fh:
                fh.truncate(kept)
            break
        done[result.benchmark, result.sample_id, result.k_index] = result
        kept += len(line)
    return done


def append_results(path: str, results: list[SampleResult]) -> None:
    """Append one JSON line per result, flushed and fsynced (the batch is on disk before the next one starts)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n" for r in results))
        fh.flush()
        os.fsync(fh.fileno())


# ------------------------------------------------------------------------------------------------------ the run
def _default_grade() -> GradeFn:
    from mssr_megatron.eval.grading import grade_responses  # written beside this module; imported when used

    return grade_responses


def _sampling(cfg: EvalConfig, seed: int) -> SamplingParams:
    greedy = cfg.temperature == 0
    return SamplingParams(temperature=cfg.temperature, top_p=1.0 if greedy else cfg.top_p, top_k=-1,
                          max_new_tokens=cfg.max_new_tokens, n=cfg.k, seed=None if greedy else seed)


def _grade_batch(samples: list[EvalSample], rollouts: list[Rollout], cfg: EvalConfig, out_dir: str,
                 grade: GradeFn) -> list[Grade]:
    """One Grade per rollout; an engine error is not sent to the grader: it is wrong, with the engine's error."""
    ok = [i for i, r in enumerate(rollouts) if r.finish_reason != "error"]
    graded = grade([samples[i] for i in ok], [rollouts[i].text for i in ok], cfg.judge, out_dir) if ok else []
    if len(graded) != len(ok):
        raise RuntimeError(f"the grader returned {len(graded)} grades for {len(ok)} responses")
    grades = [Grade(extracted=None, correct=False, method="rule", error=f"engine: {r.error}") for r in rollouts]
    for i, g in zip(ok, graded):
        grades[i] = g
    return grades


def run_eval(engine, sets: Sequence[BenchmarkSet], prompt_format, processor, cfg: EvalConfig, out_dir: str, *,
             step: int | None = None, model: str | None = None, progress: bool = True,
             grade: GradeFn | None = None) -> dict:
    """Answer every question of `sets` (cfg.k samples each) that <out_dir>/samples.jsonl does not hold yet, grade
    each batch (`grade`, default grading.grade_responses) and append it there; then write results.json atomically
    and return it (the RESULTS dict: per-benchmark accuracy = avg@k, counts, skipped rows, grading methods,
    engine errors, and the unweighted average). `prompt_format`: data.prompts.PromptFormat; `processor`: the
    model's (chat template, image bounds); `model`: a label of the policy, stored with the cache."""
    from mssr_megatron.data.prompts import build_request

    grade = grade or _default_grade()
    check_cache_meta(out_dir, eval_meta(model, sets, prompt_format, cfg, step))
    samples_path = os.path.join(out_dir, SAMPLES_FILE)
    done = read_cache(samples_path)
    questions = [sample for s in sets for sample in s.samples]
    position = {id(sample): p for p, sample in enumerate(questions)}
    todo = [q for q in questions if any((q.benchmark, q.sample_id, k) not in done for k in range(cfg.k))]
    if len(todo) < len(questions):
        log.info("%s: %d of %d questions cached, %d to generate", out_dir, len(questions) - len(todo),
                 len(questions), len(todo))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="eval", unit="question",
                   dynamic_ncols=True)
    try:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            requests = [build_request(q.as_record(), prompt_format, processor, request_id=str(i))
                        for i, q in enumerate(batch)]
            rollouts = engine.generate(requests, _sampling(cfg, cfg.seed + position[id(batch[0])] * cfg.k))
            if len(rollouts) != len(batch) * cfg.k:
                raise RuntimeError(f"the engine returned {len(rollouts)} rollouts for {len(batch)} requests x k="
                                   f"{cfg.k}")
            samples = [batch[int(r.request_id)] for r in rollouts]
            grades = _grade_batch(samples, rollouts, cfg, out_dir, grade)
            new = [SampleResult(benchmark=q.benchmark, sample_id=q.sample_id, k_index=r.sample_index,
                                answer=q.answer, response=r.text, finish_reason=r.finish_reason,
                                extracted=g.extracted, correct=g.correct, method=g.method,
                                judge_reply=g.judge_reply, error=g.error, prompt=requests[int(r.request_id)].prompt)
                   for q, r, g in zip(samples, rollouts, grades)
                   if (q.benchmark, q.sample_id, r.sample_index) not in done]
            append_results(samples_path, new)
            done.update({(r.benchmark, r.sample_id, r.k_index): r for r in new})
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    results = summarize(sets, done, cfg, model=model, step=step)
    write_results(out_dir, results)  # results.json + results.md
    return results


def summarize(sets: Sequence[BenchmarkSet], done: dict[tuple[str, str, int], SampleResult], cfg: EvalConfig, *,
              model: str | None = None, step: int | None = None) -> dict:
    """The RESULTS dict of the questions in `sets` from their finished samples: per benchmark, correct = the sum over
    questions of (correct samples / k), accuracy = correct / total (avg@k; pass@1 for k=1); 'errors' counts engine
    errors (graded wrong, not in graded_by). A benchmark without questions has accuracy None and no part in the
    average (the unweighted mean of the others)."""
    benchmarks = {}
    for s in sets:
        correct, graded_by, errors = 0.0, {"rule": 0, "judge": 0, "rule_fallback": 0}, 0
        for q in s.samples:
            for k in range(cfg.k):
                r = done[q.benchmark, q.sample_id, k]
                correct += r.correct / cfg.k
                if r.finish_reason == "error":
                    errors += 1
                else:
                    graded_by[r.method] += 1
        total = len(s.samples)
        benchmarks[s.name] = {"reader": s.reader, "accuracy": correct / total if total else None, "correct": correct,
                              "total": total,
                              "skipped": dict(s.skipped), "graded_by": graded_by, "errors": errors}
    scored = [b["accuracy"] for b in benchmarks.values() if b["accuracy"] is not None]
    return {"model": model, "step": step, "suite": cfg.suite, "k": cfg.k, "temperature": cfg.temperature,
            "max_new_tokens": cfg.max_new_tokens, "benchmarks": benchmarks,
            "average": sum(scored) / len(scored) if scored else None}


# -------------------------------------------------------------------------------------------------- `mssr eval`
def evaluate_model(model: str, suite: str, out_dir: str, overrides: Sequence[str] = ()) -> dict:
    """What `mssr eval --model MODEL --suite SUITE --out OUT_DIR key=value...` runs; returns the RESULTS dict (also
    in OUT_DIR/results.json). MODEL: an HF directory, a training run directory or a checkpoint of one
    (eval/model_source.py; a checkpoint is exported to OUT_DIR/model_hf first). The run's config (none for a plain
    HF directory: the defaults) supplies data.* (prompt template, image bounds) and rollout.* (engine), and
    `overrides` change any dotted key of it (eval.*, data.*, rollout.*). The engine is factory.build_engine's: the HF
    engine (on CUDA when available, else CPU) or, with rollout.engine=sglang/vllm, that engine on the GPU (GPU-only:
    not run, no GPU was available)."""
    import torch

    from mssr_megatron.config import RunConfig
    from mssr_megatron.config_loader import apply_overrides, from_dict
    from mssr_megatron.data.prompts import PromptFormat
    from mssr_megatron.eval.model_source import resolve_model
    from mssr_megatron.eval.suite import read_suite
    from mssr_megatron.models.processor import load_processor
    from mssr_megatron.rollout.factory import build_engine

    source = resolve_model(model)
    settings = ["trainer.eval_every=0"]  # evaluation trains nothing
    if not source.config and not torch.cuda.is_available():  # a plain HF directory on the CPU: no bfloat16 default
        settings.append("model.params_dtype=float32")
    settings += [*overrides, f"eval.suite={suite}"]  # --suite is the suite, whatever the run's config named
    cfg = from_dict(RunConfig, apply_overrides(RunConfig, dict(source.config), settings)).validate()
    sets = read_suite(suite, limit=cfg.eval.limit)
    prompt_format = PromptFormat.from_config(cfg.data)
    # before any export or engine start: a folder of another evaluation is refused at once
    check_cache_meta(out_dir, eval_meta(source.label, sets, prompt_format, cfg.eval, source.step))
    hf_dir = source.export(out_dir)
    processor = load_processor(hf_dir)
    prompt_format.check_processor(processor)
    if cfg.rollout.engine == "hf":
        engine = build_engine(cfg, hf_dir, max_batch_size=cfg.rollout.hf_batch_size, dtype=cfg.model.params_dtype,
                              device="cuda" if torch.cuda.is_available() else "cpu")
    else:  # GPU-only: not run (no GPU was available)
        engine = build_engine(cfg, hf_dir)
    try:
        return run_eval(engine, sets, prompt_format, processor, cfg.eval, out_dir, step=source.step,
                        model=source.label)
    finally:
        engine.shutdown()
