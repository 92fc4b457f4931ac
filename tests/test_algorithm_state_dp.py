"""The same algorithm state on every rank: two gloo processes, each feeding the algorithm pipeline its shard of fixed
per-row log-probs for 3 steps, end with trackers, forgetting-rule state and advantages bit-identical to each other and
to one process fed the whole batch; a checkpoint refuses to save a state that diverged between ranks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_harness import spawn
from mssr_megatron.algorithms.forgetting import KLWindowRho
from mssr_megatron.algorithms.pipeline import RLAlgorithm
from mssr_megatron.config import AlgorithmConfig, BaselineConfig

B, T, STEPS = 8, 5, 3
PROMPTS = [f"p{i}" for i in (0, 0, 1, 1, 2, 2, 3, 3)]  # two rollouts per prompt, so each shard holds whole prompts
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0],
                     [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
CASES = {
    "kl_window": AlgorithmConfig(),  # released: 10-step window, per-step KL the mean of per-sequence means
    "kl_window_token_mean": AlgorithmConfig(baseline=BaselineConfig(kl_aggregation="token_mean")),
    "spo": AlgorithmConfig(baseline=BaselineConfig(rho_rule="spo")),
    "reinforce_pp_kl_in_reward": AlgorithmConfig(estimator="reinforce_pp", kl_in_reward=True, kl_reward_coef=0.5),
}


def step_inputs(step: int):
    """Rewards and per-row log-probs (old, reference, after the update) of one step, [B] and [B, T] each. The
    first half's KL is near 0 and the second half's above the kl_window target (0.01), so a shard-local KL would
    put the two ranks on opposite sides of the rule's jump."""
    g = torch.Generator().manual_seed(100 + step)
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    old = -torch.rand(B, T, generator=g) * 3
    spread = torch.tensor([0.01] * (B // 2) + [0.18] * (B // 2))[:, None]
    ref = old + spread * torch.randn(B, T, generator=g)
    new = old + 0.01 * torch.randn(B, T, generator=g)
    return rewards, old, ref, new


def previous_inputs(algo, step: int):
    """The spo rule's view after the update: each row's previous response (its own where none is kept), where its
    tokens are [B, T], and the updated policy's log-probs on it [B, T]: the kept ones moved by a fixed random drift
    of a few thousandths (so that rho stays between its bounds)."""
    previous = algo.previous_responses(PROMPTS)
    mask = torch.zeros(B, T, dtype=torch.bool)
    g = torch.Generator().manual_seed(200 + step)
    now = -torch.rand(B, T, generator=g) * 3
    drift = 0.01 * torch.rand(B, T, generator=g)
    for i, p in enumerate(previous):
        mask[i] = MASK[i] if p is None else torch.arange(T) < len(p)
        if p is not None:
            now[i, :len(p)] = algo.rule.logprobs[PROMPTS[i]] + drift[i, :len(p)]
    return mask, now


def run_pipeline(cfg, rows=None, dp_group=None, stage_group=None, has_logprobs=True) -> dict:
    """3 steps of the pipeline as the trainer drives it, on `rows` of the fixed inputs; returns what it produced."""
    algo = RLAlgorithm(cfg, dp_group=dp_group, stage_group=stage_group)
    algo.initialize(PROMPTS, torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0]))
    local = slice(None) if rows is None else rows
    result = {"advantages": [], "rho": [], "kl": []}
    for step in range(STEPS):
        rewards, old, ref, new = step_inputs(step)
        shard = [t[local] if has_logprobs else None for t in (old, ref, new)]
        out = algo.advantages(PROMPTS, rewards, MASK, GROUPS, rows=rows, old_logprobs=shard[0], ref_logprobs=shard[1])
        result["advantages"].append(out.advantages)
        result["kl"].append(algo.step_kl)
        prev_mask, prev = previous_inputs(algo, step)
        ids = torch.arange(B * T).reshape(B, T) + 1000 * step
        metrics = algo.after_update(PROMPTS, rewards, MASK, rows=rows, response_ids=ids, new_logprobs=shard[2],
                                    previous_logprobs=prev[local] if has_logprobs else None, previous_mask=prev_mask)
        result["rho"].append(metrics.get("tracker/rho"))
    result["state"] = algo.state_dict()
    return result


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    from mssr_megatron.train.run_checkpoint import check_algorithm_state_agrees

    dist.init_process_group("gloo")
    try:
        results = {}
        rows = torch.arange(rank * B // 2, (rank + 1) * B // 2)
        for name, cfg in CASES.items():
            results[name] = run_pipeline(cfg, rows=rows, dp_group=dist.group.WORLD)
        # the two processes as two pipeline stages of one replica: only the last (rank 1) has log-probs
        results["kl_window_pp2"] = run_pipeline(CASES["kl_window"], stage_group=dist.group.WORLD,
                                                has_logprobs=rank == 1)
        results["spo_pp2"] = run_pipeline(CASES["spo"], stage_group=dist.group.WORLD, has_logprobs=rank == 1)

        same = RLAlgorithm(CASES["kl_window"])
        same.initialize(PROMPTS, torch.ones(B))
        check_algorithm_state_agrees(same, step=7)
        diverged = RLAlgorithm(CASES["kl_window"])
        diverged.initialize(PROMPTS, torch.ones(B))
        diverged.tracker.update(PROMPTS, torch.ones(B), rho=0.875 if rank == 0 else 0.96)
        try:
            check_algorithm_state_agrees(diverged, step=7)
            results["guard"] = None
        except RuntimeError as e:
            results["guard"] = str(e)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2")
    spawn(_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_identical(a, b, where: str) -> None:
    """Bit-identical nested results (tensors compared with torch.equal, floats with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("name", list(CASES))
def test_two_replicas_keep_one_state_equal_to_one_process(ranks, name):
    whole = run_pipeline(CASES[name])
    for rank in (0, 1):
        got = ranks[rank][name]
        _assert_identical(got["state"], whole["state"], f"rank {rank} state")
        _assert_identical(got["rho"], whole["rho"], f"rank {rank} rho")
        _assert_identical(got["kl"], whole["kl"], f"rank {rank} kl")
        for step in range(STEPS):  # each replica's advantages are the whole batch's, for its rows
            _assert_identical(got["advantages"][step], whole["advantages"][step][rank * B // 2:(rank + 1) * B // 2],
                              f"rank {rank} advantages step {step}")
    if name != "reinforce_pp_kl_in_reward":
        assert len(set(whole["rho"])) == STEPS  # the rule's input moved every step: the comparison is not vacuous


def test_shard_local_kl_would_split_the_ranks():
    """The inputs discriminate: each half's own token-mean KL puts the kl_window rule on opposite sides of its jump
    (what every rank did before the KL was a global-batch statistic)."""
    from mssr_megatron.algorithms.losses import kl_penalty, masked_mean

    _, old, ref, _ = step_inputs(1)
    rho = []
    for half in (slice(0, B // 2), slice(B // 2, B)):
        rule = KLWindowRho.from_config(BaselineConfig())
        rho.append(rule.step_rho(kl=masked_mean(kl_penalty(old[half], ref[half], "k3"), MASK[half])))
    assert rho[0] > 0.875 and rho[1] == 0.875


@pytest.mark.parametrize("name", ["kl_window_pp2", "spo_pp2"])
def test_pipeline_stages_without_logprobs_keep_the_same_state(ranks, name):
    whole = run_pipeline(CASES[name.removesuffix("_pp2")])
    assert ranks[0][name]["advantages"] == [None] * STEPS  # the first stage neither has nor needs log-probs
    for rank in (0, 1):
        _assert_identical(ranks[rank][name]["state"], whole["state"], f"stage {rank} state")
        _assert_identical(ranks[rank][name]["rho"], whole["rho"], f"stage {rank} rho")


def test_checkpoint_refuses_a_state_that_diverged_between_ranks(ranks):
    for rank in (0, 1):
        message = ranks[rank]["guard"]
        assert message is not None and message.startswith("step 7: the algorithm state"), message
        assert "ranks [0]" in message and "ranks [1]" in message


def test_rows_must_be_the_replicas_block():
    algo = RLAlgorithm(dataclasses.replace(CASES["kl_window"]))
    _, old, ref, _ = step_inputs(0)
    with pytest.raises(ValueError, match="contiguous block"):
        algo.advantages(PROMPTS, torch.ones(B), MASK, rows=torch.arange(4), old_logprobs=old[:4], ref_logprobs=ref[:4])


def test_state_digest_tells_states_apart_by_one_ulp():
    from mssr_megatron.algorithms.distributed import state_digest

    state = {"tracker": {"alpha": torch.tensor([1.0, 2.0], dtype=torch.float64), "ids": ["a", 3]},
             "rule": {"history": [0.25], "scale": torch.tensor(0.5)}}
    twin = {"rule": {"scale": torch.tensor(0.5), "history": [0.25]},
            "tracker": {"ids": ["a", 3], "alpha": torch.tensor([1.0, 2.0], dtype=torch.float64)}}
    assert state_digest(state) == state_digest(twin)
    two = torch.tensor(2.0, dtype=torch.float64)
    twin["tracker"]["alpha"][1] = torch.nextafter(two, two + 1)
    assert state_digest(state) != state_digest(twin)
    assert state_digest({"ids": [3]}) != state_digest({"ids": ["3"]})
