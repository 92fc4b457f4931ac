"""The released entropy-loss ablation (issue 13 item 6): loss -= entropy_coef * token-mean of the sampled token's
-p log p, WITH its gradient, through the fused log-prob op the trainer uses, against an unfused autograd computation
from the logits (log_softmax + gather) and a hand-worked value."""

from __future__ import annotations

import math

import pytest
import torch

from mssr_megatron.algorithms.losses import compute_policy_loss, entropy_loss_term
from mssr_megatron.config import AlgorithmConfig, load_config
from mssr_megatron.ops import vocab_parallel_logprobs_entropy

B, T, V = 3, 5, 11
MASK = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float64)


def _inputs():
    g = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    target = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    return logits, target, adv


def _ours(logits, target, adv, cfg):
    """The trainer's path: fused op -> (logprobs, full entropy) -> compute_policy_loss."""
    x = logits.clone().requires_grad_()
    lp, h = vocab_parallel_logprobs_entropy(x, target, chunk_size=4)
    loss, metrics = compute_policy_loss(cfg, lp, lp.detach(), adv, MASK, entropy=h)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, metrics


def _unfused(logits, target, adv, coef):
    """Reference: log_softmax + gather, the PPO term at ratio 1 (-A, as the loss value; its gradient is -A dlogp),
    and the sampled-token entropy term -coef * token-mean(-p log p), all by autograd."""
    x = logits.clone().requires_grad_()
    lp = torch.log_softmax(x, -1).gather(-1, target[..., None])[..., 0]
    ratio = torch.exp(lp - lp.detach())
    pg = (-adv * ratio * MASK).sum() / MASK.sum()
    sampled_h = -lp.exp() * lp
    loss = pg - coef * (sampled_h * MASK).sum() / MASK.sum()
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def test_sampled_entropy_loss_value_and_gradient_match_unfused_autograd():
    logits, target, adv = _inputs()
    cfg = AlgorithmConfig(entropy_coef=0.01, entropy_loss_source="sampled", use_kl_loss=False)
    loss, grad, metrics = _ours(logits, target, adv, cfg)
    ref_loss, ref_grad = _unfused(logits, target, adv, 0.01)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12, rtol=0)
    # the term is not vacuous: without it the gradient differs
    _, grad_off = _unfused(logits, target, adv, 0.0)
    assert (grad - grad_off).abs().max() > 1e-4
    assert 0 < metrics["actor/entropy_loss_term"] <= 1 / math.e


def test_full_source_still_uses_the_full_vocabulary_entropy():
    logits, target, adv = _inputs()
    sampled = _ours(logits, target, adv, AlgorithmConfig(entropy_coef=0.01, entropy_loss_source="sampled",
                                                          use_kl_loss=False))
    full = _ours(logits, target, adv, AlgorithmConfig(entropy_coef=0.01, use_kl_loss=False))
    x = torch.log_softmax(logits, -1)
    h = -(x.exp() * x).sum(-1)
    assert full[2]["actor/entropy_loss_term"] == pytest.approx(float((h * MASK).sum() / MASK.sum()), abs=1e-12)
    assert not torch.allclose(full[1], sampled[1])


def test_sampled_term_hand_worked():
    """p = 1/2: -p log p = ln(2)/2 = 0.3465736; d/dlogp (-p log p) = -p (1 + log p) = -(1 - ln 2)/2 = -0.1534264."""
    lp = torch.tensor([math.log(0.5)], dtype=torch.float64, requires_grad=True)
    term = entropy_loss_term("sampled", entropy=None, logprobs=lp)
    (g,) = torch.autograd.grad(term.sum(), lp)
    assert term.item() == pytest.approx(0.34657359027997264, abs=1e-15)
    assert g.item() == pytest.approx(-0.15342640972002736, abs=1e-15)
    with pytest.raises(ValueError, match="entropy_loss_source=full"):
        entropy_loss_term("full", entropy=None, logprobs=lp)


def test_released_entropy_loss_config():
    cfg = load_config("examples/configs/qwen2_5_vl_7b_mvsr_entropy_loss.yaml")
    a = cfg.algorithm
    assert (a.estimator, a.shaping_enabled(), a.entropy_coef, a.entropy_loss_source) == ("mvsr", False, 0.01,
                                                                                            "sampled")
    assert (a.baseline.kl_window, a.baseline.kl_aggregation) == (10, "seq_mean")
