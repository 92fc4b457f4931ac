"""The records the evaluation modules pass to each other, and the files an evaluation writes.

An evaluation folder (`mssr eval --out DIR`, or `<run>/eval/step_<N>/` inside training) holds
    samples.jsonl   one line per finished (benchmark, sample_id, k_index): SampleResult fields; it is also the cache
                    a killed evaluation resumes from (finished lines are never regenerated)
    results.json    RESULTS: per-benchmark accuracy and counts, the average, and what produced them
    results.md      the table `report.format_results` makes of results.json
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # not at import: grading's worker processes import this module, and the data package pulls torch
    from mssr_megatron.data.records import Record

AnswerType = Literal["free_form", "choice", "yes_no"]
GradeMethod = Literal["rule", "judge", "rule_fallback"]

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
RESULTS_MARKDOWN = "results.md"


@dataclass
class EvalSample:
    """One benchmark question, ready for the training prompt template."""

    benchmark: str
    """Suite entry name, e.g. 'mathvista' (a suite may read one layout twice under two names)."""
    sample_id: str
    """The benchmark's own id (pid, sample_index, index, ...), unique within the benchmark."""
    question: str
    """Problem text given to the prompt template (options already written into it where the benchmark does so)."""
    answer: str
    """Gold answer: an option letter for 'choice', 'yes'/'no' for 'yes_no', else the free-form answer."""
    answer_type: AnswerType
    """How the answer is graded by rule."""
    images: list[bytes | str]
    """Encoded image bytes or absolute paths (as Record.images)."""
    sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each image, read from the header."""
    choices: list[str] = field(default_factory=list)
    """Option texts of a 'choice' question, in letter order (A, B, ...); empty otherwise."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Benchmark fields kept for reports and the judge (question_for_eval, problem_version, category, ...)."""

    @property
    def key(self) -> str:
        """'<benchmark>/<sample_id>': unique within a suite."""
        return f"{self.benchmark}/{self.sample_id}"

    def as_record(self) -> Record:
        """The training-data record of this question (prompt_id = key), so prompts are built as in training."""
        from mssr_megatron.data.records import Record

        return Record(prompt_id=self.key, problem=self.question, answer=self.answer, images=list(self.images),
                      sizes=list(self.sizes))


@dataclass
class BenchmarkSet:
    """The samples of one suite entry, plus the rows skipped and why (as data.records.RecordSet)."""

    name: str
    """Suite entry name."""
    reader: str
    """Reader (layout) that read it, a key of benchmarks.BENCHMARK_READERS."""
    path: str
    """The local file or folder read."""
    samples: list[EvalSample] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    """Skipped rows per reason, e.g. {'missing_image': 2}."""
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)
    """A few skipped ids per reason."""

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class Grade:
    """How one response was graded."""

    extracted: str | None
    """The answer taken from the response (None: none found)."""
    correct: bool
    method: GradeMethod
    """'rule'; 'judge'; 'rule_fallback' when the judge was asked for but could not answer (see `error`)."""
    judge_reply: str | None = None
    """The judge's raw reply text, when it was asked."""
    error: str | None = None
    """Why the judge's verdict is missing (timeout, HTTP error, malformed reply), for 'rule_fallback'; or why a rule
    grade is wrong without a comparison (the free-form comparison overran its time limit or raised)."""


@dataclass
class SampleResult:
    """One line of samples.jsonl."""

    benchmark: str
    sample_id: str
    k_index: int
    """Which of the k samples of this question (0 for greedy pass@1)."""
    answer: str
    """Gold answer."""
    response: str
    finish_reason: str
    extracted: str | None
    correct: bool
    method: GradeMethod
    judge_reply: str | None = None
    error: str | None = None
    prompt: str | None = None
    """The prompt text (kept for inspection)."""
