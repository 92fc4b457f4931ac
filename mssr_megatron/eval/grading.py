"""Grading benchmark responses: by rule (math-verify, option letters, yes/no), or by an LLM judge with a rule fallback.

Rules, per `EvalSample.answer_type` (the final answer is the last \\boxed{...}, else the last "answer: X" line, as in
training: rewards.extract_answer):

* free_form: equal as text (case-insensitive, outer $...$ and a final period ignored), else mathematically equivalent by
  rewards.math_equal (math-verify with the training reward's percent/unit rules: \\frac{1}{2} = 0.5, 50% = 0.5). A gold
  answer that is a word or phrase (letters and spaces only: ChartQA's "Angry", R1-OneVision's "TCGA") is compared as
  text only, since math-verify reads words as products of symbols (TCGA == AGCT); so is one math-verify cannot read.
* choice: the final answer names one option letter ("B", "(B)", "B.", "B: text", "option B": rewards'
  extract_choice_letter) or is exactly one option's text (sample.choices); it must be the gold letter.
* yes_no: exactly one of the words "yes"/"no" (any case) in the final answer, equal to the gold.

In `grade_responses` the free-form comparison runs in the training reward's worker processes (rewards.grader: sympy
can hang on a pathological answer), under the same per-answer time limit; an answer that overruns is wrong, with the
reason in `Grade.error`. Option letters and yes/no are string matches, linear in the response, and run inline.

With a judge (judge.url set), every free_form and choice response is judged (judge.py); a response whose judgement
failed after the retries (or all of them, if the endpoint is unreachable) gets its rule grade with method
'rule_fallback' and `error` saying why. yes_no questions are graded by rule even with a judge, as the authors do for
HallusionBench (evaluation/utils/async_judge.py in the released code: NO_JUDGE_DATASETS).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mssr_megatron.eval.config import JudgeConfig
from mssr_megatron.eval.types import EvalSample, Grade
from mssr_megatron.rewards import extract_answer, extract_choice_letter, math_equal, strip_math_delimiters
from mssr_megatron.rewards.extract import gold_answer
from mssr_megatron.rewards.grader import score_batch

__all__ = ["grade_rule", "grade_responses", "choice_letter", "yes_no"]

GRADE_WORKERS = 2
"""Worker processes of the free-form comparison (as data.reward_workers)."""
GRADE_TIMEOUT_S = 5.0
"""Wall-clock limit per free-form answer (as data.reward_timeout_s)."""

_LETTERS = "ABCDEFGHIJ"
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
# `\text{Yes}`, `\textbf{No}`: the words inside are what counts.
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_WORDS = re.compile(r"[A-Za-z][A-Za-z\s'-]*[A-Za-z]")


def _plain(s: str) -> str:
    """Text-comparison form of an answer: outer math delimiters, \\text{}, surrounding space, a final period and case
    removed, inner runs of spaces collapsed."""
    s = _TEXT_MACRO.sub(r"\1", strip_math_delimiters(s))
    return " ".join(s.strip().rstrip(".").split()).casefold()


def choice_letter(answer: str | None, choices: Sequence[str]) -> str | None:
    """The option letter an answer string names: a letter form ("B", "(B)", "B: 8/11", "option B"), or the text of
    exactly one option (choices[i] -> letter i). None if it names no option or several."""
    if not answer:
        return None
    letter = extract_choice_letter(answer)
    if letter is not None:
        return letter
    plain = _plain(answer)
    hits = [i for i, text in enumerate(choices) if plain and _plain(text) == plain]
    return _LETTERS[hits[0]] if len(hits) == 1 and hits[0] < len(_LETTERS) else None


def yes_no(answer: str | None) -> str | None:
    """'yes' or 'no' when exactly one of the two words occurs in the answer ("Yes.", "\\text{No}", "no, it is not"),
    else None ("yes or no", "maybe")."""
    if not answer:
        return None
    words = {w.casefold() for w in _YES_NO.findall(_TEXT_MACRO.sub(r"\1", answer))}
    return words.pop() if len(words) == 1 else None


def _gold_letter(sample: EvalSample) -> str:
    letter = choice_letter(gold_answer(sample.answer), sample.choices)
    if letter is None:
        raise ValueError(f"{sample.key}: gold answer {sample.answer!r} of a choice question is not an option letter "
                         f"or option text (options: {sample.choices}); the benchmark reader must map it to a letter")
    return letter


def _free_form_equal(pred: str, gold: str) -> bool:
    if _plain(pred) == _plain(gold):
        return True
    if _WORDS.fullmatch(gold.strip()):
        return False
    try:
        return math_equal(pred, gold)
    except ValueError:  # math-verify reads nothing in the gold (a word or phrase): the text comparison decided
        return False


def free_form_score(response: str, answer: str) -> float:
    """1.0 when the response's final answer equals the free-form gold `answer` (module docstring), else 0.0: the
    rule in the reward-function form the worker processes run (a top-level function, so it pickles)."""
    final = extract_answer(response)
    return float(final is not None and _free_form_equal(final, gold_answer(answer)))


def grade_rule(sample: EvalSample, response: str) -> Grade:
    """Grade one response by rule (module docstring). Returns Grade(extracted, correct, method='rule'); `extracted`
    is the option letter / 'yes' / 'no' when one was recognised, else the final answer text, None when there is none.
    Raises ValueError naming the sample when a choice question's gold is no option."""
    final = extract_answer(response)
    if sample.answer_type == "choice":
        gold = _gold_letter(sample)
        letter = choice_letter(final, sample.choices)
        return Grade(extracted=letter or final, correct=letter == gold, method="rule")
    if sample.answer_type == "yes_no":
        word = yes_no(final)
        return Grade(extracted=word or final, correct=word is not None and word == yes_no(sample.answer),
                     method="rule")
    if sample.answer_type == "free_form":
        gold = gold_answer(sample.answer)
        return Grade(extracted=final, correct=final is not None and _free_form_equal(final, gold), method="rule")
    raise ValueError(f"{sample.key}: unknown answer_type {sample.answer_type!r}; known: free_form, choice, yes_no")


def _grade_by_rule(samples: Sequence[EvalSample], responses: Sequence[str]) -> list[Grade]:
    """grade_rule of each pair, with the free-form comparisons in worker processes under GRADE_TIMEOUT_S."""
    free = [i for i, s in enumerate(samples) if s.answer_type == "free_form"]
    grades: list[Grade | None] = [None if s.answer_type == "free_form" else grade_rule(s, r)
                                  for s, r in zip(samples, responses)]
    if free:
        scored = score_batch([responses[i] for i in free], [samples[i].answer for i in free], reward=free_form_score,
                             num_workers=GRADE_WORKERS, timeout_s=GRADE_TIMEOUT_S)
        failures = dict(scored.failures)
        for j, i in enumerate(free):
            grades[i] = Grade(extracted=extract_answer(responses[i]), correct=scored.correct[j] == 1.0, method="rule",
                              error=failures.get(j))
    return grades  # type: ignore[return-value]


def grade_responses(samples: Sequence[EvalSample], responses: Sequence[str], judge: JudgeConfig,
                    cache_dir: str | None) -> list[Grade]:
    """Grade responses[i] against samples[i]: by rule when judge.url is null; else by the judge (cached in
    cache_dir/judge_cache.jsonl when cache_dir is given), the rule grade flagged 'rule_fallback' where it failed.
    Returns one Grade per response, in order."""
    if len(samples) != len(responses):
        raise ValueError(f"{len(samples)} samples but {len(responses)} responses")
    rule = _grade_by_rule(samples, responses)
    if not judge.url:
        return rule
    from mssr_megatron.eval.judge import judge_responses  # http client only when a judge is configured

    judged = [i for i, s in enumerate(samples) if s.answer_type != "yes_no"]
    outcomes = judge_responses([samples[i] for i in judged], [responses[i] for i in judged], judge, cache_dir)
    grades = list(rule)
    for i, outcome in zip(judged, outcomes):
        if outcome.verdict is None:
            grades[i] = Grade(extracted=rule[i].extracted, correct=rule[i].correct, method="rule_fallback",
                              judge_reply=outcome.reply, error=outcome.error)
        else:
            extracted = outcome.verdict.extracted
            if samples[i].answer_type == "choice":  # report the option as a letter, as the rule grade does
                extracted = choice_letter(extracted, samples[i].choices) or extracted
            grades[i] = Grade(extracted=extracted, correct=outcome.verdict.correct, method="judge",
                              judge_reply=outcome.reply)
    return grades
