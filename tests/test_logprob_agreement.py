"""Engine vs trainer log-prob mismatch statistics, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mssr_megatron.rollout.logprob_agreement import logprob_mismatch


def test_hand_worked_values():
    rollout = torch.tensor([[-1.0, -2.0, -0.5, float("-inf")], [-0.1, -0.2, -3.0, -1.0]])
    trainer = torch.tensor([[-1.0, -2.3, -0.45, float("-inf")], [-0.35, -0.2, -3.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # masked diffs (rollout - trainer): 0, +0.3, -0.05 | +0.25, 0  -> 5 tokens
    stats = logprob_mismatch(rollout, trainer, mask, threshold=0.1)
    assert stats["num_tokens"] == 5
    assert stats["mean_abs_diff"] == pytest.approx((0 + 0.3 + 0.05 + 0.25 + 0) / 5)  # 0.12
    assert stats["max_abs_diff"] == pytest.approx(0.3)
    assert stats["frac_over_threshold"] == pytest.approx(2 / 5)  # 0.3 and 0.25
    assert stats["mean_diff"] == pytest.approx((0.3 - 0.05 + 0.25) / 5)  # 0.1
    assert all(math.isfinite(v) for v in stats.values())  # -inf / NaN at masked positions are ignored


def test_threshold_is_strict_and_bool_mask():
    a = torch.tensor([[0.0, 0.0]])
    b = torch.tensor([[-0.5, -0.25]])
    mask = torch.tensor([[True, True]])
    assert logprob_mismatch(a, b, mask, threshold=0.25)["frac_over_threshold"] == 0.5  # 0.25 itself is not over
    assert logprob_mismatch(a, b, mask, threshold=0.5)["frac_over_threshold"] == 0.0


def test_identical_and_empty():
    x = torch.randn(3, 5)
    stats = logprob_mismatch(x, x.clone(), torch.ones(3, 5))
    assert stats["max_abs_diff"] == 0.0 and stats["frac_over_threshold"] == 0.0 and stats["num_tokens"] == 15
    empty = logprob_mismatch(x, x + 1, torch.zeros(3, 5))
    assert empty == {"mean_abs_diff": 0.0, "max_abs_diff": 0.0, "frac_over_threshold": 0.0, "mean_diff": 0.0,
                     "num_tokens": 0}


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4))
