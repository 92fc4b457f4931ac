"""A seconds-long RL run on a synthetic answer-sequence task that drives every estimator end to end on real tensors.

Each of P prompts has a hidden target answer of T tokens over a V-token vocabulary; a rollout samples T tokens from
the policy and earns reward 1 when it reproduces the target exactly. The policy is a table of logits [P, T, V]
(initialised so that some prompts are mostly solved and others rarely), the reference policy is its frozen start.
The step is the real one: sample -> reward -> advantage (tracker, global batch norm) -> old/ref log-probs and
full-vocabulary entropy -> shaping -> mini-batched PPO-clip + KL loss -> tracker update with the forgetting rule.
Every estimator gets the same rollout budget per step: n = 1 for mssr/mvsr/reinforce_pp, n = group_size otherwise.
This is the `mssr demo` job until the Megatron trainer lands; it is no stand-in for the multimodal task.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch

from mssr_megatron.algorithms.advantages import ESTIMATORS
from mssr_megatron.algorithms.pipeline import RLAlgorithm
from mssr_megatron.config import AlgorithmConfig


@dataclass
class ToyTaskConfig:
    prompts: int = 512
    """Number of distinct prompts."""
    answer_tokens: int = 3
    """Tokens per answer (T)."""
    vocab: int = 6
    """Vocabulary size (V)."""
    rollouts_per_step: int = 128
    """Rollouts per RL step, the same for every estimator."""
    group_size: int = 8
    """Rollouts per prompt for group estimators (grpo, drgrpo, rloo)."""
    steps: int = 60
    """RL steps per estimator."""
    mini_batches: int = 2
    """Optimizer steps per RL step."""
    lr: float = 0.1
    """Adam learning rate on the logit table."""
    eval_every: int = 5
    """Greedy accuracy over all prompts every this many steps."""
    seed: int = 0
    """Seed of the task, the initial policy and the sampling."""


def _initial_logits(cfg: ToyTaskConfig, targets: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random logits plus a per-prompt pull toward the target: difficulty varies from easy to nearly unsolved."""
    logits = torch.randn(cfg.prompts, cfg.answer_tokens, cfg.vocab, generator=gen)
    pull = torch.empty(cfg.prompts, 1, 1).uniform_(-0.5, 3.0, generator=gen)
    return logits + pull * torch.nn.functional.one_hot(targets, cfg.vocab)


class ToyRun:
    """One estimator's run on the toy task."""

    def __init__(self, estimator: str, cfg: ToyTaskConfig, algo_cfg: AlgorithmConfig):
        self.cfg, self.estimator = cfg, estimator
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.targets = torch.randint(0, cfg.vocab, (cfg.prompts, cfg.answer_tokens), generator=self.gen)
        self.ref_logits = _initial_logits(cfg, self.targets, self.gen)
        self.logits = torch.nn.Parameter(self.ref_logits.clone())
        self.optim = torch.optim.Adam([self.logits], lr=cfg.lr)
        self.algo = RLAlgorithm(dataclasses.replace(algo_cfg, estimator=estimator))
        self.n = cfg.group_size if ESTIMATORS.get(estimator).needs_groups else 1

    def sample(self, prompts: torch.Tensor):
        """Rollouts of the current policy: tokens [B, T], rewards [B]."""
        probs = torch.softmax(self.logits.detach()[prompts], -1)
        tokens = torch.multinomial(probs.reshape(-1, self.cfg.vocab), 1, generator=self.gen).reshape(probs.shape[:2])
        rewards = (tokens == self.targets[prompts]).all(-1).float()
        return tokens, rewards

    def logprobs_entropy(self, logits: torch.Tensor, prompts: torch.Tensor, tokens: torch.Tensor):
        logp_all = torch.log_softmax(logits[prompts], -1)
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(-1, tokens[..., None])[..., 0], entropy

    def greedy_accuracy(self) -> float:
        return float((self.logits.detach().argmax(-1) == self.targets).all(-1).float().mean())

    def mean_entropy(self) -> float:
        logp = torch.log_softmax(self.logits.detach(), -1)
        return float(-(logp.exp() * logp).sum(-1).mean())

    def initialize_tracker(self) -> None:
        prompts = torch.arange(self.cfg.prompts)
        _, rewards = self.sample(prompts)
        self.algo.initialize(prompts.tolist(), rewards)

    def step(self) -> dict[str, float]:
        cfg = self.cfg
        num_prompts = cfg.rollouts_per_step // self.n
        chosen = torch.randperm(cfg.prompts, generator=self.gen)[:num_prompts]
        prompts = chosen.repeat_interleave(self.n)
        tokens, rewards = self.sample(prompts)
        mask = torch.ones_like(tokens, dtype=torch.float32)
        with torch.no_grad():
            old_logp, entropy = self.logprobs_entropy(self.logits, prompts, tokens)
            ref_logp, _ = self.logprobs_entropy(self.ref_logits, prompts, tokens)
        out = self.algo.advantages(prompts.tolist(), rewards, mask, group_index=prompts, old_logprobs=old_logp,
                                   ref_logprobs=ref_logp)
        advantages, shaping_metrics = self.algo.shape(out.advantages, mask, entropy=entropy, logprobs=old_logp)
        metrics = {**out.metrics, **shaping_metrics}
        order = torch.randperm(len(prompts), generator=self.gen)
        for part in order.chunk(cfg.mini_batches):
            logp, ent = self.logprobs_entropy(self.logits, prompts[part], tokens[part])
            loss, loss_metrics = self.algo.loss(  # the toy samples from the policy itself: its sampling log-probs
                logp, old_logp[part], advantages[part], mask[part], ref_logprobs=ref_logp[part],  # are the old ones
                rollout_logprobs=old_logp[part], entropy=ent,
            )
            self.optim.zero_grad()
            loss.backward()
            self.optim.step()
            metrics.update(loss_metrics)
        spo = {}
        if self.algo.needs_new_logprobs:  # the spo rule: the updated policy on these and on the previous responses
            previous = self.algo.previous_responses(prompts.tolist())
            earlier = torch.stack([t if p is None else torch.tensor(p) for p, t in zip(previous, tokens)])
            with torch.no_grad():
                spo = {"new_logprobs": self.logprobs_entropy(self.logits, prompts, tokens)[0],
                       "previous_logprobs": self.logprobs_entropy(self.logits, prompts, earlier)[0]}
        metrics.update(self.algo.after_update(prompts.tolist(), rewards, mask, response_ids=tokens,
                                              previous_mask=mask, **spo))
        return metrics


def run_toy_task(estimators: list[str], cfg: ToyTaskConfig, algo_cfg: AlgorithmConfig, out_dir: str | None = None):
    """Run every estimator for cfg.steps steps; returns {estimator: [per-eval records]} and writes JSON + a plot."""
    curves: dict[str, list[dict]] = {}
    for name in estimators:
        run = ToyRun(name, cfg, algo_cfg)
        run.initialize_tracker()
        records = [{"step": 0, "greedy_acc": run.greedy_accuracy(), "entropy": run.mean_entropy(), "reward": math.nan}]
        for step in range(1, cfg.steps + 1):
            metrics = run.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                records.append({"step": step, "greedy_acc": run.greedy_accuracy(), "entropy": run.mean_entropy(),
                                "reward": metrics["reward/mean"], "rho": metrics.get("tracker/rho", math.nan)})
        curves[name] = records
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "toy_task.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "curves": curves}, f, indent=1)
        _plot(curves, os.path.join(out_dir, "toy_task.png"))
    return curves


def _plot(curves: dict[str, list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, records in curves.items():
        steps = [r["step"] for r in records]
        axes[0].plot(steps, [r["greedy_acc"] for r in records], label=name)
        axes[1].plot(steps, [r["entropy"] for r in records], label=name)
    axes[0].set(xlabel="RL step", ylabel="greedy accuracy (all prompts)", title="Accuracy at equal rollouts/step")
    axes[1].set(xlabel="RL step", ylabel="mean policy entropy (nats)", title="Entropy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(curves: dict[str, list[dict]]) -> str:
    """A plain-text summary: start and end greedy accuracy and entropy per estimator."""
    lines = [f"{'estimator':<14}{'acc@0':>8}{'acc@end':>9}{'best':>8}{'H@0':>8}{'H@end':>8}"]
    for name, records in curves.items():
        first, last = records[0], records[-1]
        best = max(r["greedy_acc"] for r in records)
        lines.append(f"{name:<14}{first['greedy_acc']:>8.3f}{last['greedy_acc']:>9.3f}{best:>8.3f}"
                     f"{first['entropy']:>8.3f}{last['entropy']:>8.3f}")
    return "\n".join(lines)
