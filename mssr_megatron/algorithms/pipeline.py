"""One object that owns an RL step's algorithmic state: the estimator choice, the Beta tracker and its forgetting rule.

The trainer calls, in order, on every rank:
    algo.initialize(prompt_ids, rewards)                       # once, before step 0 (tracker estimators only)
    out = algo.advantages(prompt_ids, rewards, mask, group_index, rows=rows, old_logprobs=old, ref_logprobs=ref)
    adv = algo.shape(out.advantages, mask[rows], entropy=..., logprobs=old)   # per token, detached
    loss, metrics = algo.loss(logprobs, old_logprobs, adv, mask, ...)        # per micro-batch
    algo.after_update(prompt_ids, rewards, mask, rows=rows, ...)   # spo: + the policy's log-probs after the update
Estimators that use no tracker (grpo, rloo, ...) skip the tracker calls silently, so the loop never branches on them.

Data parallelism. prompt_ids, rewards, mask [B, T] and group_index describe the WHOLE step and are the same on every
rank; log-probs are this data-parallel replica's: [len(rows), T] for its rows (replica r of `dp_group` holds the r-th
contiguous block, rl_step.data_parallel_rows), on the last pipeline stage only (None on the others). Everything that
feeds the advantages, the tracker or the forgetting rule is a statistic of the GLOBAL batch, and every data-parallel
reduction of it happens in this module, through `_global_rows`: each replica computes per-row statistics of its rows,
an all_gather puts them in global row order, and every rank reduces the same tensor in the same order. So the result
is bit-identical on every rank and equal to one process given the same per-row values (an all-reduce of partial sums
would round differently from one process's sum: it depends on the split). What is gathered, per step:
  - each row's k3 KL(old || ref) sum, clamped sum and token count (forgetting.kl_row_sums): the step's KL, as the
    token mean (kl/old_ref_k3) and the mean of per-sequence means (kl/old_ref_k3_seq_mean); the kl_window rule reads
    the one algorithm.baseline.kl_aggregation names;
  - with algorithm.kl_in_reward, each row's per-token k3 [rows, T] -> [B, T] (REINFORCE++'s token rewards; the
    estimator's cumulative sums and normalisation then run on the whole batch, exactly as in one process);
  - after the update (spo rule), each row's drift D and its log-probs [rows, T] -> [B, T], kept per prompt.
Pipeline stages other than the last have no log-probs: they get no advantages (the loss runs on the last stage) and
receive the forgetting rule's inputs from the last stage over `stage_group`, so their tracker stays the same too.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from mssr_megatron.algorithms.advantages import ESTIMATORS, AdvantageBatch, AdvantageOutput, compute_advantages
from mssr_megatron.algorithms.baseline_tracker import BetaBaselineTracker
from mssr_megatron.algorithms.distributed import (
    block_of_rows,
    from_last_rank,
    gather_rows,
    is_last_rank,
    state_digest,
)
from mssr_megatron.algorithms.forgetting import SPORho, build_forgetting_rule, kl_row_sums, step_kl
from mssr_megatron.algorithms.losses import compute_policy_loss, kl_penalty
from mssr_megatron.algorithms.shaping import shape_advantages, shaping_entropy


class RLAlgorithm:
    """Estimator + (for mssr/mvsr) the Beta baseline tracker and its forgetting rule, built from an AlgorithmConfig.

    dp_group: the data-parallel group whose replicas hold the step's rows in blocks (None: one replica);
    stage_group: the pipeline-parallel group, whose highest rank (the last stage) has the log-probs (None: one stage).
    """

    def __init__(self, cfg, dp_group=None, stage_group=None):
        self.cfg = cfg
        self.spec = ESTIMATORS.get(cfg.estimator)
        self.dp_group = dp_group
        self.stage_group = stage_group
        self.shaping = cfg.shaping_enabled()
        self.tracker: BetaBaselineTracker | None = None
        self.rule = None
        if self.spec.uses_tracker:
            self.tracker = BetaBaselineTracker(n0=cfg.baseline.effective_n0, prior_mean=cfg.baseline.prior_mean)
            self.rule = build_forgetting_rule(cfg.baseline)
        self.last_rho: float | torch.Tensor | None = None
        self.step_kl: float | None = None
        """The step's global k3 KL(old || ref) as algorithm.baseline.kl_aggregation reads it, measured by advantages()
        (last stage), read by after_update()."""

    @property
    def needs_new_logprobs(self) -> bool:
        """Whether after_update needs the policy's log-probs after the update, on this step's responses and on each
        prompt's previous response (the spo rule); every pipeline stage must then run those forward passes."""
        return isinstance(self.rule, SPORho)

    def initialize(self, prompt_ids: Sequence[Hashable], rewards: torch.Tensor) -> None:
        """Seed the tracker from an initial pass of the starting policy (no-op without a tracker)."""
        if self.tracker is not None:
            self.tracker.initialize(prompt_ids, self._tracker_rewards(rewards),
                                    smoothing=self.cfg.baseline.init_smoothing)

    def advantages(
        self,
        prompt_ids: Sequence[Hashable],
        rewards: torch.Tensor,
        mask: torch.Tensor,
        group_index: torch.Tensor | None = None,
        *,
        rows: torch.Tensor | None = None,
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
    ) -> AdvantageOutput:
        """Per-token advantages [len(rows), T] of this replica's rows (rows=None: all), with estimator, tracker and
        KL metrics; `advantages` is None on pipeline stages other than the last.

        prompt_ids, rewards [B], mask [B, T], group_index [B]: the whole step. old/ref log-probs [len(rows), T]:
        with both, the step's global KL is measured (and, with kl_in_reward, fed to the estimator per token).
        """
        self.step_kl = None
        if not is_last_rank(self.stage_group):
            return AdvantageOutput(None, {})
        rows = self._check_rows(rows, len(rewards))
        metrics: dict[str, float] = {}
        token_kl = None
        if old_logprobs is not None and ref_logprobs is not None:
            local_mask = mask[rows]
            k3 = kl_penalty(old_logprobs.detach(), ref_logprobs.detach(), "k3") * local_mask  # log-probs' dtype
            per_row = self._global_rows(kl_row_sums(k3, local_mask))  # [B, 3]
            metrics["kl/old_ref_k3"] = step_kl(per_row, "token_mean")
            metrics["kl/old_ref_k3_seq_mean"] = step_kl(per_row, "seq_mean")
            self.step_kl = step_kl(per_row, self.cfg.baseline.kl_aggregation)
            if self.cfg.kl_in_reward:
                token_kl = self._global_rows(k3)
        baseline = self.tracker.baseline(prompt_ids) if self.tracker is not None else None
        batch = AdvantageBatch(rewards, mask, group_index=group_index, baseline=baseline, token_kl=token_kl)
        out = compute_advantages(self.cfg.estimator, batch, self.cfg)  # the whole batch, here as in one process
        out.advantages = out.advantages[rows]
        out.metrics.update(metrics)
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
        mask: torch.Tensor,
        *,
        rows: torch.Tensor | None = None,
        response_ids: torch.Tensor | None = None,
        new_logprobs: torch.Tensor | None = None,
        previous_logprobs: torch.Tensor | None = None,
        previous_mask: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """Pick rho with the forgetting rule from global statistics and fold this step's rewards into the tracker,
        identically on every rank. mask [B, T]: the whole step's. The spo rule (needs_new_logprobs) also needs, after
        the update: response_ids [B, T] (the step's tokens, aligned with mask: Experience.input_ids[:, 1:]),
        new_logprobs [len(rows), T] (the policy on this step's responses), previous_logprobs [len(rows), T'] and
        previous_mask [B, T'] (the policy on, and the tokens of, the rows of `previous_responses`)."""
        if self.tracker is None:
            return {}
        inputs, metrics = None, {}
        if is_last_rank(self.stage_group):
            inputs = {"kl": self.step_kl}
            if self.needs_new_logprobs:
                if new_logprobs is None or previous_logprobs is None or previous_mask is None or response_ids is None:
                    raise ValueError("the spo forgetting rule needs response_ids, new_logprobs, previous_logprobs and "
                                     "previous_mask (the policy after the update on this step's and on the stored "
                                     "responses)")
                rows = self._check_rows(rows, len(rewards))
                local_ids = [prompt_ids[int(r)] for r in rows]
                inputs["distance"] = self._global_rows(self.rule.drift(local_ids, previous_logprobs,
                                                                       previous_mask[rows]))
                inputs["remember"] = self._global_rows(new_logprobs.to(torch.float32))
        inputs = from_last_rank(inputs, self.stage_group)
        if self.needs_new_logprobs:  # D was measured against the previous visits: only now keep this step's
            self.rule.remember(prompt_ids, response_ids, mask, inputs.pop("remember"))
            metrics["tracker/spo_drift_mean"] = float(inputs["distance"].mean())
        rho = self.rule.step_rho(**inputs)
        self.tracker.update(prompt_ids, self._tracker_rewards(rewards), rho)
        self.last_rho = rho
        metrics["tracker/rho"] = float(torch.as_tensor(rho, dtype=torch.float64).mean())
        return metrics

    def previous_responses(self, prompt_ids: Sequence[Hashable]) -> list:
        """Per rollout, its prompt's response kept at the previous visit (token ids), None for a first visit or a
        rule that keeps none; the trainer scores these after the update for the spo rule (previous_logprobs)."""
        if not self.needs_new_logprobs:
            return [None] * len(prompt_ids)
        return self.rule.previous_responses(prompt_ids)

    def _tracker_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """What the tracker learns from: with baseline.binarize_rewards, success (reward > 0.5) as 0/1, so that a
        mixed-in format reward does not move the success estimate (as the released code does); else the rewards."""
        if not self.cfg.baseline.binarize_rewards:
            return rewards
        rewards = torch.as_tensor(rewards)
        return (rewards > 0.5).to(rewards.dtype)

    def _global_rows(self, local: torch.Tensor) -> torch.Tensor:
        """Per-row statistics of this replica's rows -> the same for all B rows, in global row order (the one
        data-parallel collective of the algorithm state)."""
        return gather_rows(local, self.dp_group)

    def _check_rows(self, rows: torch.Tensor | None, num_rows: int) -> torch.Tensor:
        """This replica's rows, checked to be the block that `_global_rows` assumes."""
        expected = block_of_rows(num_rows, self.dp_group)
        if rows is not None and not torch.equal(torch.as_tensor(rows), expected):
            raise ValueError(f"rows must be this data-parallel replica's contiguous block of the {num_rows} rows "
                             f"(rows {int(expected[0])}..{int(expected[-1])}, rl_step.data_parallel_rows); "
                             f"got {len(rows)} other rows")
        return expected

    def state_dict(self) -> dict:
        if self.tracker is None:
            return {}
        return {"tracker": self.tracker.state_dict(), "rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.tracker is None:
            return
        self.tracker.load_state_dict(state["tracker"])
        self.rule.load_state_dict(state["rule"])

    def state_digest(self) -> str:
        """SHA-256 of state_dict(): equal on every rank exactly when the algorithm state is (checked at each save)."""
        return state_digest(self.state_dict())
