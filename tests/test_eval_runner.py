"""eval/runner.py: requests built as in training, batching, avg@k, engine errors, the resumable per-sample cache (an
interrupted run, a torn last line, a cache of another evaluation), and the real HF engine on a tiny model."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("transformers")

from mssr_megatron.data.prompts import PromptFormat  # noqa: E402
from mssr_megatron.eval.config import EvalConfig  # noqa: E402
from mssr_megatron.eval.runner import read_cache, run_eval  # noqa: E402
from mssr_megatron.eval.types import SAMPLES_FILE, BenchmarkSet, EvalSample, Grade  # noqa: E402
from mssr_megatron.rollout.protocol import Rollout  # noqa: E402

TEMPLATE = "{problem}\nAnswer in \\boxed{}."


class ScriptedEngine:
    """Answers request i (a question holding a key of `script`) with script[key][sample]; records every call.
    `fail_on_call`: that call (1-based) raises, as a killed evaluation would stop there."""

    def __init__(self, script: dict[str, list[str]], fail_on_call: int | None = None):
        self.script, self.fail_on_call = script, fail_on_call
        self.calls: list[tuple[list, object]] = []

    def generate(self, requests, sampling):
        self.calls.append((requests, sampling))
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("killed")
        out = []
        for request in requests:
            (key,) = [k for k in self.script if f"<{k}>" in request.prompt]
            for k in range(sampling.n):
                text = self.script[key][k]
                if text == "ERROR":
                    out.append(Rollout(request.request_id, k, [1], [], [], "error", "", "image unreadable"))
                else:
                    out.append(Rollout(request.request_id, k, [1], [2, 3], [0.0, 0.0], "stop", text))
        return out

    @property
    def questions_asked(self) -> list[str]:
        return [next(k for k in self.script if f"<{k}>" in r.prompt) for requests, _ in self.calls for r in requests]


def exact_grade(samples, responses, judge, cache_dir):
    """A grader for the runner's tests: right when the response is the gold answer."""
    return [Grade(extracted=r, correct=r == s.answer, method="rule") for s, r in zip(samples, responses)]


def sample(benchmark: str, key: str, answer: str = "right", images=()) -> EvalSample:
    return EvalSample(benchmark, key, f"Question <{key}>", answer, "free_form", list(images))


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from mssr_megatron.models.processor import load_processor
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    return load_processor(build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0))


def suite_of(n: int) -> list[BenchmarkSet]:
    return [BenchmarkSet("bench", "mathverse", "bench.parquet", [sample("bench", f"q{i}") for i in range(n)])]


def run(engine, sets, processor, out, **cfg):
    return run_eval(engine, sets, PromptFormat(TEMPLATE), processor, EvalConfig(**cfg), str(out), progress=False,
                    grade=exact_grade, model="tiny")


def test_requests_are_the_training_requests_in_batches(tmp_path, processor):
    """The engine gets, per batch of eval.batch_size questions, the prompt text and the resized image the training
    path (a data file read by data/records.py, prompts by rl_step's build_request) gives the same question."""
    from mssr_megatron.config import load_config
    from mssr_megatron.data.prompts import build_request
    from mssr_megatron.data.records import read_records
    from mssr_megatron.models.tiny_hf import synthetic_image

    image = str(tmp_path / "wide.png")
    synthetic_image(0, size=56).resize((200, 100)).save(image)
    cfg = load_config(None, ["data.min_pixels=784", "data.max_pixels=3136"])  # the default prompt template
    train_file = tmp_path / "train.jsonl"
    rows = [{"problem": f"Question <q{i}>", "answer": "right", "images": [image]} for i in range(5)]
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    training = [build_request(r, PromptFormat.from_config(cfg.data), processor)
                for r in read_records(str(train_file), cfg.data, "train").records]

    sets = [BenchmarkSet("bench", "mathverse", "bench.parquet",
                         [sample("bench", f"q{i}", images=[image]) for i in range(5)])]
    engine = ScriptedEngine({f"q{i}": ["right"] for i in range(5)})
    run_eval(engine, sets, PromptFormat.from_config(cfg.data), processor, EvalConfig(batch_size=2), str(tmp_path / "e"),
             progress=False, grade=exact_grade)
    assert [len(requests) for requests, _ in engine.calls] == [2, 2, 1]
    sent = [r for requests, _ in engine.calls for r in requests]
    assert [r.prompt for r in sent] == [r.prompt for r in training]
    # smart resize by hand: 200x100 at factor 28 is 196x112 = 21952 px > 3136, so both sides shrink by
    # sqrt(20000 / 3136) = 2.525 and are floored to multiples of 28: 200 / 2.525 = 79.2 -> 56, 100 / 2.525 = 39.6 -> 28
    assert {im.size for r in sent for im in r.images} == {im.size for r in training for im in r.images} == {(56, 28)}
    greedy = engine.calls[0][1]
    assert (greedy.temperature, greedy.n, greedy.max_new_tokens, greedy.seed) == (0.0, 1, 4096, None)


def test_avg_at_k_and_engine_errors_by_hand(tmp_path, processor):
    sets = [BenchmarkSet("a", "mathverse", "a.parquet", [sample("a", "a1"), sample("a", "a2")], skipped={"bad": 2}),
            BenchmarkSet("b", "mathvista", "b.parquet", [sample("b", "b1")])]
    engine = ScriptedEngine({"a1": ["right", "right", "wrong"], "a2": ["wrong", "ERROR", "wrong"],
                             "b1": ["right"] * 3})
    results = run(engine, sets, processor, tmp_path, k=3, temperature=0.7, seed=5, batch_size=2)
    # a: a1 2/3 + a2 0/3 over 2 questions = 1/3; b: 3/3; average (1/3 + 1) / 2 = 2/3
    a, b = results["benchmarks"]["a"], results["benchmarks"]["b"]
    assert a["correct"] == pytest.approx(2 / 3) and a["total"] == 2 and a["accuracy"] == pytest.approx(1 / 3)
    assert b["correct"] == pytest.approx(1.0) and b["accuracy"] == pytest.approx(1.0)
    assert results["average"] == pytest.approx(2 / 3)
    assert a["errors"] == 1 and a["graded_by"] == {"rule": 5, "judge": 0, "rule_fallback": 0}
    assert a["skipped"] == {"bad": 2} and results["k"] == 3
    # batches of 2 questions: the second starts at suite position 2, so its seed is 5 + 2 * k
    assert [(s.n, s.temperature, s.seed) for _, s in engine.calls] == [(3, 0.7, 5), (3, 0.7, 11)]
    with open(tmp_path / "results.json") as fh:
        assert json.load(fh) == results
    lines = [json.loads(line) for line in open(tmp_path / SAMPLES_FILE)]
    error = next(line for line in lines if line["finish_reason"] == "error")
    assert not error["correct"] and "image unreadable" in error["error"]


def test_interrupted_run_resumes_without_regenerating(tmp_path, processor):
    script = {f"q{i}": ["right" if i % 2 else "wrong"] for i in range(5)}
    settings = dict(batch_size=2, temperature=0.5, seed=7)
    with pytest.raises(RuntimeError, match="killed"):
        run(ScriptedEngine(script, fail_on_call=2), suite_of(5), processor, tmp_path, **settings)
    assert len(read_cache(str(tmp_path / SAMPLES_FILE))) == 2  # the first batch was written before the kill

    again = ScriptedEngine(script)
    resumed = run(again, suite_of(5), processor, tmp_path, **settings)
    assert again.questions_asked == ["q2", "q3", "q4"]
    # seeds follow suite positions (q2 and q4 start the batches), not the resumed run's own batch count
    assert [s.seed for _, s in again.calls] == [7 + 2, 7 + 4]
    whole = run(ScriptedEngine(script), suite_of(5), processor, tmp_path / "whole", **settings)
    assert resumed == whole and resumed["benchmarks"]["bench"]["correct"] == 2.0


def test_torn_last_line_is_generated_again(tmp_path, processor):
    script = {f"q{i}": ["right"] for i in range(3)}
    first = run(ScriptedEngine(script), suite_of(3), processor, tmp_path, batch_size=8)
    path = tmp_path / SAMPLES_FILE
    path.write_bytes(path.read_bytes()[:-20])  # a kill in the middle of writing the last line
    again = ScriptedEngine(script)
    assert run(again, suite_of(3), processor, tmp_path, batch_size=8) == first
    assert again.questions_asked == ["q2"]
    assert [json.loads(line)["sample_id"] for line in open(path)] == ["q0", "q1", "q2"]

    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + lines[2])  # damage that is not a kill's: refused, naming the line
    with pytest.raises(ValueError, match="line 2 .*delete the folder"):
        run(ScriptedEngine(script), suite_of(3), processor, tmp_path, batch_size=8)


def test_cache_of_another_evaluation_is_refused(tmp_path, processor):
    script = {f"q{i}": ["right"] for i in range(2)}
    run(ScriptedEngine(script), suite_of(2), processor, tmp_path)
    with pytest.raises(ValueError, match=r"max_new_tokens: 4096 -> 64.*new --out folder, or delete"):
        run(ScriptedEngine(script), suite_of(2), processor, tmp_path, max_new_tokens=64)
    engine = ScriptedEngine(script)
    with pytest.raises(ValueError, match="model: 'tiny' -> 'other'"):
        run_eval(engine, suite_of(2), PromptFormat(TEMPLATE), processor, EvalConfig(), str(tmp_path),
                 progress=False, grade=exact_grade, model="other")
    assert engine.calls == []
    # a larger eval.limit or batch size asks more or differently, not differently answered: the cache is reused
    more = {f"q{i}": ["right"] for i in range(3)}
    engine = ScriptedEngine(more)
    run(engine, suite_of(3), processor, tmp_path, batch_size=1)
    assert engine.questions_asked == ["q2"]


@pytest.mark.parametrize("settings,message", [
    (["trainer.eval_every=5"], "trainer.eval_every=5 needs eval.suite"),
    (["trainer.eval_every=5", "eval.suite=missing.yaml"], "eval.suite='missing.yaml' does not exist"),
    (["eval.k=4"], "eval.k=4 with eval.temperature=0 repeats one greedy answer"),
    (["eval.batch_size=0"], "eval.batch_size=0 must be > 0"),
])
def test_eval_settings_are_checked_with_the_config(settings, message):
    from mssr_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, settings)
    load_config(None, ["eval.k=4", "eval.temperature=0.6"])  # avg@k at a temperature is fine


def test_real_hf_engine_end_to_end(tmp_path, processor):
    """The HF engine on a tiny random model: every question answered k times, and a rerun generates nothing."""
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir, synthetic_image
    from mssr_megatron.rollout.hf_engine import HFEngine

    image = str(tmp_path / "img.png")
    synthetic_image(1, size=56).save(image)
    engine = HFEngine(build_tiny_model_dir(tmp_path / "model", seed=0), max_batch_size=8)
    calls = []
    generate = engine.generate
    engine.generate = lambda requests, sampling: calls.append(len(requests)) or generate(requests, sampling)
    sets = [BenchmarkSet("b", "mathverse", "b.parquet", [sample("b", f"q{i}", images=[image]) for i in range(3)])]
    cfg = EvalConfig(k=2, temperature=1.0, max_new_tokens=3, batch_size=2)
    results = run_eval(engine, sets, PromptFormat(TEMPLATE), engine.processor, cfg, str(tmp_path / "out"),
                       progress=False, grade=exact_grade)
    lines = [json.loads(line) for line in open(tmp_path / "out" / SAMPLES_FILE)]
    assert calls == [2, 1]
    assert sorted((line["sample_id"], line["k_index"]) for line in lines) == [(f"q{i}", k) for i in range(3)
                                                                               for k in range(2)]
    assert all(line["finish_reason"] in ("stop", "length") and line["prompt"].count("<|image_pad|>") == 1
               for line in lines)
    assert results["benchmarks"]["b"]["total"] == 3
    assert run_eval(engine, sets, PromptFormat(TEMPLATE), engine.processor, cfg, str(tmp_path / "out"),
                    progress=False, grade=exact_grade) == results
    assert calls == [2, 1]
    assert os.path.exists(tmp_path / "out" / "eval_meta.json")


# ------------------------------------------------------------------ with the suite readers and grading (issue 14)
def _train_worker(rank: int, runs: list) -> None:
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    for config_path, extra in runs:
        train(load_config(config_path, extra))


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    from mssr_megatron.eval.suite import read_suite
    from mssr_megatron.eval.tiny_suite import write_tiny_suite

    path = write_tiny_suite(str(tmp_path_factory.mktemp("suite")))
    return path, [s.name for s in read_suite(path)]


def test_evaluate_model_on_an_hf_directory(tmp_path, tiny_suite):
    from mssr_megatron.eval.runner import evaluate_model
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    suite, names = tiny_suite
    model = build_tiny_model_dir(tmp_path / "model", seed=0)
    results = evaluate_model(model, suite, str(tmp_path / "out"), ["eval.limit=2", "eval.max_new_tokens=3"])
    assert sorted(results["benchmarks"]) == sorted(names) and results["model"] == os.path.abspath(model)
    assert all(b["total"] == 2 for b in results["benchmarks"].values())
    with pytest.raises(ValueError, match="max_new_tokens: 3 -> 5"):
        evaluate_model(model, suite, str(tmp_path / "out"), ["eval.limit=2", "eval.max_new_tokens=5"])


@pytest.mark.slow
def test_training_logs_benchmark_accuracy_and_its_checkpoint_evaluates(tmp_path, tiny_suite):
    """trainer.eval_every=2 over 2 steps: eval/* metrics at steps 0 and 2 in metrics.jsonl, the files in
    <run>/eval/step_2/; then `mssr eval --model <run>` exports the run's last checkpoint and evaluates it."""
    from megatron_harness import spawn
    from trainer_assets import build_assets, logged_metrics, overrides

    from mssr_megatron.eval.runner import evaluate_model

    suite, names = tiny_suite
    assets = build_assets(str(tmp_path / "assets"))
    run_dir = tmp_path / "run"
    settings = ["eval.limit=2", "eval.max_new_tokens=3"]
    spawn(_train_worker, 1, [("examples/configs/tiny_cpu.yaml",
                              overrides(assets, str(run_dir), "trainer.eval_every=2", f"eval.suite={suite}",
                                        *settings))])
    metrics = logged_metrics(run_dir)
    expected = {f"eval/{name}/accuracy" for name in names} | {"eval/average"}
    assert expected <= set(metrics[0]) and expected <= set(metrics[2])
    assert not expected & set(metrics[1])
    with open(run_dir / "eval" / "step_2" / "results.json") as fh:
        step2 = json.load(fh)
    assert step2["step"] == 2 and metrics[2]["eval/average"] == pytest.approx(step2["average"])

    from mssr_megatron.plots import plot_runs  # `mssr plot` draws the benchmark curves

    figures = plot_runs([str(run_dir)], str(tmp_path / "plots"))
    assert os.path.join(str(tmp_path / "plots"), "eval.png") in figures

    results = evaluate_model(str(run_dir), suite, str(tmp_path / "offline"), settings)
    assert results["step"] == 2 and os.path.isfile(tmp_path / "offline" / "model_hf" / "config.json")
    assert sorted(results["benchmarks"]) == sorted(names)


@pytest.mark.slow
def test_mssr_eval_command_prints_the_table_and_reuses_finished_samples(tmp_path, tiny_suite):
    """`mssr eval` in a process of its own on a tiny model and the tiny suite: the table is printed and written; a
    second run with a larger eval.limit generates only the questions the first did not."""
    import subprocess
    import sys

    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    suite, names = tiny_suite
    model = build_tiny_model_dir(tmp_path / "model", seed=0)
    out = tmp_path / "out"

    def mssr_eval(*settings):
        cmd = [sys.executable, "-m", "mssr_megatron.cli", "eval", "--model", str(model), "--suite", suite,
               "--out", str(out), "eval.max_new_tokens=4", *settings]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    first = mssr_eval("eval.limit=2")
    assert "| **average** |" in first.stdout and all(f"| {name} |" in first.stdout for name in names)
    assert (out / "results.md").read_text() in first.stdout
    second = mssr_eval("eval.limit=3")
    total = 3 * len(names)
    assert f"{2 * len(names)} of {total} questions cached, {len(names)} to generate" in second.stderr
    with open(out / "samples.jsonl") as fh:
        assert sum(1 for _ in fh) == total
