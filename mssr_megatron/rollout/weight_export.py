"""Trainer -> rollout engine weight sync: Megatron shards -> full HF-named tensors -> buckets -> engine.update_weights.

Every rank of a pipeline group takes part; its RECEIVER (`group_receiver`: the group's pipeline-stage-0 rank when it
hosts a rollout engine; without a list of hosts, the stage-0 rank of tensor-parallel rank 0) receives everything, and
groups without a receiver send nothing:
  1. each stage gathers its tensor-parallel shards one parameter at a time and turns them into HF tensors through
     the mapping table (`hf_bridge.export_hf_weights`);
  2. the receiver streams its own tensors, then receives those of stages 1..PP-1 in order, point to point from
     its group's rank of each stage (a header object, then the tensor), one tensor at a time;
  3. the receiver packs the stream into buckets of `bucket_bytes` (`buckets.stream_buckets`, one reused buffer, or one
     buffer per bucket for an engine that reads a bucket after its update call returned) and hands each to the
     engine before the next is built.
Peak extra memory on a receiver: one bucket plus one full parameter (and its TP shards while gathering).

Devices: tensors stay where the model is (on GPU, the exported tensors and the buckets are CUDA tensors); the engine
takes them from there (HF: an in-place copy into its own weights on any device; SGLang: CUDA IPC handles; vLLM:
`bucket_rpc_args` copies each bucket to the host for its RPC). Point-to-point receive buffers are allocated where the
pipeline group's backend needs them (`parallel.collective_device`: CUDA under NCCL). The CUDA path is GPU-only: not
run (no GPU was available); the same code runs on CPU + gloo in the tests.
"""

from __future__ import annotations

import time
from typing import Collection, Iterator

import torch
import torch.distributed as dist

from mssr_megatron.checkpoint.hf_bridge import export_hf_weights
from mssr_megatron.checkpoint.mapping import ModelDims
from mssr_megatron.rollout.buckets import WeightBucket, stream_buckets

_END = None  # header that closes a stage's stream


def _layout():
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 0, 1, None
    return (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_group())


def is_weight_owner() -> bool:
    """Whether this rank receives the full weights by default (pipeline stage 0, tensor-parallel rank 0)."""
    tp_rank, pp_rank, _, _ = _layout()
    return tp_rank == 0 and pp_rank == 0


def group_receiver(hosts: Collection[int] | None = None) -> int | None:
    """The global rank that receives this rank's pipeline group's full weights, or None when the group has no
    receiver. With `hosts` (the engines' host ranks): the group's stage-0 rank when it hosts an engine (any TP rank:
    export_hf_weights all-gathers the TP shards, so every TP rank of a stage holds the full tensors). Without: the
    stage-0 rank of the groups of TP rank 0 (`is_weight_owner`)."""
    tp_rank, _, pp_size, pp_group = _layout()
    if pp_size == 1:
        stage0 = dist.get_rank() if dist.is_initialized() else 0
    else:
        stage0 = dist.get_global_rank(pp_group, 0)
    if hosts is None:
        return stage0 if tp_rank == 0 else None
    return stage0 if stage0 in hosts else None


def export_full_weights(model, dims: ModelDims, dtype: torch.dtype | None = None,
                        hosts: Collection[int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """On a receiver (`group_receiver(hosts)`): every (published HF name, full tensor) of the model, stage by stage.
    The later stages of its pipeline group send their tensors; ranks of groups without a receiver only help gather
    the TP shards and send nothing. Yields nothing off the receivers. Must be iterated to the end on every rank."""
    _, pp_rank, pp_size, pp_group = _layout()
    local = export_hf_weights(model, dims, dtype)
    receiver = group_receiver(hosts)
    me = dist.get_rank() if dist.is_initialized() else 0
    if receiver is None:
        _drain(local)
        return
    if pp_rank == 0:
        if me != receiver:  # pp_size 1: a rank that is not a host only helps gather
            _drain(local)
            return
        yield from local
        from mssr_megatron.parallel import collective_device

        device = collective_device(pp_group)  # receive buffers: CUDA under NCCL
        for stage in range(1, pp_size):
            src = dist.get_global_rank(pp_group, stage)
            while (header := _recv_object(src)) is not _END:
                name, shape, dtype_name = header
                tensor = torch.empty(shape, dtype=getattr(torch, dtype_name), device=device)
                dist.recv(tensor, src=src)
                yield name, tensor
        return
    for name, tensor in local:
        _send_object((name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")), receiver)
        dist.send(tensor.contiguous(), dst=receiver)
    _send_object(_END, receiver)


def _drain(iterator) -> list:
    for _ in iterator:
        pass
    return []


def _send_object(obj, dst: int) -> None:
    dist.send_object_list([obj], dst=dst)


def _recv_object(src: int):
    box = [None]
    dist.recv_object_list(box, src=src)
    return box[0]


def check_verifiable(engine) -> None:
    """Raise if sync_weights(verify=True) cannot verify `engine`: only engines that report a checksum per published
    weight (`weight_checksums`, the HF engine) can be compared with what was sent."""
    if engine is not None and not callable(getattr(engine, "weight_checksums", None)):
        name = type(engine).__name__
        raise ValueError(
            f"sync_weights(verify=True): the {name} rollout engine reports no per-weight checksums, so what it holds "
            "cannot be compared with what was sent. Verify the weight export with rollout.engine=hf (same trainer "
            "and buckets), or call sync_weights with verify=False")


def sync_weights(model, dims: ModelDims, engine, bucket_bytes: int, dtype: torch.dtype | None = None,
                 verify: bool = False, hosts: Collection[int] | None = None) -> dict[str, float]:
    """Push the model's current weights into `engine` on every receiver that holds one (`hosts`: the engines' host
    ranks, see `group_receiver`; other ranks only send or help gather) and report bytes, buckets, seconds and GB/s.
    verify=True compares the engine's checksums with what was sent; an engine without checksums is refused before
    anything is sent (`check_verifiable`).

    An engine whose class sets `reads_buckets_after_return = True` (SGLang: CUDA IPC, unsynchronised copy) gets a
    fresh buffer per bucket, so no bucket is overwritten while the engine may still read it."""
    if verify:
        check_verifiable(engine)
    start = time.perf_counter()
    sent: dict[str, str] = {}
    total = count = 0
    fresh = bool(getattr(engine, "reads_buckets_after_return", False))
    receives = group_receiver(hosts) == (dist.get_rank() if dist.is_initialized() else 0) and engine is not None

    def buckets() -> Iterator[WeightBucket]:
        nonlocal total, count
        for bucket in stream_buckets(export_full_weights(model, dims, dtype, hosts), bucket_bytes,
                                     fresh_buffers=fresh):
            total += bucket.nbytes
            count += 1
            if verify:
                sent.update(bucket.checksums())
            yield bucket

    if receives:
        engine.update_weights(buckets())
    else:  # other ranks only send (or help gather); without `hosts`, an owner without an engine drops the stream
        for _ in export_full_weights(model, dims, dtype, hosts):
            pass
    seconds = time.perf_counter() - start
    metrics = {"sync/bytes": float(total), "sync/buckets": float(count), "sync/seconds": seconds,
               "sync/gb_per_s": total / seconds / 1e9 if seconds > 0 else 0.0}
    if verify and receives:
        held = engine.weight_checksums()
        bad = sorted(name for name, digest in sent.items() if held.get(name) != digest)
        if bad:
            raise RuntimeError(f"weight sync verification failed for {len(bad)} tensors, e.g. {bad[:3]}")
        metrics["sync/verified_tensors"] = float(len(sent))
    return metrics
