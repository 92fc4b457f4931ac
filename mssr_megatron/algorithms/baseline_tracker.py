"""The per-prompt Beta-posterior baseline of MSSR.

Each prompt x keeps Beta(a, b) over its 0/1 reward; the baseline is v(x) = a / (a + b), read BEFORE the step's update.
After the step:  a <- rho * a + sum(r),  b <- rho * b + sum(1 - r)  (forgetting applied once per step per prompt,
then every reward of that prompt in the step is added, so n > 1 rollouts per prompt are handled in one update).

Prompts are keyed by a stable id (str or int). State lives in two float64 arrays that grow by doubling, so memory is
O(number of prompts seen) and an update is a dictionary lookup per rollout plus one vectorised index_add.
Never-seen prompts read the prior v = prior_mean with a + b = n0 (the published prior: a = b = n0 / 2).
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

PromptId = Hashable


class BetaBaselineTracker:
    """Per-prompt Beta(a, b) baseline over 0/1 rewards.

    n0: pseudo-count of the prior and of the initialisation pass (published: 1 / (1 - rho_min) = 8).
    prior_mean: v of a prompt that was never initialised nor updated (published: 0.5).
    """

    def __init__(self, n0: float, prior_mean: float = 0.5, capacity: int = 1024):
        if n0 <= 0:
            raise ValueError(f"n0 must be positive, got {n0}")
        if not 0.0 <= prior_mean <= 1.0:
            raise ValueError(f"prior_mean must be in [0, 1], got {prior_mean}")
        self.n0 = float(n0)
        self.prior_mean = float(prior_mean)
        self._index: dict[PromptId, int] = {}
        self._alpha = torch.zeros(max(capacity, 1), dtype=torch.float64)
        self._beta = torch.zeros(max(capacity, 1), dtype=torch.float64)

    def __len__(self) -> int:
        return len(self._index)

    # ----------------------------------------------------------------------------------------------- reading
    def _rows(self, prompt_ids: Sequence[PromptId]) -> torch.Tensor:
        """Row of each id, -1 for ids never seen. [B] long"""
        get = self._index.get
        return torch.tensor([get(p, -1) for p in prompt_ids], dtype=torch.long)

    def params(self, prompt_ids: Sequence[PromptId]) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) for each id, the prior for unseen ids. Two [B] float64 tensors."""
        rows = self._rows(prompt_ids)
        seen = rows >= 0
        safe = rows.clamp(min=0)
        # index_select, not alpha[rows]: advanced indexing of a large CPU tensor is ~500x slower (measured).
        prior_a = torch.full(rows.shape, self._prior_a, dtype=torch.float64)
        prior_b = torch.full(rows.shape, self._prior_b, dtype=torch.float64)
        a = torch.where(seen, self._alpha.index_select(0, safe), prior_a)
        b = torch.where(seen, self._beta.index_select(0, safe), prior_b)
        return a, b

    def baseline(self, prompt_ids: Sequence[PromptId]) -> torch.Tensor:
        """v(x) = a / (a + b) for each id. [B] float64"""
        a, b = self.params(prompt_ids)
        return a / (a + b)

    def coverage(self, prompt_ids: Sequence[PromptId]) -> float:
        """Share of the given ids that are tracked (an initialisation pass or an update has seen them)."""
        if len(prompt_ids) == 0:
            return 0.0
        return float((self._rows(prompt_ids) >= 0).double().mean())

    @property
    def _prior_a(self) -> float:
        return self.n0 * self.prior_mean

    @property
    def _prior_b(self) -> float:
        return self.n0 * (1.0 - self.prior_mean)

    # ----------------------------------------------------------------------------------------------- writing
    def _rows_inserting(self, prompt_ids: Sequence[PromptId]) -> torch.Tensor:
        """Row of each id, adding unseen ids with the prior. [B] long"""
        index = self._index
        start = len(index)
        rows = [index.setdefault(p, len(index)) for p in prompt_ids]
        end = len(index)
        if end > start:
            self._grow(end)
            self._alpha[start:end] = self._prior_a
            self._beta[start:end] = self._prior_b
        return torch.tensor(rows, dtype=torch.long)

    def _grow(self, needed: int) -> None:
        capacity = self._alpha.numel()
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        for name in ("_alpha", "_beta"):
            old = getattr(self, name)
            new = torch.zeros(capacity, dtype=old.dtype)
            new[: old.numel()] = old
            setattr(self, name, new)

    def initialize(self, prompt_ids: Sequence[PromptId], rewards: torch.Tensor, smoothing: str = "mean") -> None:
        """Set (a, b) from an initial pass of the starting policy (one or more rollouts per prompt).

        With s successes out of n rollouts of a prompt:
          "mean": v0 = s / n,  a = n0 * v0,  b = n0 * (1 - v0)                (MSSR)
          "spo":  a = n0 * (s + 0.5) / (n + 1),  b = n0 * (n - s + 0.5) / (n + 1)   (SPO, Laplace-smoothed)
        Prompts already tracked are overwritten.
        """
        rows = self._rows_inserting(prompt_ids)
        successes, trials, unique = self._per_row_sums(rows, rewards)
        if smoothing == "mean":
            v0 = successes / trials
            a, b = self.n0 * v0, self.n0 * (1.0 - v0)
        elif smoothing == "spo":
            a = self.n0 * (successes + 0.5) / (trials + 1.0)
            b = self.n0 * (trials - successes + 0.5) / (trials + 1.0)
        else:
            raise ValueError(f"unknown initialisation smoothing {smoothing!r}; choose 'mean' or 'spo'")
        self._alpha.index_copy_(0, unique, a)
        self._beta.index_copy_(0, unique, b)

    def update(self, prompt_ids: Sequence[PromptId], rewards: torch.Tensor, rho: float | torch.Tensor) -> None:
        """a <- rho * a + sum(r),  b <- rho * b + sum(1 - r) for each prompt of the step.

        rewards: [B] in [0, 1]; rho: a float, or [B] per rollout (a prompt with several rollouts takes their mean).
        """
        rows = self._rows_inserting(prompt_ids)
        successes, trials, unique = self._per_row_sums(rows, rewards)
        rho_t = torch.as_tensor(rho, dtype=torch.float64)
        if rho_t.dim() == 0:
            rho_rows = rho_t.expand(unique.numel())
        else:
            rho_sum, _, _ = self._per_row_sums(rows, rho_t)
            rho_rows = rho_sum / trials
        self._alpha.index_copy_(0, unique, rho_rows * self._alpha.index_select(0, unique) + successes)
        self._beta.index_copy_(0, unique, rho_rows * self._beta.index_select(0, unique) + (trials - successes))

    @staticmethod
    def _per_row_sums(rows: torch.Tensor, values: torch.Tensor):
        """Per unique row: (sum of values, count, row). Three [U] tensors."""
        values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if values.numel() != rows.numel():
            raise ValueError(f"got {values.numel()} values for {rows.numel()} prompt ids")
        unique, inverse = torch.unique(rows, return_inverse=True)
        sums = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, values)
        counts = torch.zeros(unique.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values))
        return sums, counts, unique

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: ids in row order and their (a, b) rows."""
        n = len(self._index)
        return {
            "n0": self.n0,
            "prior_mean": self.prior_mean,
            "prompt_ids": list(self._index),
            "alpha": self._alpha[:n].clone(),
            "beta": self._beta[:n].clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        ids = list(state["prompt_ids"])
        if not len(ids) == state["alpha"].numel() == state["beta"].numel():
            raise ValueError("corrupt tracker state: prompt_ids, alpha and beta differ in length")
        self.n0 = float(state["n0"])
        self.prior_mean = float(state["prior_mean"])
        self._index = {p: i for i, p in enumerate(ids)}
        if len(self._index) != len(ids):
            raise ValueError("corrupt tracker state: duplicate prompt ids")
        capacity = max(1024, len(ids))
        self._alpha = torch.zeros(capacity, dtype=torch.float64)
        self._beta = torch.zeros(capacity, dtype=torch.float64)
        self._alpha[: len(ids)] = state["alpha"].to(torch.float64)
        self._beta[: len(ids)] = state["beta"].to(torch.float64)

    def metrics(self, prompt_ids: Sequence[PromptId]) -> dict[str, float]:
        """Tracker figures for this step's prompts (read before the update)."""
        v = self.baseline(prompt_ids)
        a, b = self.params(prompt_ids)
        return {
            "tracker/coverage": self.coverage(prompt_ids),
            "tracker/prompts": float(len(self)),
            "tracker/baseline_mean": float(v.mean()) if v.numel() else 0.0,
            "tracker/effective_count_mean": float((a + b).mean()) if v.numel() else 0.0,
        }
