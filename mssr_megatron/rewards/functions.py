"""The reward registry and the built-in reward functions.

A reward function is `fn(response: str, answer: str) -> float` with a score in [0, 1]. It must be a plain
top-level function: the batch grader pickles it (by module + name) into spawned worker processes, so lambdas,
closures and bound methods do not work there. Register new ones with `@REWARDS.register("name")`.
"""

from __future__ import annotations

from typing import Callable

from mssr_megatron.registry import Registry
from mssr_megatron.rewards.equivalence import math_equal
from mssr_megatron.rewards.extract import extract_answer, extract_boxed, extract_choice_letter, gold_answer

__all__ = ["REWARDS", "RewardFn", "math_reward", "math_boxed_reward", "choice_reward", "format_reward"]

RewardFn = Callable[[str, str], float]

REWARDS: Registry[RewardFn] = Registry("reward function")


@REWARDS.register("math")
def math_reward(response: str, answer: str) -> float:
    """Score a response against a gold math answer: 1.0 if its final answer is equivalent, else 0.0.

    The final answer is taken by `extract_answer` (last box, else last answer line); equivalence is
    `math_equal` (math-verify plus our percent/unit rules) against the gold without `<answer>` tags
    (`gold_answer`). No or malformed answer -> 0.0.
    Raises ValueError for an empty/unparseable gold answer (a data bug, reported by the batch grader).
    """
    return _math_score(extract_answer(response), gold_answer(answer))


@REWARDS.register("math_boxed")
def math_boxed_reward(response: str, answer: str) -> float:
    """As `math_reward`, but only the last `\\boxed{}` counts (no answer-line fallback): the released grader, which
    grades the boxed content only. "The answer is 3" without a box -> 0.0."""
    return _math_score(extract_boxed(response), gold_answer(answer))


def _math_score(pred: str | None, answer: str) -> float:
    if pred is None:
        if not (answer or "").strip():  # still complain about the data even when the response is empty
            raise ValueError(f"empty gold answer {answer!r}")
        return 0.0
    return 1.0 if math_equal(pred, answer) else 0.0


@REWARDS.register("choice")
def choice_reward(response: str, answer: str) -> float:
    """Score a multiple-choice response: 1.0 if its final answer names exactly the gold letter, else 0.0.

    `answer` is the gold letter ("B", "(B)", "b"); the response's final answer (box or answer line) may be
    "B", "(B)", "B)", "B.", "option B", "\\text{B}", "B: 42". Several letters or none -> 0.0.
    Raises ValueError if the gold is not a single letter A-J.
    """
    gold = extract_choice_letter(gold_answer(answer))
    if gold is None:
        raise ValueError(f"choice gold answer {answer!r} is not a single letter A-J")
    return 1.0 if extract_choice_letter(extract_answer(response)) == gold else 0.0


@REWARDS.register("format")
def format_reward(response: str, answer: str = "") -> float:
    """1.0 if `response` is `<think>...</think>` followed by text containing a boxed answer, else 0.0.

    Leading/trailing whitespace and whitespace around the tags are ignored; exactly one think block is
    allowed; the box must be well-formed and non-empty (same rules as `extract_boxed`). `answer` is unused
    (kept for the common reward signature).
    """
    s = response.strip()
    if not s.startswith("<think>") or s.count("<think>") != 1 or s.count("</think>") != 1:
        return 0.0
    # str.find rather than a `.*?` regex: linear time even on long, adversarial rollouts.
    tail = s[s.find("</think>") + len("</think>") :]
    return 1.0 if extract_boxed(tail) is not None else 0.0
