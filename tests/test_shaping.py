"""Entropy shaping against hand-worked values, plus the sign-preservation property."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mssr_megatron.algorithms import shape_advantages, shaping_entropy
from mssr_megatron.algorithms.shaping import sampled_token_entropy


def test_hand_worked_values():
    adv = torch.tensor([1.0, -1.0, 0.0])
    entropy = torch.tensor([[0.5, 2.0], [0.5, 2.0], [1.0, 1.0]])
    shaped, metrics = shape_advantages(adv, entropy, torch.ones(3, 2), alpha=0.4, kappa=2.0)
    # psi = min(0.4 H, |A| / 2): row 0: min(0.2, 0.5) = 0.2, min(0.8, 0.5) = 0.5; row 2: |A| = 0 -> 0.
    assert shaped.tolist() == [pytest.approx([1.2, 1.5]), pytest.approx([-0.8, -0.5]), [0.0, 0.0]]
    assert metrics["shaping/capped_frac"] == pytest.approx(4 / 6)  # 0.8 > 0.5 twice, 0.4 > 0 on both row-2 tokens


def test_masked_tokens_are_zero_and_entropy_is_detached():
    adv = torch.tensor([[2.0, 2.0, 2.0]])
    entropy = torch.tensor([[1.0, 1.0, 1.0]], requires_grad=True)
    shaped, _ = shape_advantages(adv, entropy, torch.tensor([[1, 1, 0]]), alpha=0.4, kappa=2.0)
    assert shaped.tolist() == [pytest.approx([2.4, 2.4, 0.0])]
    assert not shaped.requires_grad


def test_entropy_sources():
    lp = torch.log(torch.tensor([[0.5, 0.25]]))
    assert sampled_token_entropy(lp).tolist() == [pytest.approx([0.5 * math.log(2), 0.25 * math.log(4)])]
    full = torch.tensor([[1.5, 0.2]])
    assert torch.equal(shaping_entropy("full", full_entropy=full, logprobs=lp), full)
    assert torch.equal(shaping_entropy("sampled", full_entropy=None, logprobs=lp), sampled_token_entropy(lp))
    with pytest.raises(ValueError, match="full-vocabulary"):
        shaping_entropy("full", full_entropy=None, logprobs=lp)
    with pytest.raises(ValueError, match="unknown entropy source"):
        shaping_entropy("both", full_entropy=full, logprobs=lp)


finite = st.floats(-50, 50, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(finite, st.floats(0, 20)), min_size=1, max_size=40),
    st.floats(0, 5),
    st.floats(1, 10),
)
def test_shaping_never_flips_sign_and_is_bounded(pairs, alpha, kappa):
    adv = torch.tensor([a for a, _ in pairs], dtype=torch.float32)
    entropy = torch.tensor([[h] for _, h in pairs], dtype=torch.float32)
    shaped, _ = shape_advantages(adv, entropy, torch.ones(len(pairs), 1), alpha=alpha, kappa=kappa)
    shaped = shaped[:, 0]
    assert (torch.sign(shaped) * torch.sign(adv) >= 0).all()  # never opposite signs
    assert (shaped[adv == 0] == 0).all()
    psi = shaped - adv
    assert (psi >= -1e-6).all()
    assert (psi <= adv.abs() / kappa + 1e-5).all()
    assert (psi <= alpha * entropy[:, 0] + 1e-5).all()
