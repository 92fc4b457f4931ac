"""Rollout waits vs the collective timeout: while rank 0's engine generates (and its grader grades) for longer than
`parallel.timeout_minutes`, the other rank waits on the store, not in a collective, and gets the results.

Real processes on gloo (2 ranks) with a 3 s process-group timeout. The engine and grader are slow fakes: they stand in
for SGLang on a 7B model, which takes minutes where the NCCL watchdog allows 10 by default.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from megatron_harness import spawn

TIMEOUT_MINUTES = 0.05  # 3 s
WORK_S = 5.0  # longer than the timeout


class SlowEngine:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def generate(self, requests, sampling):
        from mssr_megatron.rollout.protocol import Rollout

        time.sleep(WORK_S)
        if self.fail:
            raise RuntimeError("engine crashed")
        return [Rollout(r.request_id, 0, [1, 2], [7, 8, 9], [-0.5, -0.25, -0.125], "stop", f"answer {r.request_id}")
                for r in requests]


class SlowGrader:
    def score(self, texts, answers, format_weight):
        from mssr_megatron.rewards import BatchScores

        time.sleep(WORK_S)
        correct = [float(t == f"answer {a}") for t, a in zip(texts, answers)]
        return BatchScores(scores=correct, correct=correct, format=[0.0] * len(texts))


def _fake_context(rank: int, fail: bool = False):
    import mssr_megatron.data.prompts as prompts
    from mssr_megatron.rollout.placement import EngineSlot
    from mssr_megatron.rollout.protocol import GenerationRequest

    # requests without a processor: rl_step.generate's prompt building is not what this test is about
    prompts.build_request = lambda rec, template, processor, request_id=None: GenerationRequest(request_id, rec.prompt)
    from mssr_megatron.config import DataConfig

    cfg = SimpleNamespace(data=DataConfig(format_reward_weight=0.0))
    return SimpleNamespace(cfg=cfg, processor=None, is_driver=rank == 0, engine_slots=[EngineSlot(0, 0, 0, ())],
                           engine=SlowEngine(fail) if rank == 0 else None, grader=SlowGrader() if rank == 0 else None)


def _worker(rank: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from mssr_megatron.train import rl_step
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.rollout.protocol import SamplingParams

    init_megatron(backend="gloo", device="cpu", timeout_minutes=TIMEOUT_MINUTES)
    timeouts = _timeouts_seconds()
    records = [SimpleNamespace(prompt=f"q{i}", answer=str(i)) for i in range(3)]
    ctx = _fake_context(rank)
    start = time.perf_counter()
    rollouts = rl_step.generate(ctx, records, SamplingParams())
    rewards, metrics = rl_step.grade(ctx, records, rollouts)
    waited = time.perf_counter() - start
    flag = torch.ones(1)
    dist.all_reduce(flag)  # the process group still works after the waits
    error = None
    try:  # the driver's engine fails after the timeout: the other rank learns why, and does not hang
        rl_step.generate(_fake_context(rank, fail=True), records, SamplingParams())
    except RuntimeError as exc:
        error = str(exc)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"ids": [[r.request_id, r.response_ids, r.response_logprobs, r.text] for r in rollouts],
                   "rewards": rewards, "accuracy": metrics["reward/accuracy"], "waited": waited,
                   "all_reduce": flag.item(), "error": error, "timeouts": timeouts}, f)
    destroy_megatron()


def _timeouts_seconds() -> dict[str, float]:
    """The timeouts torch holds for the default group, its store and megatron-core's groups."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    groups = {"default": dist.group.WORLD, "tensor": ps.get_tensor_model_parallel_group(),
              "data": ps.get_data_parallel_group(), "data_gloo": ps.get_data_parallel_group_gloo()}
    seconds = {name: group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
               for name, group in groups.items()}
    seconds["store"] = dist.distributed_c10d._get_default_store().timeout.total_seconds()
    return seconds


@pytest.mark.slow
def test_waiting_ranks_outlive_a_generation_longer_than_the_timeout(tmp_path):
    spawn(_worker, 2, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = [[str(i), [7, 8, 9], [-0.5, -0.25, -0.125], f"answer {i}"] for i in range(3)]
    for rank, result in enumerate(results):
        assert result["ids"] == expected, rank
        assert result["rewards"] == [1.0, 1.0, 1.0] and result["accuracy"] == 1.0
        assert result["waited"] >= 2 * WORK_S > 2 * TIMEOUT_MINUTES * 60  # really waited past the timeout, twice
        assert result["all_reduce"] == 2.0
        # parallel.timeout_minutes reached every group (megatron-core's own default is 30 minutes) and the store
        assert result["timeouts"] == {"default": 3.0, "tensor": 3.0, "data": 3.0, "data_gloo": 3.0, "store": 3.0}
    assert results[0]["error"] == "engine crashed"
    assert results[1]["error"] == "rank 0 failed: RuntimeError: engine crashed (during rollout generation); " \
                                  "this rank stops too"


def test_timeout_minutes_default_and_check():
    from mssr_megatron.config import ConfigError, RunConfig, load_config

    assert RunConfig().parallel.timeout_minutes == 60.0
    with pytest.raises(ConfigError, match=r"parallel.timeout_minutes=0.0 must be > 0"):
        load_config(None, ["parallel.timeout_minutes=0"]).validate()
