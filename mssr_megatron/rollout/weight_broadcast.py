"""Trainer side of SGLang's `update_weights_from_distributed`: weights broadcast over a process group that joins the
trainer's weight owner (rank 0) and every TP rank of an engine (ranks 1..tp), for engines on other GPUs.

How SGLang 0.5.23 joins (srt/utils/common.py `init_custom_process_group`, called by the engine's
`init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name, backend)`):
`rendezvous("tcp://addr:port", rank, world_size)` -> PrefixStore(group_name, store) -> torch's
`_new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name)`, ranks mapped 1:1. The
sender builds its end the same way as rank 0, so it also hosts the TCP store. Per bucket the engine then receives:
  * load_format="flattened_bucket": ONE broadcast into `FlattenedTensorBucket.empty(names, dtypes, shapes)`, whose
    layout is the tensors end to end with no padding (it refuses misaligned offsets);
  * load_format=None: one broadcast per tensor, in the order of `names`.
`distributed_update_args` picks the first when the bucket's layout is exactly that (no alignment padding), else the
second. dtypes travel as torch attribute names ("bfloat16"): the engine does getattr(torch, dtype).

NCCL between trainer and engine GPUs is GPU-only; the same code runs with backend="gloo", which is how
tests/test_sglang_payloads.py checks it on CPU against SGLang's own receive code.
"""

from __future__ import annotations

from datetime import timedelta

import torch

from mssr_megatron.rollout.buckets import WeightBucket


def is_unpadded(bucket: WeightBucket) -> bool:
    """Whether the bucket's tensors lie end to end from byte 0 with no padding (SGLang's receive layout)."""
    offset = 0
    for meta in bucket.metadata:
        if meta.start_idx != offset:
            return False
        offset = meta.end_idx
    return offset == bucket.flat.numel()


def distributed_update_args(bucket: WeightBucket) -> dict:
    """Keyword arguments of the engine's `update_weights_from_distributed` for one bucket (group_name and
    flush_cache aside): names, dtypes (torch attribute names), shapes, load_format."""
    return {
        "names": [m.name for m in bucket.metadata],
        "dtypes": [str(m.dtype).removeprefix("torch.") for m in bucket.metadata],
        "shapes": [list(m.shape) for m in bucket.metadata],
        "load_format": "flattened_bucket" if is_unpadded(bucket) else None,
    }


class DistributedWeightSender:
    """GPU-only with NCCL: not run in CI (no CUDA here); with backend="gloo" it is tested on CPU.

    Rank 0 of a [trainer, engine TP ranks] group: `init_group()` while the engine runs `init_weights_update_group`
    (`SGLangEngine.connect` does both), then `send(bucket, load_format)` for each bucket while the engine runs
    `update_weights_from_distributed` with `distributed_update_args(bucket)`."""

    def __init__(self, master_address: str, master_port: int, engine_tp_size: int, *,
                 group_name: str = "mssr_weight_sync", backend: str = "nccl", timeout_s: float = 600.0):
        self.master_address, self.master_port = master_address, int(master_port)
        self.world_size = 1 + int(engine_tp_size)
        self.group_name, self.backend = group_name, backend
        self.timeout = timedelta(seconds=timeout_s)
        self._group = None

    def init_group(self) -> None:
        """Create the group as rank 0, exactly as SGLang's receivers create theirs (see module docstring)."""
        from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world
        from torch.distributed.distributed_c10d import rendezvous

        store, rank, world_size = next(rendezvous(f"tcp://{self.master_address}:{self.master_port}", 0,
                                                  self.world_size, timeout=self.timeout))
        store.set_timeout(self.timeout)
        # torch has no public API for a group outside the default world; SGLang uses the same private helper.
        group, _ = _new_process_group_helper(world_size, rank, [], Backend(self.backend),
                                             PrefixStore(self.group_name, store), group_name=self.group_name,
                                             timeout=self.timeout)
        _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
        self._group = group

    def send(self, bucket: WeightBucket, load_format: str | None) -> None:
        """Broadcast one bucket in the form the engine expects for `load_format` (see module docstring)."""
        if self._group is None:
            raise RuntimeError("DistributedWeightSender.send before init_group")
        if load_format == "flattened_bucket":
            if not is_unpadded(bucket):
                raise ValueError("a padded bucket cannot be received as flattened_bucket; send it tensor by tensor")
            torch.distributed.broadcast(bucket.flat, src=0, group=self._group)
            return
        if load_format is not None:
            raise ValueError(f"unknown load_format {load_format!r}")
        for _, tensor in bucket.named_tensors():  # views of the bucket: contiguous, as collectives need
            torch.distributed.broadcast(tensor, src=0, group=self._group)

    def close(self) -> None:
        if self._group is not None:
            torch.distributed.destroy_process_group(self._group)
            self._group = None


class BroadcastWeightsEngine:
    """GPU-only: not run (no GPU was available). An SGLang engine on GPUs the trainer does not use
    (rollout.colocate=false), connected to a `DistributedWeightSender` in its host's process: `update_weights` sends
    each bucket by NCCL broadcast (`SGLangEngine.update_weights_distributed`) instead of CUDA IPC; every other call
    goes to the engine."""

    reads_buckets_after_return = True  # the broadcast runs on NCCL's stream: each bucket keeps its own buffer

    def __init__(self, engine, sender: DistributedWeightSender):
        self.engine, self.sender = engine, sender

    def update_weights(self, buckets) -> None:
        self.engine.update_weights_distributed(buckets, self.sender)

    def shutdown(self) -> None:
        self.sender.close()
        self.engine.shutdown()

    def __getattr__(self, name):
        return getattr(self.engine, name)
