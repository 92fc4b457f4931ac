"""The Beta baseline tracker and the three forgetting rules, against hand-worked values."""

from __future__ import annotations

import io
import math

import pytest
import torch

from mssr_megatron.algorithms import BetaBaselineTracker, build_forgetting_rule
from mssr_megatron.algorithms.forgetting import ConstantRho, KLWindowRho, SPORho, spo_distance
from mssr_megatron.config import BaselineConfig


def ab(tracker, pid):
    a, b = tracker.params([pid])
    return float(a[0]), float(b[0])


def test_initialise_mean_rule():
    t = BetaBaselineTracker(n0=8.0)
    t.initialize(["a", "a", "b", "b", "c", "c"], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    assert ab(t, "a") == (8.0, 0.0) and ab(t, "b") == (4.0, 4.0) and ab(t, "c") == (0.0, 8.0)
    assert t.baseline(["a", "b", "c"]).tolist() == [1.0, 0.5, 0.0]


def test_initialise_spo_laplace_rule():
    t = BetaBaselineTracker(n0=8.0)
    t.initialize([1, 1, 2, 2, 3], torch.tensor([1.0, 1, 1, 0, 0]), smoothing="spo")
    # s=2,n=2: a = 8 * 2.5 / 3, b = 8 * 0.5 / 3;  s=1,n=2: a = b = 8 * 1.5 / 3 = 4;  s=0,n=1: a = 8 * 0.5 / 2 = 2, b = 6.
    assert ab(t, 1) == pytest.approx((20 / 3, 4 / 3))
    assert ab(t, 2) == pytest.approx((4.0, 4.0))
    assert ab(t, 3) == pytest.approx((2.0, 6.0))
    with pytest.raises(ValueError, match="smoothing"):
        t.initialize([1], torch.tensor([1.0]), smoothing="laplace")


def test_unseen_prompts_read_the_prior_and_count_against_coverage():
    t = BetaBaselineTracker(n0=8.0)
    t.initialize(["seen"], torch.tensor([1.0]))
    assert t.baseline(["new", "seen"]).tolist() == [0.5, 1.0]
    assert ab(t, "new") == (4.0, 4.0)
    assert t.coverage(["new", "seen"]) == 0.5
    assert len(t) == 1  # reading never inserts
    t2 = BetaBaselineTracker(n0=10.0, prior_mean=0.3)
    assert ab(t2, "x") == pytest.approx((3.0, 7.0))


def test_update_rule_hand_worked():
    t = BetaBaselineTracker(n0=8.0)
    t.initialize(["p", "q"], torch.tensor([1.0, 0.0]))  # p: (8, 0); q: (0, 8)
    t.update(["p", "q", "new"], torch.tensor([0.0, 1.0, 1.0]), rho=0.9)
    assert ab(t, "p") == pytest.approx((7.2, 1.0))
    assert ab(t, "q") == pytest.approx((1.0, 7.2))
    assert ab(t, "new") == pytest.approx((0.9 * 4 + 1, 0.9 * 4))  # inserted with the prior, then updated
    assert t.baseline(["p"]).item() == pytest.approx(7.2 / 8.2)


def test_update_with_several_rollouts_of_a_prompt_and_per_rollout_rho():
    t = BetaBaselineTracker(n0=8.0)
    t.initialize(["p"], torch.tensor([0.5]))  # (4, 4)
    # Forgetting applies once per step; both rewards are added; rho of the prompt = mean(0.9, 0.95) = 0.925.
    t.update(["p", "p"], torch.tensor([1.0, 0.0]), rho=torch.tensor([0.9, 0.95]))
    assert ab(t, "p") == pytest.approx((0.925 * 4 + 1, 0.925 * 4 + 1))


def test_bad_lengths_and_bad_construction_fail_clearly():
    t = BetaBaselineTracker(n0=8.0)
    with pytest.raises(ValueError, match="2 values for 3 prompt ids"):
        t.update(["a", "b", "c"], torch.tensor([1.0, 0.0]), rho=0.9)
    with pytest.raises(ValueError, match="n0"):
        BetaBaselineTracker(n0=0)


def test_state_round_trip_is_exact_and_continues_identically():
    gen = torch.Generator().manual_seed(0)
    ids = [f"prompt-{i}" for i in range(300)] + list(range(200))
    a, b = BetaBaselineTracker(n0=8.0, capacity=4), None
    a.initialize(ids, torch.randint(0, 2, (len(ids),), generator=gen).double())
    for _ in range(3):
        pick = torch.randint(0, len(ids), (64,), generator=gen).tolist()
        a.update([ids[i] for i in pick], torch.randint(0, 2, (64,), generator=gen).double(), rho=0.93)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = BetaBaselineTracker(n0=1.0)
    b.load_state_dict(torch.load(buffer))
    assert b.state_dict()["prompt_ids"] == a.state_dict()["prompt_ids"]
    assert torch.equal(b.baseline(ids), a.baseline(ids)) and b.n0 == 8.0
    pick = [ids[i] for i in torch.randint(0, len(ids), (128,), generator=gen).tolist()] + ["fresh"]
    rewards = torch.randint(0, 2, (len(pick),), generator=gen).double()
    for t in (a, b):
        t.update(pick, rewards, rho=torch.full((len(pick),), 0.91))
    assert torch.equal(a.state_dict()["alpha"], b.state_dict()["alpha"])
    assert torch.equal(a.state_dict()["beta"], b.state_dict()["beta"])


def test_corrupt_state_is_rejected():
    t = BetaBaselineTracker(n0=8.0)
    t.initialize(["a", "b"], torch.tensor([1.0, 0.0]))
    state = t.state_dict()
    state["alpha"] = state["alpha"][:1]
    with pytest.raises(ValueError, match="corrupt tracker state"):
        BetaBaselineTracker(n0=8.0).load_state_dict(state)


def test_memory_is_proportional_to_prompts_seen():
    t = BetaBaselineTracker(n0=8.0, capacity=1)
    t.update(list(range(5000)), torch.ones(5000), rho=0.9)
    assert len(t) == 5000
    assert t._alpha.numel() < 2 * 5000  # doubling growth, no fixed table


def test_kl_window_rule_hand_worked():
    rule = KLWindowRho(rho_min=0.875, rho_max=0.96, kl_target=0.01, kl_window=3)
    span = 0.96 - 0.875
    assert rule.step_rho(kl=0.005) == pytest.approx(0.875 + 0.5 * span)  # window mean 0.005
    assert rule.step_rho(kl=0.02) == pytest.approx(0.875)  # mean 0.0125 > target
    assert rule.step_rho(kl=0.002) == pytest.approx(0.875 + 0.9 * span)  # mean 0.009
    assert rule.step_rho(kl=0.0) == pytest.approx(0.875 + (0.022 / 3 / 0.01) * span)  # oldest value left the window
    clone = KLWindowRho(0.875, 0.96, 0.01, 3)
    clone.load_state_dict(rule.state_dict())
    assert clone.step_rho(kl=0.004) == rule.step_rho(kl=0.004)
    with pytest.raises(ValueError, match="kl"):
        rule.step_rho()


def test_spo_rule_hand_worked():
    rule = SPORho(rho_min=0.875, rho_max=0.96, spo_d_half=0.06)
    old = torch.tensor([[-1.0, -2.0], [-1.0, -1.0], [-0.5, -0.5], [0.0, 0.0]])
    new = torch.tensor([[-1.06, -1.94], [-1.006, -0.994], [-0.5, -0.5], [5.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 0]])
    rho = rule.step_rho(distance=spo_distance(old, new, mask))
    # D = 0.06 -> 2^-1 = 0.5 -> clipped to 0.875;  D = 0.006 -> 2^-0.1;  D = 0 -> 1 -> 0.96;  empty response -> 0.96.
    assert rho.tolist() == pytest.approx([0.875, 2 ** -0.1, 0.96, 0.96])
    assert math.isclose(2 ** -0.1, 0.9330329915368074)


def test_constant_rule_and_factory():
    assert ConstantRho(0.9).step_rho(kl=123.0) == 0.9
    assert isinstance(build_forgetting_rule(BaselineConfig()), KLWindowRho)
    assert isinstance(build_forgetting_rule(BaselineConfig(rho_rule="spo")), SPORho)
    assert build_forgetting_rule(BaselineConfig(rho_rule="constant", constant_rho=0.93)).step_rho() == 0.93
