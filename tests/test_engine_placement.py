"""rollout.engines placement (rollout/placement.py): which rank drives each engine and on which GPUs, for the layouts
the published configs and the SLURM scripts use. Expected slots are worked out by hand from megatron-core's rank
order (global rank = tp + TP * (dp + DP * pp)); megatron_coordinates is checked against parallel_state itself."""

from __future__ import annotations

import pytest

from mssr_megatron.config import ConfigError, load_config
from mssr_megatron.rollout.placement import EngineSlot, engine_slots, megatron_coordinates, prompt_slices


def _slots(mode, world, per_node, gpus, tp=1, pp=1, etp=1, colocate=True):
    return [(s.host_rank, s.node, s.gpu_ids) for s in engine_slots(
        mode, world_size=world, ranks_per_node=per_node, gpus_per_node=gpus, tp=tp, pp=pp, engine_tp_size=etp,
        colocate=colocate)]


def test_one_node_of_eight_gpus():
    assert _slots("per_node", 8, 8, 8) == [(r, 0, (r,)) for r in range(8)]
    assert _slots("per_node", 8, 8, 8, etp=2) == [(0, 0, (0, 1)), (2, 0, (2, 3)), (4, 0, (4, 5)), (6, 0, (6, 7))]
    assert _slots("single", 8, 8, 8) == [(0, 0, (0,))]
    assert _slots("per_dp_group", 8, 8, 8) == [(r, 0, (r,)) for r in range(8)]  # TP 1: every rank is a replica


def test_two_nodes_of_eight_gpus():
    assert _slots("per_node", 16, 8, 8) == [(r, r // 8, (r % 8,)) for r in range(16)]
    assert _slots("per_node", 16, 8, 8, etp=4) == [(0, 0, (0, 1, 2, 3)), (4, 0, (4, 5, 6, 7)),
                                                   (8, 1, (0, 1, 2, 3)), (12, 1, (4, 5, 6, 7))]
    slots = engine_slots("per_node", world_size=16, ranks_per_node=8, gpus_per_node=8, tp=1, pp=1,
                         engine_tp_size=1, colocate=True)
    assert [s.index for s in slots] == list(range(16)) and isinstance(slots[0], EngineSlot)


def test_tensor_parallel_trainer():
    # TP 2 (the 7B config): replicas are rank pairs; per_node still fills every GPU (TP rank 1 hosts too, it holds
    # the full tensors after the export's all-gather); per_dp_group uses the TP-rank-0 ranks
    assert _slots("per_node", 8, 8, 8, tp=2) == [(r, 0, (r,)) for r in range(8)]
    assert _slots("per_dp_group", 8, 8, 8, tp=2) == [(0, 0, (0,)), (2, 0, (2,)), (4, 0, (4,)), (6, 0, (6,))]
    assert _slots("per_dp_group", 8, 8, 8, tp=2, etp=2) == [(0, 0, (0, 1)), (2, 0, (2, 3)), (4, 0, (4, 5)),
                                                            (6, 0, (6, 7))]
    with pytest.raises(ConfigError, match="engines 0 and 1 would share GPU 2 of node 0"):
        _slots("per_dp_group", 4, 4, 8, tp=2, etp=3)


def test_pipeline_parallel_trainer():
    # PP 2 on 2 x 8 GPUs, TP 1: DP 8, stage 0 = ranks 0..7 (node 0), stage 1 = ranks 8..15 (node 1)
    assert _slots("per_dp_group", 16, 8, 8, pp=2) == [(r, 0, (r,)) for r in range(8)]
    assert _slots("single", 16, 8, 8, pp=2) == [(0, 0, (0,))]
    with pytest.raises(ConfigError, match=r"rank 8 \(node 1\) would drive an engine but is on pipeline stage 1.*"
                                          "rollout.engines=per_dp_group"):
        _slots("per_node", 16, 8, 8, pp=2)
    # TP 2 x PP 2 on one node: stage 0 = ranks 0..3; replicas' owners are ranks 0 and 2
    assert _slots("per_dp_group", 8, 8, 8, tp=2, pp=2) == [(0, 0, (0,)), (2, 0, (2,))]


def test_engines_on_spare_gpus():
    # colocate=false: 4 trainer ranks on an 8-GPU node leave GPUs 4..7 to engines driven by stage-0 ranks
    assert _slots("per_node", 4, 4, 8, colocate=False) == [(0, 0, (4,)), (1, 0, (5,)), (2, 0, (6,)), (3, 0, (7,))]
    assert _slots("per_node", 8, 4, 8, etp=2, colocate=False) == [(0, 0, (4, 5)), (1, 0, (6, 7)),
                                                                  (4, 1, (4, 5)), (5, 1, (6, 7))]
    assert _slots("single", 8, 4, 8, etp=4, colocate=False) == [(0, 0, (4, 5, 6, 7))]
    assert _slots("per_dp_group", 4, 4, 8, tp=2, etp=2, colocate=False) == [(0, 0, (4, 5)), (2, 0, (6, 7))]
    with pytest.raises(ConfigError, match=r"engine 2 needs GPUs 8..9 of node 0, beyond the spare GPUs 4..7"):
        _slots("per_dp_group", 8, 4, 8, tp=1, etp=2, colocate=False)  # 4 replicas on node 0, room for 2 engines
    with pytest.raises(ConfigError, match="8 trainer ranks per node leave 0 of the node.s 8 GPUs"):
        _slots("single", 8, 8, 8, colocate=False)  # no spare GPU at all
    # the CPU has no spare GPUs: colocate=false only keeps the engine's memory (factory.Colocation), same placement
    assert _slots("per_node", 2, 2, 0, colocate=False) == _slots("per_node", 2, 2, 0) == [(0, 0, ()), (1, 0, ())]


def test_cpu_counts_trainer_ranks_as_slots():
    assert _slots("per_node", 2, 2, 0) == [(0, 0, ()), (1, 0, ())]
    assert _slots("per_node", 4, 2, 0) == [(0, 0, ()), (1, 0, ()), (2, 1, ()), (3, 1, ())]
    assert _slots("single", 2, 2, 0) == [(0, 0, ())]
    assert _slots("per_dp_group", 4, 4, 0, tp=2) == [(0, 0, ()), (2, 0, ())]


def test_megatron_rank_order_is_parallel_states_own():
    """The coordinates equal megatron-core's RankGenerator with initialize_model_parallel's default order."""
    from megatron.core.parallel_state import RankGenerator

    tp, pp, world = 2, 2, 16
    dp = world // (tp * pp)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    for name, axis in (("tp", 0), ("dp", 1), ("pp", 2)):
        for group in gen.get_ranks(name):  # ranks differing only along `name`
            coords = [megatron_coordinates(r, tp, pp, world) for r in group]
            assert [c[axis] for c in coords] == list(range(len(group)))
            assert len({tuple(c[i] for i in range(3) if i != axis) for c in coords}) == 1


def test_prompt_slices_cover_every_prompt_once_in_order():
    assert prompt_slices(8, 2) == [(0, 4), (4, 8)]
    assert prompt_slices(5, 3) == [(0, 1), (1, 3), (3, 5)]
    assert prompt_slices(1, 2) == [(0, 0), (0, 1)]


def test_config_refuses_what_cannot_work():
    load_config(None, ["rollout.engines=per_dp_group", "parallel.pipeline_model_parallel_size=2"]).validate()
    with pytest.raises(ConfigError, match="rollout.engines=per_node puts an engine on the GPUs of every rank"):
        load_config(None, ["parallel.pipeline_model_parallel_size=2"]).validate()
    with pytest.raises(ConfigError, match="rollout.engines"):
        load_config(None, ["rollout.engines=per_gpu"])


def test_reward_workers_of_a_node_are_split_over_its_hosts():
    from mssr_megatron.rollout.placement import node_reward_workers, reward_workers_per_host

    slots = engine_slots("per_node", world_size=16, ranks_per_node=8, gpus_per_node=8, tp=2, pp=1,
                         engine_tp_size=1, colocate=True)
    assert [reward_workers_per_host(16, slots, r) for r in range(16)] == [2] * 16
    assert [reward_workers_per_host(3, slots, r) for r in range(8)] == [1] * 8  # at least one per host
    two = engine_slots("per_node", world_size=2, ranks_per_node=2, gpus_per_node=0, tp=1, pp=1,
                       engine_tp_size=1, colocate=True)
    assert [reward_workers_per_host(3, two, r) for r in range(2)] == [2, 1]
    assert node_reward_workers(3, two, 0) == 3 and node_reward_workers(0, two, 0) == 0
