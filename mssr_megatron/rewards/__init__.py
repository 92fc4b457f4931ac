"""Verifiable rewards: answer extraction, the reward registry, and parallel batch grading.

    from mssr_megatron.rewards import RewardGrader
    with RewardGrader("math", num_workers=8, timeout_s=5.0) as grader:
        batch = grader.score(responses, gold_answers, format_weight=0.1)
        log(batch.as_metrics())

Reward functions ("math", "choice", "format") live in `REWARDS`; see functions.py for the contract.
"""

from __future__ import annotations

from mssr_megatron.rewards.equivalence import math_equal, normalize_answer, strip_percent, strip_units
from mssr_megatron.rewards.extract import (
    extract_answer,
    extract_answer_line,
    extract_boxed,
    extract_choice_letter,
    strip_math_delimiters,
)
from mssr_megatron.rewards.functions import REWARDS, RewardFn, choice_reward, format_reward, math_reward
from mssr_megatron.rewards.grader import BatchScores, RewardGrader, close_shared_graders, score_batch

__all__ = [
    "REWARDS",
    "BatchScores",
    "RewardFn",
    "RewardGrader",
    "choice_reward",
    "close_shared_graders",
    "extract_answer",
    "extract_answer_line",
    "extract_boxed",
    "extract_choice_letter",
    "format_reward",
    "math_equal",
    "math_reward",
    "normalize_answer",
    "score_batch",
    "strip_math_delimiters",
    "strip_percent",
    "strip_units",
]
