"""Process groups for Megatron-Core: one call that every entry point (trainer, converter, tests) makes.

    init_megatron(tp=2, pp=1, seed=0)   # torch.distributed (nccl on GPU, gloo on CPU) + megatron parallel_state
    ...
    destroy_megatron()

On a machine without CUDA the megatron_patches.cpu patches are applied first, so the same code runs on CPU + gloo.
The world comes from the usual torchrun / srun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); without
one, a single-process world on a free local port is created.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron(tp: int = 1, pp: int = 1, seed: int = 0, backend: str = "auto") -> None:
    """Initialise torch.distributed and megatron-core's parallel state for a TP x PP x DP layout."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        from megatron_patches.cpu import apply_cpu_patches

        apply_cpu_patches()
    if backend == "auto":
        backend = "nccl" if on_gpu else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(backend, rank=rank, world_size=world)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor x pipeline parallel size {tp} x {pp}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(seed)


def destroy_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
