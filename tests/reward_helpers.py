"""Test-only reward functions for tests/test_rewards.py.

They live in their own importable module (not in the test file) because the batch grader pickles reward
functions by module + name into spawned worker processes, which must be able to import them. Importing this
module registers them in REWARDS under "test_*" names (guarded: the module may be imported more than once).
"""

from __future__ import annotations

import os
import re
import time

from mssr_megatron.rewards import REWARDS, math_reward

HANG = "HANG"  # gold answers containing this marker make `hang_on_marker` sleep forever
RAISE = "RAISE"  # ... and `raise_on_marker` raise
CRASH = "CRASH"  # ... and `crash_on_marker` kill its worker process


def hang_on_marker(response: str, answer: str) -> float:
    """Sleep (practically) forever when the gold contains HANG, else grade like `math`."""
    if HANG in answer:
        time.sleep(3600)
    return math_reward(response, answer)


def raise_on_marker(response: str, answer: str) -> float:
    """Raise ValueError when the gold contains RAISE, else grade like `math`."""
    if RAISE in answer:
        raise ValueError("boom")
    return math_reward(response, answer)


def crash_on_marker(response: str, answer: str) -> float:
    """Kill the worker process (as a segfault would) when the gold contains CRASH, else grade like `math`."""
    if CRASH in answer:
        os._exit(1)
    return math_reward(response, answer)


def out_of_range(response: str, answer: str) -> float:
    """Return an invalid score (2.0)."""
    return 2.0


def always_right(response: str, answer: str) -> float:
    """Score 1.0 at once, whatever the response: what remains of a grading call is the format check."""
    return 1.0


def backtrack_on_marker(response: str, answer: str) -> float:
    """When the gold contains HANG, run a regular expression with exponential backtracking (re holds the GIL for its
    whole match, so no other thread of the worker runs meanwhile), else grade like `math`."""
    if HANG in answer:
        return 1.0 if re.match(r"(a+)+$", "a" * 64 + "b") else 0.0
    return math_reward(response, answer)


for _name, _fn in (("test_hang", hang_on_marker), ("test_raise", raise_on_marker)):
    if _name not in REWARDS:
        REWARDS.register(_name)(_fn)


def score_with_a_shared_pool() -> None:
    """Body of a spawned child: leaves score_batch's shared worker pool running, as a training rank does."""
    from mssr_megatron.rewards import score_batch

    assert score_batch(["\\boxed{1}"], ["1"], num_workers=1, timeout_s=5.0).correct == [1.0]
