"""Forgetting factor rho for the Beta baseline tracker, one registry: kl_window (published MSSR), spo, constant.

Each rule is called once per RL step, after the policy update, with what it may need:

    rho = rule.step_rho(kl=<the global batch's token-mean k3 KL(old || ref)>, distance=<[B] spo_distance per rollout>)

and returns a float (one rho for the whole step) or a [B] tensor (one per rollout). Both inputs are global-batch
statistics: the algorithm pipeline (pipeline.py) computes them from each data-parallel replica's rows. Rules with
memory expose `state_dict()` / `load_state_dict()` so a resumed run continues exactly.
"""

from __future__ import annotations

from collections import deque

import torch

from mssr_megatron.registry import Registry

FORGETTING_RULES: Registry[type] = Registry("forgetting rule")


@FORGETTING_RULES.register("kl_window")
class KLWindowRho:
    """Global rho from the sliding-window mean KL to the reference (the rule of MSSR's released code).

    KL_s = mean of the last `window` per-step KLs (this step included);
    rho = rho_min + (KL_s / target) * (rho_max - rho_min) if KL_s <= target else rho_min, clipped to [rho_min, rho_max].
    Not monotone in KL (it drops back to rho_min just above the target); kept as published for reproducibility.
    """

    def __init__(self, rho_min: float, rho_max: float, kl_target: float, kl_window: int):
        self.rho_min, self.rho_max, self.kl_target = rho_min, rho_max, kl_target
        self.history: deque[float] = deque(maxlen=kl_window)

    @classmethod
    def from_config(cls, cfg) -> "KLWindowRho":
        return cls(cfg.rho_min, cfg.rho_max, cfg.kl_target, cfg.kl_window)

    def step_rho(self, *, kl: float | None = None, **_) -> float:
        if kl is None:
            raise ValueError("the kl_window forgetting rule needs this step's mean KL to the reference (kl=...)")
        self.history.append(float(kl))
        kl_s = sum(self.history) / len(self.history)
        if kl_s <= self.kl_target:
            rho = self.rho_min + (kl_s / self.kl_target) * (self.rho_max - self.rho_min)
        else:
            rho = self.rho_min
        return min(max(rho, self.rho_min), self.rho_max)

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(float(x) for x in state["history"])


@FORGETTING_RULES.register("spo")
class SPORho:
    """Per-prompt rho(x) = 2^(-D(x) / d_half), clipped to [rho_min, rho_max] (SPO, arXiv 2509.13232).

    D(x) = token-mean |logp_stored - logp_now| over that prompt's response: how far the policy moved on it.
    A zero-length response has D = 0 (rho_max after clipping).
    """

    def __init__(self, rho_min: float, rho_max: float, spo_d_half: float):
        self.rho_min, self.rho_max, self.d_half = rho_min, rho_max, spo_d_half

    @classmethod
    def from_config(cls, cfg) -> "SPORho":
        return cls(cfg.rho_min, cfg.rho_max, cfg.spo_d_half)

    def step_rho(self, *, distance: torch.Tensor | None = None, **_) -> torch.Tensor:
        if distance is None:
            raise ValueError("the spo forgetting rule needs each rollout's distance D (distance=spo_distance(...))")
        return torch.pow(2.0, -distance.to(torch.float64) / self.d_half).clamp(self.rho_min, self.rho_max)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def spo_distance(old_logprobs: torch.Tensor, new_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """D per rollout: token-mean |logp_stored - logp_now| over its response (0 for an empty one). [B] float64

    Each row's D depends on that row alone (elementwise ops and a sum along the row), so rows computed on different
    data-parallel replicas equal the same rows computed in one process."""
    m = mask.to(torch.float64)
    diff = (old_logprobs.detach().to(torch.float64) - new_logprobs.detach().to(torch.float64)).abs() * m
    return diff.sum(-1) / m.sum(-1).clamp(min=1.0)


@FORGETTING_RULES.register("constant")
class ConstantRho:
    """The same rho every step (ablations)."""

    def __init__(self, constant_rho: float):
        self.value = constant_rho

    @classmethod
    def from_config(cls, cfg) -> "ConstantRho":
        return cls(cfg.constant_rho)

    def step_rho(self, **_) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def build_forgetting_rule(baseline_cfg):
    """The rule named by `baseline_cfg.rho_rule`, built from the BaselineConfig fields."""
    return FORGETTING_RULES.get(baseline_cfg.rho_rule).from_config(baseline_cfg)
