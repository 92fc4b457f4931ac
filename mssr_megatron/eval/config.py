"""The `eval:` section of a run config (also what `mssr eval` reads, with key=value overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class JudgeConfig:
    """An OpenAI-compatible chat-completions endpoint serving the judge model (SGLang or vLLM on the cluster)."""

    url: str | None = None
    """Base URL, e.g. http://judge-node:30000/v1 (POST {url}/chat/completions); null = rule-based grading only."""
    model: str = "Qwen2.5-72B-Instruct"
    """Model name sent in each request (the authors judge with Qwen2.5-72B-Instruct)."""
    api_key_env: str | None = None
    """Environment variable holding a bearer token, if the endpoint wants one (the key itself never goes in a config)."""
    concurrency: int = 16
    """Requests in flight at once."""
    timeout_s: float = 60.0
    """Seconds to wait for one reply."""
    retries: int = 3
    """Extra attempts after a timeout, connection error, HTTP 5xx/429 or malformed reply (with backoff)."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled for each further one."""
    max_tokens: int = 512
    """Maximum tokens of the judge's reply."""


@dataclass
class EvalConfig:
    """Benchmark evaluation: which suite, how answers are generated and graded."""

    suite: str | None = None
    """Suite YAML (benchmark name -> reader + local path), e.g. runs/tiny/eval_suite.yaml; null = no evaluation."""
    max_new_tokens: int = 4096
    """Maximum response tokens (authors' evaluation: 4096)."""
    temperature: float = 0.0
    """Sampling temperature; 0 = greedy (authors' evaluation: greedy pass@1)."""
    top_p: float = 1.0
    """Nucleus sampling mass when temperature > 0."""
    k: int = 1
    """Samples per question; accuracy is avg@k (the mean over all k samples)."""
    batch_size: int = 64
    """Questions per generate call (each finished batch is cached, so a killed evaluation loses at most one)."""
    limit: int | None = None
    """At most this many questions per benchmark (the first ones in file order); null = all."""
    seed: int = 0
    """Sampling seed when temperature > 0."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    """LLM judge; without judge.url answers are graded by rule."""
