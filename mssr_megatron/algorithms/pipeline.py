"""One object that owns an RL step's algorithmic state: the estimator choice, the Beta tracker and its forgetting rule.

The trainer calls, in order:
    algo.initialize(prompt_ids, rewards)                       # once, before step 0 (tracker estimators only)
    out = algo.advantages(prompt_ids, rewards, mask, ...)      # reads the tracker BEFORE this step's update
    adv = algo.shape(out.advantages, mask, entropy=..., logprobs=...)   # per token, detached
    loss, metrics = algo.loss(logprobs, old_logprobs, adv, mask, ...)  # per micro-batch
    algo.after_update(prompt_ids, rewards, kl=..., old_logprobs=..., new_logprobs=..., mask=...)
Estimators that use no tracker (grpo, rloo, ...) skip the tracker calls silently, so the loop never branches on them.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from mssr_megatron.algorithms.advantages import ESTIMATORS, AdvantageBatch, AdvantageOutput, compute_advantages
from mssr_megatron.algorithms.baseline_tracker import BetaBaselineTracker
from mssr_megatron.algorithms.forgetting import build_forgetting_rule
from mssr_megatron.algorithms.losses import compute_policy_loss
from mssr_megatron.algorithms.shaping import shape_advantages, shaping_entropy


class RLAlgorithm:
    """Estimator + (for mssr/mvsr) the Beta baseline tracker and its forgetting rule, built from an AlgorithmConfig."""

    def __init__(self, cfg, dp_group=None):
        self.cfg = cfg
        self.spec = ESTIMATORS.get(cfg.estimator)
        self.dp_group = dp_group
        self.shaping = cfg.shaping_enabled()
        self.tracker: BetaBaselineTracker | None = None
        self.rule = None
        if self.spec.uses_tracker:
            self.tracker = BetaBaselineTracker(n0=cfg.baseline.effective_n0, prior_mean=cfg.baseline.prior_mean)
            self.rule = build_forgetting_rule(cfg.baseline)
        self.last_rho: float | torch.Tensor | None = None

    def initialize(self, prompt_ids: Sequence[Hashable], rewards: torch.Tensor) -> None:
        """Seed the tracker from an initial pass of the starting policy (no-op without a tracker)."""
        if self.tracker is not None:
            self.tracker.initialize(prompt_ids, rewards, smoothing=self.cfg.baseline.init_smoothing)

    def advantages(
        self,
        prompt_ids: Sequence[Hashable],
        rewards: torch.Tensor,
        mask: torch.Tensor,
        group_index: torch.Tensor | None = None,
        token_kl: torch.Tensor | None = None,
    ) -> AdvantageOutput:
        """Per-token advantages [B, T] for this step's rollouts, with estimator and tracker metrics."""
        baseline = self.tracker.baseline(prompt_ids) if self.tracker is not None else None
        batch = AdvantageBatch(rewards, mask, group_index=group_index, baseline=baseline, token_kl=token_kl)
        out = compute_advantages(self.cfg.estimator, batch, self.cfg, group=self.dp_group)
        if self.tracker is not None:
            out.metrics.update(self.tracker.metrics(prompt_ids))
        return out

    def shape(
        self,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        *,
        entropy: torch.Tensor | None = None,
        logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Entropy-shaped advantages when shaping is on for this estimator, else the advantages unchanged."""
        if not self.shaping:
            return advantages, {}
        h = shaping_entropy(self.cfg.entropy_source, full_entropy=entropy, logprobs=logprobs)
        return shape_advantages(advantages, h, mask, self.cfg.shaping_alpha, self.cfg.shaping_kappa)

    def loss(self, logprobs, old_logprobs, advantages, mask, **terms) -> tuple[torch.Tensor, dict[str, float]]:
        """The actor loss of one micro-batch (see `compute_policy_loss` for the terms)."""
        return compute_policy_loss(self.cfg, logprobs, old_logprobs, advantages, mask, **terms)

    def after_update(
        self,
        prompt_ids: Sequence[Hashable],
        rewards: torch.Tensor,
        *,
        kl: float | None = None,
        old_logprobs: torch.Tensor | None = None,
        new_logprobs: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Pick rho with the forgetting rule and fold this step's rewards into the tracker."""
        if self.tracker is None:
            return {}
        rho = self.rule.step_rho(kl=kl, old_logprobs=old_logprobs, new_logprobs=new_logprobs, mask=mask)
        self.tracker.update(prompt_ids, rewards, rho)
        self.last_rho = rho
        return {"tracker/rho": float(torch.as_tensor(rho, dtype=torch.float64).mean())}

    def state_dict(self) -> dict:
        if self.tracker is None:
            return {}
        return {"tracker": self.tracker.state_dict(), "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is None:
            return
        self.tracker.load_state_dict(state["tracker"])
        self.rule.load_state_dict(state["rule"])
