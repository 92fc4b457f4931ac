"""Policy loss, aggregation, KL estimators, entropy and cross-modal terms: hand-worked values and gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from mssr_megatron.algorithms import POLICY_LOSSES, aggregate, compute_policy_loss, crossmodal_kl, kl_penalty
from mssr_megatron.algorithms.losses import ppo_clip_token_loss
from mssr_megatron.config import AlgorithmConfig


def plain(**overrides):
    """Only the policy-gradient term (no KL loss), token-mean."""
    return AlgorithmConfig(**{"use_kl_loss": False, **overrides})


def test_registry():
    assert set(POLICY_LOSSES.names()) == {"ppo_clip", "reinforce"}


def test_ppo_clip_hand_worked_cases():
    #            ratio, A  -> loss (clip 0.2 / 0.3, dual clip 3)
    cases = [
        (1.5, 1.0, -1.3, True, False),  # above 1 + 0.3: clipped
        (0.5, 1.0, -0.5, False, False),  # positive A, below range: unclipped term is the max
        (0.5, -1.0, 0.8, True, False),  # negative A, below 1 - 0.2: clipped
        (2.0, -1.0, 2.0, False, False),  # negative A, large ratio under the dual bound
        (4.0, -1.0, 3.0, False, True),  # dual clip bounds -A * ratio at -A * 3
        (1.1, 2.0, -2.2, False, False),  # inside the range
    ]
    ratio = torch.tensor([[c[0] for c in cases]])
    adv = torch.tensor([[c[1] for c in cases]])
    loss, clipped, dual = ppo_clip_token_loss(torch.log(ratio), torch.zeros_like(ratio), adv, 0.2, 0.3, 3.0)
    assert loss[0].tolist() == pytest.approx([c[2] for c in cases], abs=1e-6)
    assert clipped[0].tolist() == [c[3] for c in cases]
    assert dual[0].tolist() == [c[4] for c in cases]
    no_dual, _, _ = ppo_clip_token_loss(torch.log(ratio), torch.zeros_like(ratio), adv, 0.2, 0.3, None)
    assert no_dual[0, 4].item() == pytest.approx(4.0)


def test_aggregation_modes_hand_worked():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last response is empty
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(values, mask, "token-mean", normalizer=8).item() == pytest.approx(10 / 8)
    with pytest.raises(ValueError, match="choose one of"):
        aggregate(values, mask, "token_mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_all_masked_gives_zero_loss_and_zero_gradient(mode):
    logp = torch.randn(2, 4, requires_grad=True)
    cfg = AlgorithmConfig(loss_agg_mode=mode)
    loss, metrics = compute_policy_loss(
        cfg, logp, logp.detach() - 0.1, torch.ones(2, 4), torch.zeros(2, 4), ref_logprobs=torch.zeros(2, 4)
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 4))
    assert all(math.isfinite(v) for v in metrics.values())


def test_micro_batches_with_a_global_normalizer_equal_one_batch():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    old = logp + 0.3 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    adv = torch.randn(6, 1, generator=gen, dtype=torch.float64).expand(6, 5)
    mask = (torch.rand(6, 5, generator=gen) > 0.3).double()
    for mode, count in (("token-mean", mask.sum()), ("seq-mean-token-mean", (mask.sum(-1) > 0).sum())):
        cfg = plain(loss_agg_mode=mode)
        whole = compute_policy_loss(cfg, logp, old, adv, mask)[0]
        parts = sum(compute_policy_loss(cfg, logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2],
                                        normalizer=float(count))[0] for i in (0, 2, 4))
        assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_gradient_matches_hand_derivation():
    # token-mean over 4 tokens, no clipping active (ratio 1): d loss / d logp_t = -A_t * ratio_t / N.
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    loss, _ = compute_policy_loss(plain(), logp, torch.zeros(1, 4, dtype=torch.float64), adv, torch.ones(1, 4))
    loss.backward()
    assert logp.grad.tolist() == [pytest.approx([-0.25, 0.5, -0.125, -0.75])]
    # A clipped token has zero gradient: ratio 1.5 > 1.3 with A > 0.
    logp = torch.log(torch.tensor([[1.5]], dtype=torch.float64)).requires_grad_()
    compute_policy_loss(plain(), logp, torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1), torch.ones(1, 1))[
        0
    ].backward()
    assert logp.grad.item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_full_loss_gradient_matches_finite_differences(mode, estimator):
    gen = torch.Generator().manual_seed(1)
    shape = (3, 4)
    old = torch.randn(shape, generator=gen, dtype=torch.float64) - 1.0
    ref = old + 0.2 * torch.randn(shape, generator=gen, dtype=torch.float64)
    adv = torch.randn(shape, generator=gen, dtype=torch.float64)
    adv[1] = -adv[1].abs()  # negative advantages so that the dual clip can act
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float64)
    # Log-probs away from the clip boundaries (the loss is piecewise smooth), some ratios beyond the dual bound.
    logp = old + torch.tensor([[0.1, -0.4, 0.05, 0.0], [1.5, -0.05, 0.02, 0.1], [0.15, 0, 0, 0]], dtype=torch.float64)
    entropy0 = torch.rand(shape, generator=gen, dtype=torch.float64)
    cfg = AlgorithmConfig(loss_agg_mode=mode, kl_estimator=estimator, kl_loss_coef=0.3, entropy_coef=0.05)

    def f(lp, ent):
        return compute_policy_loss(cfg, lp, old, adv, mask, ref_logprobs=ref, entropy=ent)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(), entropy0.clone().requires_grad_()))


def test_kl_estimators_hand_worked():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])  # log r = 0.5
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.125)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    assert kl_penalty(ref, ref, "k3").item() == 0.0
    assert math.isfinite(kl_penalty(torch.tensor([-200.0]), torch.tensor([0.0]), "k3").item())
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_loss_terms_add_up():
    gen = torch.Generator().manual_seed(2)
    logp, old, ref = (torch.randn(2, 3, generator=gen) for _ in range(3))
    adv, ent, xkl = torch.randn(2, 3, generator=gen), torch.rand(2, 3, generator=gen), torch.rand(2, 3, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    cfg = AlgorithmConfig(kl_loss_coef=0.1, entropy_coef=0.01, crossmodal_coef=0.5)
    total, metrics = compute_policy_loss(cfg, logp, old, adv, mask, ref_logprobs=ref, entropy=ent, crossmodal=xkl)
    pg, _ = POLICY_LOSSES.get("ppo_clip")(logp, old, adv, mask, cfg)
    m = mask.float()
    expected = (
        pg
        + 0.1 * (kl_penalty(logp, ref, "k3") * m).sum() / 5
        - 0.01 * (ent * m).sum() / 5
        + 0.5 * (xkl * m).sum() / 5
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert {"actor/pg_loss", "actor/kl_loss", "actor/entropy", "actor/crossmodal_kl", "actor/pg_clipfrac"} <= set(metrics)
    with pytest.raises(ValueError, match="reference log-probs"):
        compute_policy_loss(cfg, logp, old, adv, mask)


def test_reinforce_loss_is_unclipped():
    cfg = plain(policy_loss="reinforce")
    ratio = torch.tensor([[3.0, 0.5]])
    loss, _ = compute_policy_loss(cfg, torch.log(ratio), torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-(3.0 + 0.5) / 2)


def test_crossmodal_kl_matches_plain_python_and_has_gradients():
    gen = torch.Generator().manual_seed(3)
    with_img = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    text_only = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    kl = crossmodal_kl(with_img, text_only, temperature=0.7)
    for b in range(2):
        for t in range(3):
            zp = [math.exp(x / 0.7) for x in with_img[b, t].tolist()]
            zq = [math.exp(x / 0.7) for x in text_only[b, t].tolist()]
            p, q = [x / sum(zp) for x in zp], [x / sum(zq) for x in zq]
            assert kl[b, t].item() == pytest.approx(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)), rel=1e-5)
    assert crossmodal_kl(with_img, with_img).abs().max().item() < 1e-6
    assert torch.autograd.gradcheck(
        lambda a, b: crossmodal_kl(a, b).to(torch.float64),
        (with_img[:1, :2].clone().requires_grad_(), text_only[:1, :2].clone().requires_grad_()),
    )


# ------------------------------------------------------------------------------- rollout correction (TIS)
def _tis_case():
    """A 2x3 micro-batch worked out by hand. Per token: PPO ratio r = exp(logp - old), TIS weight
    w = min(exp(old - rollout), 2), advantage A; clip 0.2 / 0.3, dual clip 3.

        token  A   r    ppo-clip loss                          old - rollout   w            w * loss
        (0,0)  1   1.1  -1.1 (inside the range)                log 1.5         1.5          -1.65
        (0,1)  1   1.5  -1.3 (clipped at 1 + 0.3)              log 4           2 (capped)   -2.6
        (0,2)  masked: padding, no rollout log-prob (-inf)                     0            -
        (1,0)  -1  4.0  3.0  (dual clip: min(4, 3))            log 0.5         0.5          1.5
        (1,1)  -2  0.5  1.6  (clipped at 1 - 0.2: 2 * 0.8)     0               1            1.6
        (1,2)  -1  1.0  1.0                                    log 0.8         0.8          0.8
    token-mean over the 5 response tokens: pg = (-1.65 - 2.6 + 1.5 + 1.6 + 0.8) / 5 = -0.07 (0.64 without TIS).
    KL (k1 = logp - ref): 0.2, 0.1 | 0.3, -0.1, 0 -> mean 0.1; entropy 0.5, 0.25 | 1, 0.25, 0.5 -> mean 0.5.
    """
    d = torch.float64
    log = math.log
    old = torch.tensor([[-1.0, -2.0, 0.0], [-2.0, -1.5, -1.0]], dtype=d)
    logp = old + torch.tensor([[log(1.1), log(1.5), 0.0], [log(4.0), log(0.5), 0.0]], dtype=d)
    rollout = old - torch.tensor([[log(1.5), log(4.0), float("inf")], [log(0.5), 0.0, log(0.8)]], dtype=d)
    adv = torch.tensor([[1.0, 1.0, 5.0], [-1.0, -2.0, -1.0]], dtype=d)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=d)
    ref = logp - torch.tensor([[0.2, 0.1, 7.0], [0.3, -0.1, 0.0]], dtype=d)
    entropy = torch.tensor([[0.5, 0.25, 9.0], [1.0, 0.25, 0.5]], dtype=d)
    return logp, old, rollout, adv, mask, ref, entropy


def test_tis_loss_matches_the_hand_worked_reference():
    logp, old, rollout, adv, mask, ref, entropy = _tis_case()
    cfg = AlgorithmConfig(rollout_correction="tis", tis_cap=2.0, kl_estimator="k1", kl_loss_coef=0.1,
                          entropy_coef=0.01)
    logp = logp.clone().requires_grad_()
    loss, metrics = compute_policy_loss(cfg, logp, old, adv, mask, ref_logprobs=ref, rollout_logprobs=rollout,
                                        entropy=entropy)
    # pg -0.07; the KL and entropy terms are not weighted: + 0.1 * 0.1 - 0.01 * 0.5
    assert metrics["actor/pg_loss"] == pytest.approx(-0.07, abs=1e-12)
    assert loss.item() == pytest.approx(-0.07 + 0.01 - 0.005, abs=1e-12)
    assert metrics["actor/tis_weight_mean"] == pytest.approx((1.5 + 2 + 0.5 + 1 + 0.8) / 5, abs=1e-12)
    assert metrics["actor/tis_capped_frac"] == pytest.approx(1 / 5)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(2 / 5) and metrics["actor/pg_clipfrac_dual"] == 0.2
    # d loss / d logp: only unclipped tokens carry the pg gradient, -A * r * w / 5 (w is a constant), plus the KL's
    # 0.1 / 5 on every response token: (0,0) -1.1 * 1.5 / 5 + 0.02, (1,2) 1 * 1 * 0.8 / 5 + 0.02, clipped ones 0.02.
    loss.backward()
    expected = torch.tensor([[-0.33 + 0.02, 0.02, 0.0], [0.02, 0.02, 0.16 + 0.02]], dtype=torch.float64)
    assert torch.allclose(logp.grad, expected, atol=1e-12), logp.grad
    # Without the correction the same tokens give pg 0.64.
    plain_loss, _ = compute_policy_loss(plain(), logp.detach(), old, adv, mask)
    assert plain_loss.item() == pytest.approx(3.2 / 5, abs=1e-12)


def test_tis_needs_the_rollout_logprobs():
    logp, old, _, adv, mask, _, _ = _tis_case()
    with pytest.raises(ValueError, match="rollout_correction=tis but no rollout log-probs"):
        compute_policy_loss(plain(rollout_correction="tis"), logp, old, adv, mask)


@pytest.mark.parametrize("policy_loss", ["ppo_clip", "reinforce"])
def test_no_correction_leaves_the_loss_bit_equal(policy_loss):
    gen = torch.Generator().manual_seed(4)
    logp, old, ref, ent = (torch.randn(3, 5, generator=gen) - 1.0 for _ in range(4))
    adv = torch.randn(3, 5, generator=gen)
    mask = (torch.rand(3, 5, generator=gen) > 0.3).float()
    cfg = AlgorithmConfig(policy_loss=policy_loss, entropy_coef=0.01)
    assert cfg.rollout_correction == "none"

    def loss_and_grad(**extra):
        x = logp.clone().requires_grad_()
        loss, _ = compute_policy_loss(cfg, x, old, adv, mask, ref_logprobs=ref, entropy=ent, **extra)
        loss.backward()
        return loss.detach(), x.grad

    # The terms composed by hand from the unweighted pieces, as compute_policy_loss adds them.
    if policy_loss == "ppo_clip":
        pg = ppo_clip_token_loss(logp, old, adv, 0.2, 0.3, 3.0)[0]
    else:
        pg = -adv * torch.exp(logp - old)
    reference = (aggregate(pg, mask, "token-mean") + 0.01 * aggregate(kl_penalty(logp, ref, "k3"), mask, "token-mean")
                 - 0.01 * aggregate(ent, mask, "token-mean"))
    without, grad_without = loss_and_grad()
    wild = torch.randn(3, 5, generator=gen) * 5  # far from the trainer's: would change a corrected loss
    ignored, grad_ignored = loss_and_grad(rollout_logprobs=wild)
    assert torch.equal(without, reference) and torch.equal(ignored, without) and torch.equal(grad_ignored, grad_without)
    # TIS with the engine agreeing exactly (every w = exp(0) = 1) is bit-equal too.
    cfg.rollout_correction = "tis"
    agreeing, grad_agreeing = loss_and_grad(rollout_logprobs=old.clone())
    assert torch.equal(agreeing, without) and torch.equal(grad_agreeing, grad_without)
