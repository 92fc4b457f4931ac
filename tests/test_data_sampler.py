"""PromptSampler: determinism, exact resume, epochs (incl. steps straddling a boundary), expand_rollouts."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mssr_megatron.data.sampler import PromptSampler, expand_rollouts


def steps(sampler: PromptSampler, k: int) -> list[list[int]]:
    return [sampler.next_step() for _ in range(k)]


def test_same_seed_same_order_other_seed_differs():
    a, b, c = PromptSampler(50, 8, seed=3), PromptSampler(50, 8, seed=3), PromptSampler(50, 8, seed=4)
    sa, sb, sc = steps(a, 20), steps(b, 20), steps(c, 20)
    assert sa == sb and sa != sc
    assert all(len(s) == 8 for s in sa)


def test_order_pinned():
    # RandomState's stream is frozen by NumPy: this order must never change, or resumed runs would shift.
    assert PromptSampler(10, 4, seed=0).next_step() == [2, 8, 4, 9]


@pytest.mark.parametrize("num_prompts,per_step", [(12, 4), (10, 4), (7, 3), (5, 5), (3, 7)])
def test_every_prompt_once_per_epoch(num_prompts, per_step):
    sampler = PromptSampler(num_prompts, per_step, seed=1)
    stream = [i for s in steps(sampler, 40) for i in s]
    full_epochs = len(stream) // num_prompts
    for e in range(full_epochs):
        assert sorted(stream[e * num_prompts : (e + 1) * num_prompts]) == list(range(num_prompts)), e
    assert sampler.epoch == (40 * per_step - 1) // num_prompts


@pytest.mark.parametrize("num_prompts,per_step", [(10, 4), (7, 3), (9, 9), (31, 8)])
def test_straddling_step_has_no_repeats(num_prompts, per_step):
    # A step that crosses an epoch boundary takes the rest of epoch e and the head of e+1, without repeats.
    sampler = PromptSampler(num_prompts, per_step, seed=5)
    for s in steps(sampler, 60):
        assert len(set(s)) == len(s)


def test_more_per_step_than_prompts_repeats_unavoidable():
    s = PromptSampler(3, 7, seed=0).next_step()
    assert len(s) == 7 and set(s) == {0, 1, 2}
    assert Counter(s).most_common(1)[0][1] == 3


def test_resume_mid_epoch_equals_uninterrupted():
    reference = PromptSampler(23, 5, seed=11)
    expected = steps(reference, 30)
    for cut in (1, 3, 4, 5, 9, 17):  # mid-epoch, right after straddling steps, several epochs in
        first = PromptSampler(23, 5, seed=11)
        head = steps(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip (checkpoint metadata)
        resumed = PromptSampler(23, 5, seed=11)
        resumed.load_state_dict(state)
        assert head + steps(resumed, 30 - cut) == expected, cut
        assert resumed.steps == 30


def test_no_shuffle_is_sequential():
    sampler = PromptSampler(5, 2, seed=0, shuffle=False)
    assert steps(sampler, 4) == [[0, 1], [2, 3], [4, 0], [1, 2]]


def test_load_state_checks():
    state = PromptSampler(10, 4, seed=0).state_dict()
    with pytest.raises(ValueError, match="dataset now has 11"):
        PromptSampler(11, 4, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(10, 4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="permutation"):
        PromptSampler(10, 4, seed=0).load_state_dict({**state, "order": [0] * 10})
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptSampler(0, 4)


def test_expand_rollouts():
    assert expand_rollouts([7, 3], 2) == ([7, 7, 3, 3], [0, 0, 1, 1])
    assert expand_rollouts([4, 4, 1], 1) == ([4, 4, 1], [0, 1, 2])
    prompts, groups = expand_rollouts(list(range(256)), 8)
    assert len(prompts) == 2048 and groups[-1] == 255 and prompts[8:16] == [1] * 8
    with pytest.raises(ValueError):
        expand_rollouts([1], 0)
