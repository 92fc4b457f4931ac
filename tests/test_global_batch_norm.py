"""MSSR normalises over the GLOBAL batch: two gloo ranks holding halves of a batch get exactly what one process
gets for the whole batch (real processes through torch.multiprocessing.spawn)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mssr_megatron.parallel import free_port
from mssr_megatron.algorithms import AdvantageBatch, compute_advantages
from mssr_megatron.config import AlgorithmConfig

REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
BASELINE = torch.tensor([0.5, 0.25, 0.9, 0.1, 0.6, 0.5, 0.5, 0.3], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 0]])


def whole(estimator: str) -> torch.Tensor:
    b = AdvantageBatch(REWARDS, MASK, baseline=BASELINE, token_kl=torch.zeros(8, 3))
    return compute_advantages(estimator, b, AlgorithmConfig()).advantages


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        part = slice(4 * rank, 4 * rank + 4)
        results = {}
        for name in ("mssr", "reinforce_pp"):
            b = AdvantageBatch(REWARDS[part], MASK[part], baseline=BASELINE[part], token_kl=torch.zeros(4, 3))
            results[name] = compute_advantages(name, b, AlgorithmConfig(), group=dist.group.WORLD).advantages
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_normalise_over_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("mssr", "reinforce_pp"):
        sharded = torch.cat([p[name] for p in parts])
        torch.testing.assert_close(sharded, whole(name), rtol=0, atol=1e-6)
        # The halves alone would normalise differently: the all-reduce is what makes them agree.
        local = compute_advantages(
            name, AdvantageBatch(REWARDS[:4], MASK[:4], baseline=BASELINE[:4], token_kl=torch.zeros(4, 3)),
            AlgorithmConfig(),
        ).advantages
        assert not torch.allclose(local, whole(name)[:4])
