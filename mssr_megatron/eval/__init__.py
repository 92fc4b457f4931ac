"""Benchmark evaluation (`mssr eval`, and `trainer.eval_every` inside training): the paper's benchmarks read from
local files, answered by the policy through a rollout engine, graded by rules or an LLM judge.

    suite.py        a suite YAML: benchmark name -> reader + local path       -> list[BenchmarkSet]
    benchmarks.py   one reader per published benchmark layout (registry)        -> EvalSample
    tiny_suite.py   a tiny synthetic suite in each benchmark's own file layout (written by `mssr make-tiny`)
    runner.py       generation through the engine protocol, a resumable per-sample cache, avg@k
    model_source.py what `mssr eval --model` names (HF dir, run, checkpoint) -> an HF dir and its run config
    grading.py      rule-based grading (math-verify, choice letters, yes/no)    -> Grade
    judge.py        an OpenAI-compatible chat-completions judge, with a rule-based fallback
    report.py       results tables (with the paper's rows), --compare, accuracy-over-steps figure
    types.py        the records these modules pass to each other
    config.py       the `eval:` config section
"""
