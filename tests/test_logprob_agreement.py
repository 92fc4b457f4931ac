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



def _dp_case():
    """Four rows of engine and trainer log-probs with uneven token counts (3, 1 | 4, 2): replica 0 (rows 0-1) alone has
    mean |diff| 0.9 / 4 = 0.225 and replica 1 3.2 / 6 = 0.533; over all 10 tokens it is 4.1 / 10 = 0.41."""
    trainer = torch.full((4, 4), -1.0)
    diff = torch.tensor([[0.05, 0.05, 0.2, 9.0], [0.6, 9.0, 9.0, 9.0], [0.6, 0.6, 0.6, 0.6], [-0.2, 0.6, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    return trainer + diff, trainer, mask  # the masked 9s must not count


def _dp_worker(rank: int, out_dir: str) -> None:
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.train import rl_step

    init_megatron(1, 1, seed=0, backend="gloo", device="cpu")  # 2 processes, TP = PP = 1: DP = 2
    try:
        rollout, trainer, mask = _dp_case()
        rows = slice(2 * rank, 2 * rank + 2)  # this replica's rows, as rl_step.data_parallel_rows gives them
        torch.save(rl_step.mismatch_metrics(trainer[rows], rollout[rows], mask[rows]), f"{out_dir}/rank{rank}.pt")
    finally:
        destroy_megatron()


@pytest.mark.slow
def test_mismatch_at_two_data_parallel_ranks_is_the_token_mean_over_every_row(tmp_path):
    from megatron_harness import spawn

    spawn(_dp_worker, 2, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert results[0] == results[1]  # the same on both ranks: the mismatch alarm decides the same everywhere
    # By hand over all 10 response tokens: |diff| 0.05, 0.05, 0.2, 0.6 | 0.6 x4, 0.2, 0.6 (signed: the 0.2 is -0.2).
    stats = results[0]
    assert stats["mismatch/num_tokens"] == 10
    assert stats["mismatch/mean_abs_diff"] == pytest.approx(4.1 / 10, abs=1e-6)
    assert stats["mismatch/mean_diff"] == pytest.approx(3.7 / 10, abs=1e-6)
    assert stats["mismatch/max_abs_diff"] == pytest.approx(0.6, abs=1e-6)
    assert stats["mismatch/frac_over_threshold"] == pytest.approx(8 / 10)  # all but the two 0.05s exceed 0.1
