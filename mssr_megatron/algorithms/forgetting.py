"""Forgetting factor rho for the Beta baseline tracker, one registry: kl_window (published MSSR), spo, constant.

Each rule is called once per RL step, after the policy update, with what it may need:

    rho = rule.step_rho(kl=<the global batch's k3 KL(old || ref), see step_kl>, distance=<[B] SPORho.drift per rollout>)

and returns a float (one rho for the whole step) or a [B] tensor (one per rollout). Both inputs are global-batch
statistics: the algorithm pipeline (pipeline.py) computes them from each data-parallel replica's rows. Rules with
memory expose `state_dict()` / `load_state_dict()` so a resumed run continues exactly.
"""

from __future__ import annotations

from collections import deque

import torch

from mssr_megatron.registry import Registry

FORGETTING_RULES: Registry[type] = Registry("forgetting rule")
KL_AGGREGATIONS = ("token_mean", "seq_mean")
KL_TOKEN_CLAMP = 10.0
"""seq_mean clamps each token's k3 to [-KL_TOKEN_CLAMP, KL_TOKEN_CLAMP] (the released code's value; k3 >= 0, so
only the upper bound can bind)."""


def kl_row_sums(k3: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: (sum of k3, sum of k3 clamped to +-KL_TOKEN_CLAMP, response tokens), float64. [rows, T] -> [rows, 3]

    Each row's figures depend on that row alone, so rows gathered from data-parallel replicas in row order give
    `step_kl` exactly what one process computing every row gives it."""
    m = mask.to(torch.float64)
    k3 = k3.detach().to(torch.float64) * m
    clamped = k3.clamp(-KL_TOKEN_CLAMP, KL_TOKEN_CLAMP) * m
    return torch.stack([k3.sum(-1), clamped.sum(-1), m.sum(-1)], -1)


def step_kl(row_sums: torch.Tensor, aggregation: str) -> float:
    """The step's KL from every row's `kl_row_sums` [B, 3], in row order:
    token_mean: all tokens' k3 summed / all tokens;
    seq_mean: the mean over sequences of each one's token mean of the clamped k3 (the released code's reading);
    a sequence without response tokens does not count. 0 when there is no token."""
    total, clamped, tokens = row_sums.to(torch.float64).unbind(-1)
    if aggregation == "token_mean":
        return float(total.sum() / tokens.sum().clamp(min=1.0))
    if aggregation == "seq_mean":
        has = tokens > 0
        per_seq = torch.where(has, clamped / tokens.clamp(min=1.0), torch.zeros_like(clamped))
        return float(per_seq.sum() / has.sum().clamp(min=1))
    raise ValueError(f"unknown KL aggregation {aggregation!r}; choose one of {', '.join(KL_AGGREGATIONS)}")


@FORGETTING_RULES.register("kl_window")
class KLWindowRho:
    """Global rho from the sliding-window mean KL to the reference (the rule of MSSR's released code).

    KL_s = mean of the last `window` per-step KLs (this step included; the released code's window is 10, and its
    per-step KL is `step_kl(..., "seq_mean")`: algorithm.baseline.kl_window and kl_aggregation);
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
    """Per-prompt rho(x) = 2^(-D(x) / d_half), clipped to [rho_min, rho_max]: SPO (Xu & Ding, arXiv 2509.13232), with
    D(x) as its verl recipe computes it (verl-recipe spo/spo_ray_trainer.py, `_get_spo_rho`).

    D(x) is how far the policy moved on prompt x SINCE x'S PREVIOUS VISIT. After each step's update the rule keeps,
    per prompt of the step, the response sampled for it and that response's log-probs under the updated policy
    (`remember`). At x's next visit, after that step's update, the policy scores the stored response again and
        D(x) = token mean over the stored response of |logp_stored - logp_now|        (`drift`)
    so D spans every update between the two visits. A prompt seen for the first time has D = 0 (rho_max after
    clipping), as in the recipe; with several rollouts of x in one step the last one (in row order) is kept.
    Cost: two forward passes after each update (this step's responses, the stored ones), and per prompt seen its last
    response's token ids (int32) and log-probs (float32): 8 bytes per response token (a 1,000-token response: 8 KB;
    10,000 prompts at 1,000 tokens: 80 MB), on every rank and in every checkpoint.
    """

    def __init__(self, rho_min: float, rho_max: float, spo_d_half: float):
        self.rho_min, self.rho_max, self.d_half = rho_min, rho_max, spo_d_half
        self.responses: dict = {}
        """prompt id -> token ids [n] (int32) of the response kept at its last visit."""
        self.logprobs: dict = {}
        """prompt id -> log-probs [n] (float32) of that response under the policy right after that visit's update."""

    @classmethod
    def from_config(cls, cfg) -> "SPORho":
        return cls(cfg.rho_min, cfg.rho_max, cfg.spo_d_half)

    def previous_responses(self, prompt_ids) -> list:
        """Per rollout, the token ids (a list) of its prompt's response kept at the previous visit; None if none."""
        return [self.responses[p].tolist() if p in self.responses else None for p in prompt_ids]

    def drift(self, prompt_ids, now_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """D per rollout: its prompt's stored response scored now. [B] float64

        now_logprobs, mask [B, T]: the policy's log-probs on the rows of `previous_responses` (the stored response,
        or this step's own where none is stored) and where its tokens are. Rows without a stored response get D = 0."""
        stored = torch.zeros(mask.shape, dtype=torch.float64)
        keep = torch.zeros(mask.shape, dtype=torch.bool)
        for i, p in enumerate(prompt_ids):
            if p not in self.logprobs:
                continue
            where = mask[i].bool()
            if int(where.sum()) != self.logprobs[p].numel():
                raise ValueError(f"prompt {p!r}: the mask holds {int(where.sum())} tokens where its stored response "
                                 f"has {self.logprobs[p].numel()}: score the rows of previous_responses()")
            stored[i, where] = self.logprobs[p].to(torch.float64)
            keep[i] = where
        return spo_distance(stored, now_logprobs, keep)

    def remember(self, prompt_ids, response_ids: torch.Tensor, mask: torch.Tensor, logprobs: torch.Tensor) -> None:
        """Keep each prompt's response of this step and its log-probs after the update (all [B, T], whole step)."""
        for i, p in enumerate(prompt_ids):
            where = mask[i].bool()
            self.responses[p] = response_ids[i, where].to(torch.int32).clone()
            self.logprobs[p] = logprobs[i, where].detach().to(torch.float32).clone()

    def step_rho(self, *, distance: torch.Tensor | None = None, **_) -> torch.Tensor:
        if distance is None:
            raise ValueError("the spo forgetting rule needs each rollout's drift D (distance=rule.drift(...))")
        return torch.pow(2.0, -distance.to(torch.float64) / self.d_half).clamp(self.rho_min, self.rho_max)

    def state_dict(self) -> dict:
        """Prompt ids in insertion order, their responses and log-probs packed end to end, and each one's length."""
        ids = list(self.responses)
        empty = [torch.zeros(0, dtype=torch.int32)], [torch.zeros(0, dtype=torch.float32)]
        return {
            "prompt_ids": ids,
            "lengths": torch.tensor([self.responses[p].numel() for p in ids], dtype=torch.long),
            "tokens": torch.cat([self.responses[p] for p in ids] or empty[0]),
            "logprobs": torch.cat([self.logprobs[p] for p in ids] or empty[1]),
        }

    def load_state_dict(self, state: dict) -> None:
        ids, lengths = list(state.get("prompt_ids", [])), state.get("lengths", torch.zeros(0, dtype=torch.long))
        if len(ids) != len(lengths) or int(lengths.sum()) != state.get("tokens", torch.zeros(0)).numel():
            raise ValueError("corrupt spo state: prompt_ids, lengths and tokens do not agree")
        tokens = state["tokens"].split(lengths.tolist()) if ids else []
        logprobs = state["logprobs"].split(lengths.tolist()) if ids else []
        self.responses = {p: t.to(torch.int32).clone() for p, t in zip(ids, tokens)}
        self.logprobs = {p: lp.to(torch.float32).clone() for p, lp in zip(ids, logprobs)}


def spo_distance(stored_logprobs: torch.Tensor, now_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: token-mean |logp_stored - logp_now| over `mask` (0 for an empty row). [B] float64

    Each row's D depends on that row alone (elementwise ops and a sum along the row), so rows computed on different
    data-parallel replicas equal the same rows computed in one process."""
    m = mask.to(torch.float64)
    diff = (stored_logprobs.detach().to(torch.float64) - now_logprobs.detach().to(torch.float64)).abs() * m
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
