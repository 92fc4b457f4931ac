"""Advantage estimators against hand-worked values and a plain-Python reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mssr_megatron.algorithms import ESTIMATORS, AdvantageBatch, compute_advantages
from mssr_megatron.algorithms.advantages import batch_normalize
from mssr_megatron.config import AlgorithmConfig

CFG = AlgorithmConfig()


def batch(rewards, mask=None, groups=None, baseline=None, token_kl=None):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    mask = torch.ones(len(rewards), 3) if mask is None else torch.tensor(mask, dtype=torch.float32)
    return AdvantageBatch(
        rewards=rewards,
        response_mask=mask,
        group_index=None if groups is None else torch.tensor(groups),
        baseline=None if baseline is None else torch.tensor(baseline, dtype=torch.float64),
        token_kl=None if token_kl is None else torch.tensor(token_kl, dtype=torch.float32),
    )


def seq(out):
    """Sequence-level advantage of each row (first response token)."""
    return out.advantages[:, 0].tolist()


def test_registry_has_every_estimator():
    assert set(ESTIMATORS.names()) == {"mssr", "mvsr", "grpo", "drgrpo", "rloo", "reinforce_pp"}
    with pytest.raises(KeyError, match="did you mean 'grpo'"):
        ESTIMATORS.get("gpro")


def test_mssr_hand_worked():
    # A = r - v = [0.5, -0.25, 0.25, 0.5]; mean 0.25; biased var 0.09375; std 0.306186...
    out = compute_advantages("mssr", batch([1, 0, 1, 1], baseline=[0.5, 0.25, 0.75, 0.5]), CFG)
    k = 0.25 / math.sqrt(0.09375)
    assert seq(out) == pytest.approx([k, -2 * k, 0.0, k], abs=1e-6)
    assert out.metrics["adv/mean"] == pytest.approx(0.0, abs=1e-9)
    assert out.metrics["adv/std"] == pytest.approx(1.0, abs=1e-6)


def test_mvsr_equals_mssr_advantage():
    b = batch([1, 0, 0, 1, 1], baseline=[0.1, 0.9, 0.5, 0.5, 0.2])
    assert torch.equal(compute_advantages("mvsr", b, CFG).advantages, compute_advantages("mssr", b, CFG).advantages)
    assert ESTIMATORS.get("mssr").shaping_default and not ESTIMATORS.get("mvsr").shaping_default


def test_mssr_all_equal_and_single_rollout_give_zero():
    assert seq(compute_advantages("mssr", batch([1, 1, 1], baseline=[0.5] * 3), CFG)) == [0.0] * 3
    assert seq(compute_advantages("mssr", batch([1], baseline=[0.3]), CFG)) == [0.0]


def test_mssr_variance_floor():
    # A = [0, 0.001]: biased var 2.5e-7 < 1e-6, so the scale is sqrt(1e-6) = 1e-3.
    out = compute_advantages("mssr", batch([0.5, 0.501], baseline=[0.5, 0.5]), CFG)
    assert seq(out) == pytest.approx([-0.5, 0.5], abs=1e-3)


def test_mssr_needs_baseline():
    with pytest.raises(ValueError, match="baseline"):
        compute_advantages("mssr", batch([1, 0]), CFG)


def test_grpo_hand_worked():
    # Group 0: rewards 1,0,0 -> mean 1/3, unbiased std sqrt(1/3). Group 1: all 1 -> 0.
    out = compute_advantages("grpo", batch([1, 0, 0, 1, 1, 1], groups=[0, 0, 0, 1, 1, 1]), CFG)
    s = math.sqrt(1 / 3)
    assert seq(out) == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0, 0, 0], abs=1e-5)


def test_drgrpo_and_rloo_hand_worked():
    b = batch([1, 0, 0, 1, 1, 1], groups=[7, 7, 7, 3, 3, 3])  # arbitrary labels
    assert seq(compute_advantages("drgrpo", b, CFG)) == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], abs=1e-6)
    # RLOO: 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -0.5.
    assert seq(compute_advantages("rloo", b, CFG)) == pytest.approx([1, -0.5, -0.5, 0, 0, 0], abs=1e-6)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_group_estimators_singleton_groups_are_zero_not_nan(name):
    out = compute_advantages(name, batch([1, 0, 1], groups=[0, 1, 2]), CFG)
    assert seq(out) == [0.0, 0.0, 0.0]
    assert out.metrics["adv/singleton_group_frac"] == 1.0
    with pytest.raises(ValueError, match="group_index"):
        compute_advantages(name, batch([1, 0]), CFG)


def reinforce_pp_reference(rewards, mask, kl=None, coef=0.0, floor=1e-6):
    """Plain-Python REINFORCE++: token rewards, reverse cumulative sum, whitening over response tokens."""
    returns = []
    for i, row in enumerate(mask):
        n = int(sum(row))
        token_r = [(-coef * kl[i][t] if kl else 0.0) for t in range(n)]
        if n:
            token_r[-1] += rewards[i]
        g, acc = [], 0.0
        for x in reversed(token_r):
            acc += x
            g.append(acc)
        returns.append(list(reversed(g)) + [None] * (len(row) - n))
    flat = [x for r in returns for x in r if x is not None]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / len(flat)
    scale = math.sqrt(max(var, floor))
    return [[0.0 if x is None else (x - mean) / scale for x in r] for r in returns]


def test_reinforce_pp_without_kl():
    mask = [[1, 1, 0], [1, 1, 1]]
    out = compute_advantages("reinforce_pp", batch([1, 0], mask=mask), CFG)
    # Returns [1, 1 | 0, 0, 0] over 5 tokens: mean 0.4, std sqrt(0.24).
    s = math.sqrt(0.24)
    expected = [[0.6 / s, 0.6 / s, 0.0], [-0.4 / s] * 3]
    assert out.advantages.tolist() == [pytest.approx(r, abs=1e-5) for r in expected]


def test_reinforce_pp_with_kl_in_reward():
    mask = [[1, 1, 0], [1, 1, 1], [0, 0, 0]]
    kl = [[0.1, 0.2, 0.0], [0.3, 0.1, 0.2], [0.0, 0.0, 0.0]]
    cfg = AlgorithmConfig(estimator="reinforce_pp", kl_in_reward=True, kl_reward_coef=0.5)
    out = compute_advantages("reinforce_pp", batch([1, 0, 1], mask=mask, token_kl=kl), cfg)
    expected = reinforce_pp_reference([1, 0, 1], mask, kl, 0.5)
    assert out.advantages.tolist() == [pytest.approx(r, abs=1e-5) for r in expected]
    with pytest.raises(ValueError, match="token_kl"):
        compute_advantages("reinforce_pp", batch([1, 0], mask=[[1, 1, 1]] * 2), cfg)


@pytest.mark.parametrize("name", sorted(ESTIMATORS.names()))
def test_masked_tokens_and_zero_length_responses(name):
    mask = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    b = batch([1, 0, 1, 0], mask=mask, groups=[0, 0, 1, 1], baseline=[0.2, 0.4, 0.6, 0.8])
    b.token_kl = torch.zeros(4, 4)
    adv = compute_advantages(name, b, CFG).advantages
    assert torch.isfinite(adv).all()
    assert (adv[torch.tensor(mask) == 0] == 0).all()
    assert adv.shape == (4, 4) and adv.dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=64))
def test_batch_normalisation_is_standard_when_variance_is_not_degenerate(values):
    x = torch.tensor(values, dtype=torch.float64)
    if x.var(unbiased=False) <= 1e-5:
        return
    y = batch_normalize(x, 1e-6)
    assert float(y.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(y.std(unbiased=False)) == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.0]), min_size=2, max_size=32), st.data())
def test_mssr_matches_plain_python(rewards, data):
    baseline = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(rewards), max_size=len(rewards)))
    adv = [r - v for r, v in zip(rewards, baseline)]
    mean = sum(adv) / len(adv)
    var = sum((a - mean) ** 2 for a in adv) / len(adv)
    expected = [(a - mean) / math.sqrt(max(var, 1e-6)) for a in adv]
    out = compute_advantages("mssr", batch(rewards, baseline=baseline), CFG)
    assert seq(out) == pytest.approx(expected, abs=1e-4)
