"""Where the rollout engines run (`rollout.engines`): which trainer rank drives each engine, on which GPUs of its node.

    slots = engine_slots("per_node", world_size=16, ranks_per_node=8, gpus_per_node=8, tp=2, pp=1,
                         engine_tp_size=1, colocate=True)     # 16 engines, one per GPU, driven by ranks 0..15
    slots = live_engine_slots(cfg.rollout, device)            # the same for the running job (after init_megatron)

Modes:
  * single: one engine for the job, driven by global rank 0.
  * per_dp_group: one engine per data-parallel replica, driven by the replica's weight owner (TP rank 0, pipeline
    stage 0), on `engine_tp_size` GPUs from the host's own GPU.
  * per_node: the engines fill each node's GPUs: GPUs // engine_tp_size engines per node, engine k on local GPUs
    [k * tp_e, (k + 1) * tp_e), driven by the trainer rank at local rank k * tp_e. Several engines rather than one
    engine with SGLang's data parallelism: SGLang 0.5.23 refuses weight updates from tensors when dp_size > 1
    (tokenizer_control_mixin.py asserts dp_size == 1). On the CPU (no GPUs) a node's trainer ranks are its slots:
    one process, one HF engine.

Every host must be on pipeline stage 0: a stage-0 rank receives the full weights from its own pipeline group (see
weight_export.py; every TP rank of a stage holds the full tensors after export_hf_weights' all-gather).

`colocate=False`: the engines run on the GPUs of the node that the trainer does not use (local GPUs
ranks_per_node .. gpus_per_node - 1), driven by the node's stage-0 trainer ranks; weights go over NCCL broadcast
(weight_broadcast.DistributedWeightSender). On the CPU it only keeps the engine's memory through training
(factory.Colocation); each engine still lives in its host process.

Rank order: megatron-core 0.16.1 `parallel_state.initialize_model_parallel(order="tp-cp-ep-dp-pp")`, whose
`RankGenerator` varies the first name fastest, so with CP = EP = 1: global rank = tp + TP * (dp + DP * pp).
Nodes hold consecutive global ranks (torchrun / srun): node = rank // ranks_per_node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mssr_megatron.config_loader import ConfigError

ENGINE_MODES = ("per_node", "per_dp_group", "single")


@dataclass(frozen=True)
class EngineSlot:
    """One rollout engine: its position in the prompt order, the trainer rank that drives it, and where it runs."""

    index: int
    """Engine number; engine k generates the k-th contiguous slice of a step's prompts."""
    host_rank: int
    """Global trainer rank that builds and drives the engine (pipeline stage 0)."""
    node: int
    """Node of the host (global rank // ranks per node)."""
    gpu_ids: tuple[int, ...]
    """Local CUDA device ids of the engine on its node (empty on the CPU)."""


def megatron_coordinates(rank: int, tp: int, pp: int, world_size: int) -> tuple[int, int, int]:
    """(tensor-parallel rank, data-parallel rank, pipeline stage) of a global rank in megatron's default order."""
    dp = world_size // (tp * pp)
    return rank % tp, (rank // tp) % dp, rank // (tp * dp)


def engine_slots(mode: str, *, world_size: int, ranks_per_node: int, gpus_per_node: int, tp: int, pp: int,
                 engine_tp_size: int, colocate: bool) -> list[EngineSlot]:
    """The job's engines, ordered by host rank (= slice order). gpus_per_node = 0 on the CPU. ConfigError, naming
    the fix, for a placement that cannot work."""
    if mode not in ENGINE_MODES:
        raise ConfigError(f"rollout.engines={mode!r} must be one of {', '.join(ENGINE_MODES)}")
    if world_size % (tp * pp) or world_size % ranks_per_node:
        raise ConfigError(f"world size {world_size} must be divisible by TP x PP = {tp * pp} and by the ranks per "
                          f"node ({ranks_per_node})")
    separate = not colocate and gpus_per_node > 0  # on the CPU an engine lives in its host process either way
    if separate and gpus_per_node - ranks_per_node < engine_tp_size:
        raise ConfigError(
            f"rollout.colocate=false puts the engines on GPUs the trainer does not use, but {ranks_per_node} trainer "
            f"ranks per node leave {max(gpus_per_node - ranks_per_node, 0)} of the node's {gpus_per_node} GPUs and "
            f"an engine needs rollout.engine_tp_size={engine_tp_size}: run fewer ranks per node (--procs-per-node, "
            "NPROC_PER_NODE) or set rollout.colocate=true")
    nodes = world_size // ranks_per_node
    dp = world_size // (tp * pp)
    if mode == "single":
        hosts = [0]
    elif mode == "per_dp_group":
        hosts = [tp * d for d in range(dp)]  # (tp 0, dp d, stage 0)
    elif not separate:
        slots = (min(gpus_per_node, ranks_per_node) if gpus_per_node else ranks_per_node) // engine_tp_size
        if slots == 0:
            raise ConfigError(f"rollout.engines=per_node: rollout.engine_tp_size={engine_tp_size} is larger than a "
                              f"node's {gpus_per_node or ranks_per_node} trainer GPUs (or CPU ranks); lower it")
        hosts = [n * ranks_per_node + k * engine_tp_size for n in range(nodes) for k in range(slots)]
    else:  # per_node on the spare GPUs: as many engines as fit, each driven by one of the node's stage-0 ranks
        per_node = (gpus_per_node - ranks_per_node) // engine_tp_size
        hosts = []
        for n in range(nodes):
            stage0 = [r for r in range(n * ranks_per_node, (n + 1) * ranks_per_node)
                      if megatron_coordinates(r, tp, pp, world_size)[2] == 0]
            hosts += stage0[:per_node]
    for host in hosts:
        stage = megatron_coordinates(host, tp, pp, world_size)[2]
        if stage != 0:
            raise ConfigError(
                f"rollout.engines={mode}: rank {host} (node {host // ranks_per_node}) would drive an engine but is on "
                f"pipeline stage {stage}; only stage-0 ranks receive the full weights. Use rollout.engines="
                "per_dp_group (engines on the stage-0 ranks) or single, or a layout whose nodes all hold stage-0 ranks")
    slots = [EngineSlot(i, h, h // ranks_per_node, ()) for i, h in enumerate(hosts)]
    if gpus_per_node:
        slots = _place_on_gpus(slots, mode, ranks_per_node, gpus_per_node, engine_tp_size, not separate)
    return slots


def _place_on_gpus(slots: list[EngineSlot], mode: str, ranks_per_node: int, gpus_per_node: int, engine_tp_size: int,
                   colocate: bool) -> list[EngineSlot]:
    """GPU ids for each slot: from the host's GPU (colocated) or the node's spare GPUs in host order (separate)."""
    placed, used_on_node = [], {}
    for slot in slots:
        if colocate:
            first = slot.host_rank % ranks_per_node
        else:
            first = ranks_per_node + used_on_node.get(slot.node, 0) * engine_tp_size
            used_on_node[slot.node] = used_on_node.get(slot.node, 0) + 1
        gpus = tuple(range(first, first + engine_tp_size))
        if gpus[-1] >= gpus_per_node:
            where = "the trainer's GPUs" if colocate else f"the spare GPUs {ranks_per_node}..{gpus_per_node - 1}"
            raise ConfigError(
                f"rollout.engines={mode}: engine {slot.index} needs GPUs {gpus[0]}..{gpus[-1]} of node {slot.node}, "
                f"beyond {where} of its {gpus_per_node}: lower rollout.engine_tp_size"
                + ("" if colocate else ", train on fewer ranks per node, or use more GPUs per node"))
        placed.append(EngineSlot(slot.index, slot.host_rank, slot.node, gpus))
    taken: dict[tuple[int, int], int] = {}
    for slot in placed:
        for gpu in slot.gpu_ids:
            other = taken.setdefault((slot.node, gpu), slot.index)
            if other != slot.index:
                raise ConfigError(
                    f"rollout.engines={mode}: engines {other} and {slot.index} would share GPU {gpu} of node "
                    f"{slot.node} (engine_tp_size {engine_tp_size} is more than the GPUs between their hosts): use "
                    "rollout.engines=per_node, or a smaller rollout.engine_tp_size")
    return placed


def live_engine_slots(rollout_cfg, device) -> list[EngineSlot]:
    """`engine_slots` of the running job (after init_megatron): world and node size from torch.distributed and the
    launcher (LOCAL_WORLD_SIZE, as torchrun sets it; the whole world without one), TP and PP from parallel_state,
    GPUs per node from CUDA when `device` (the trainer's torch.device) is a GPU, else 0."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else 1
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    tp, pp = ((ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
              if ps.model_parallel_is_initialized() else (1, 1))
    return engine_slots(rollout_cfg.engines, world_size=world, ranks_per_node=ranks_per_node, gpus_per_node=gpus,
                        tp=tp, pp=pp, engine_tp_size=rollout_cfg.engine_tp_size, colocate=rollout_cfg.colocate)


def prompt_slices(num_prompts: int, num_engines: int) -> list[tuple[int, int]]:
    """(start, end) of each engine's contiguous share of the prompts, in engine order; sizes differ by at most one."""
    return [(k * num_prompts // num_engines, (k + 1) * num_prompts // num_engines) for k in range(num_engines)]


def reward_workers_per_host(workers_per_node: int, slots: list[EngineSlot], host_rank: int) -> int:
    """The reward worker pool of one engine host: `data.reward_workers` of its node split over the node's hosts (the
    first get one more), at least one each; 0 grades inline."""
    if workers_per_node == 0:
        return 0
    node = next(s.node for s in slots if s.host_rank == host_rank)
    on_node = [s.host_rank for s in slots if s.node == node]
    share, extra = divmod(workers_per_node, len(on_node))
    return max(1, share + (on_node.index(host_rank) < extra))


def node_reward_workers(workers_per_node: int, slots: list[EngineSlot], node: int) -> int:
    """Reward worker processes running on `node` (the sum of its hosts' pools)."""
    return sum(reward_workers_per_host(workers_per_node, slots, s.host_rank) for s in slots if s.node == node)
