"""The kl_window rule as released (issue 13 item 2): a window of 10 steps, each step's KL the mean over sequences of
per-sequence token means of k3 clamped to +-10, driven through the algorithm pipeline and checked against a trace
worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mssr_megatron.algorithms.forgetting import kl_row_sums, step_kl
from mssr_megatron.algorithms.pipeline import RLAlgorithm
from mssr_megatron.config import AlgorithmConfig, BaselineConfig

MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # a 2-token and a 4-token response
PROMPTS = ["a", "b"]
K = 0.004837418035959606  # k3 of a token whose log-ratio old - ref is 0.1: e^-0.1 + 0.1 - 1
SPIKE = -math.log(16.0)  # log-ratio whose k3 is 16 - ln 16 - 1 = 12.227..., clamped to 10


def log_ratios(kind: str) -> torch.Tensor:
    """old - ref per token for one step. A: 0.1 on every response token; B: 0.1 on the first row's 2 tokens only;
    S: one token of the first row at -ln 16, the rest 0."""
    x = torch.zeros(2, 4, dtype=torch.float64)
    if kind == "A":
        x[MASK] = 0.1
    elif kind == "B":
        x[0, :2] = 0.1
    elif kind == "S":
        x[0, 0] = SPIKE
    return x


# Steps 1..13. Hand-worked per-step KL (seq_mean): A = (K + K)/2 = K; B = (K/2 + 0)/2 = K/2; S = (10/2 + 0)/2 = 2.5.
# rho = 0.875 + (KL_s / 0.01) * 0.085 when the 10-step window mean KL_s <= 0.01, else 0.875:
#   step 1 (B):  KL_s = K/2 = 0.0024187090           -> rho = 0.8955590267
#   step 2 (A):  KL_s = (K/2 + K)/2 = 3K/4 = 0.0036281 -> rho = 0.9058385400
#   steps 3..12: the spike (2.5) is in the window, KL_s >= 0.25 -> rho = 0.875
#   step 13 (B): the window is steps 4..13 = 9 A + 1 B: KL_s = 9.5K/10 = 0.0045955471 -> rho = 0.9140621506
# (A 20-step window would still hold the spike at step 13; a 9-step one would have dropped it at step 12.)
STEPS = ["B", "A", "S"] + ["A"] * 9 + ["B"]
STEP_KL = [K / 2, K, 2.5] + [K] * 9 + [K / 2]
RHO = [0.8955590266528283, 0.9058385399792425] + [0.875] * 10 + [0.9140621506403738]


def test_released_defaults():
    b = BaselineConfig()
    assert (b.kl_window, b.kl_aggregation) == (10, "seq_mean")


def test_window_10_seq_mean_trace_matches_hand_worked():
    algo = RLAlgorithm(AlgorithmConfig())
    old = torch.full((2, 4), -1.0, dtype=torch.float64)
    rhos, kls, token_means = [], [], []
    for kind in STEPS:
        ref = old - log_ratios(kind)
        out = algo.advantages(PROMPTS, torch.tensor([1.0, 0.0]), MASK, old_logprobs=old, ref_logprobs=ref)
        kls.append(algo.step_kl)
        token_means.append(out.metrics["kl/old_ref_k3"])
        rhos.append(algo.after_update(PROMPTS, torch.tensor([1.0, 0.0]), MASK)["tracker/rho"])
    assert kls == pytest.approx(STEP_KL, abs=1e-12)
    assert rhos == pytest.approx(RHO, abs=1e-12)
    # the token mean (kept as a metric) reads the same tokens differently: B = 2K/6, S = 12.227.../6 (no clamp)
    assert token_means[0] == pytest.approx(K / 3, abs=1e-12)
    assert token_means[2] == pytest.approx((16 - math.log(16) - 1) / 6, abs=1e-12)


def test_token_mean_aggregation_is_the_other_reading():
    """kl_aggregation=token_mean feeds the rule the global token mean: step 1 (B) gives KL_s = K/3."""
    algo = RLAlgorithm(AlgorithmConfig(baseline=BaselineConfig(kl_aggregation="token_mean")))
    old = torch.full((2, 4), -1.0, dtype=torch.float64)
    algo.advantages(PROMPTS, torch.tensor([1.0, 0.0]), MASK, old_logprobs=old, ref_logprobs=old - log_ratios("B"))
    rho = algo.after_update(PROMPTS, torch.tensor([1.0, 0.0]), MASK)["tracker/rho"]
    assert rho == pytest.approx(0.875 + (K / 3) / 0.01 * 0.085, abs=1e-12)


def test_seq_mean_skips_empty_rows_and_clamps_each_token():
    k3 = torch.tensor([[12.0, 0.5, 9.0], [0.3, 0.0, 0.0], [4.0, 4.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    rows = kl_row_sums(k3, mask)
    # row 0: (min(12, 10) + 0.5) / 2 = 5.25; row 1: 0.3 / 3 = 0.1; row 2 has no token and does not count
    assert step_kl(rows, "seq_mean") == pytest.approx((5.25 + 0.1) / 2, abs=1e-15)
    assert step_kl(rows, "token_mean") == pytest.approx((12.0 + 0.5 + 0.3) / 5, abs=1e-15)
    with pytest.raises(ValueError, match="seq_mean"):
        step_kl(rows, "median")
