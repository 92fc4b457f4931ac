"""Which prompts each RL step trains on: deterministic, epoch-based and exactly resumable.

    sampler = PromptSampler(len(train), cfg.data.prompts_per_step, seed=cfg.data.seed)
    indices = sampler.next_step()                          # prompts_per_step record indices
    prompt_idx, group_idx = expand_rollouts(indices, cfg.rollout.n)
    state = sampler.state_dict()                           # into the checkpoint
    PromptSampler(...).load_state_dict(state)              # -> the same future steps as without the restart

The sample stream is the concatenation of epochs; epoch e is a permutation of all prompts drawn from
`numpy.random.RandomState(seed + epoch)` (NumPy freezes the RandomState stream across releases, unlike
`Generator`, so a seed means the same order on every machine and version), or the identity when shuffle is off.
Every prompt appears exactly once per epoch. Each step takes the next `prompts_per_step` items of the stream.

Epoch boundaries: a step that reaches the end of epoch e takes the rest of e and continues with the head of e+1
(no prompts are dropped, and steps always have the same size, which the global-batch normalisation and the
mini-batch split rely on). So that such a straddling step does not hold the same prompt twice, the prompts of the
tail of epoch e that also come up in the head of epoch e+1 are swapped with the first later items of e+1 that are
not in that tail. Epoch e+1 stays a permutation. (When prompts_per_step > number of prompts, repeats within a step
cannot be avoided and no swap is made.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PromptSampler", "expand_rollouts"]

_STATE_VERSION = 1


class PromptSampler:
    """Deterministic epoch sampler over `num_prompts` prompt indices (see the module docstring)."""

    def __init__(self, num_prompts: int, prompts_per_step: int, seed: int = 0, shuffle: bool = True):
        if num_prompts < 1:
            raise ValueError(f"PromptSampler needs at least one prompt (got {num_prompts}): the dataset is empty")
        if prompts_per_step < 1:
            raise ValueError(f"data.prompts_per_step must be >= 1 (got {prompts_per_step})")
        self.num_prompts = int(num_prompts)
        self.prompts_per_step = int(prompts_per_step)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0  # next unread item of the current epoch's order
        self.steps = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_prompts, dtype=np.int64)
        # seed + epoch must fit RandomState's 32-bit seed; wrap rather than fail on huge seeds.
        return np.random.RandomState((self.seed + epoch) % 2**32).permutation(self.num_prompts).astype(np.int64)

    @staticmethod
    def _avoid(order: np.ndarray, head: int, taken: set[int]) -> None:
        """In place: make order[:head] free of `taken` by swapping with the first later items not in `taken`."""
        j = head
        for i in range(head):
            if int(order[i]) not in taken:
                continue
            while j < len(order) and int(order[j]) in taken:
                j += 1
            if j == len(order):  # cannot happen when head + len(taken) <= len(order); stop rather than loop
                return
            order[i], order[j] = order[j], order[i]
            j += 1

    def next_step(self) -> list[int]:
        """The prompt indices of the next step (length prompts_per_step)."""
        out: list[int] = []
        need = self.prompts_per_step
        while need > 0:
            if self.position == self.num_prompts:  # start the next epoch
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
                if out and len(out) + need <= self.num_prompts:
                    self._avoid(self._order, need, set(out))
            take = self._order[self.position : self.position + need]
            out.extend(int(i) for i in take)
            self.position += len(take)
            need -= len(take)
        self.steps += 1
        return out

    @property
    def steps_per_epoch(self) -> float:
        """Steps that make one pass over the prompts (fractional when the sizes do not divide)."""
        return self.num_prompts / self.prompts_per_step

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this sampler is. The current epoch's order is stored (not
        recomputed) because the boundary swap makes it depend on the previous epoch's tail."""
        return {
            "version": _STATE_VERSION,
            "num_prompts": self.num_prompts,
            "prompts_per_step": self.prompts_per_step,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
            "steps": self.steps,
            "order": [int(i) for i in self._order],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from `state_dict`. The dataset size must match: a different prompt count means the
        indices would point at other prompts, so it is an error rather than a silent reshuffle."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r}, expected {_STATE_VERSION}")
        if int(state["num_prompts"]) != self.num_prompts:
            raise ValueError(
                f"sampler state is for {state['num_prompts']} prompts but the dataset now has {self.num_prompts}: "
                "the training set changed since the checkpoint (check data.train_path and data.max_prompt_tokens)"
            )
        for key in ("seed", "shuffle", "prompts_per_step"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this run has {getattr(self, key)!r}")
        order = np.asarray(state["order"], dtype=np.int64)
        if order.shape != (self.num_prompts,) or not np.array_equal(np.sort(order), np.arange(self.num_prompts)):
            raise ValueError("sampler state 'order' is not a permutation of the prompts")
        if not 0 <= int(state["position"]) <= self.num_prompts:
            raise ValueError(f"sampler state position {state['position']} out of range")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.steps = int(state["steps"])
        self._order = order


def expand_rollouts(indices: list[int], n: int) -> tuple[list[int], list[int]]:
    """Repeat each prompt n times, consecutively: (prompt index per rollout, group index per rollout).

    The group index is the slot of the prompt in the step (0 .. len(indices)-1), not the prompt index, so that a
    prompt drawn twice in one step (only possible when prompts_per_step > number of prompts) forms two groups.
    Example: expand_rollouts([7, 3], 2) == ([7, 7, 3, 3], [0, 0, 1, 1]).
    """
    if n < 1:
        raise ValueError(f"rollout.n must be >= 1 (got {n})")
    prompts = [int(i) for i in indices for _ in range(n)]
    groups = [g for g in range(len(indices)) for _ in range(n)]
    return prompts, groups
