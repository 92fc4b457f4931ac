"""Process groups for Megatron-Core, and the compute device: one call that every entry point (trainer, converter,
tests) makes.

    init_megatron(tp=2, pp=1, seed=0, device="auto")   # torch.distributed (nccl on GPU, gloo on CPU) + parallel_state
    device = compute_device("auto")                     # where models and micro-batches live: cuda:<local rank> or cpu
    ...
    destroy_megatron()

`compute_device` is the one place that turns `trainer.device` (auto / cpu / cuda) into a torch.device; the trainer's
models, the reference model and the HF rollout engine are all placed with it. `collective_device` is where tensors
handed to torch.distributed collectives must live (NCCL takes CUDA tensors only).

When the device is the CPU (no CUDA, or trainer.device=cpu) the megatron_patches.cpu patches are applied first, so the
same code runs on CPU + gloo. The world comes from the usual torchrun / srun environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without one, a single-process world on a free local port is created.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _current_backend() -> str | None:
    return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else None


def compute_device(requested: str = "auto", backend: str | None = None) -> torch.device:
    """The device the models and micro-batches run on, from `trainer.device`.

    auto: the current CUDA device when CUDA is available (init_megatron makes it cuda:<LOCAL_RANK>), else the CPU.
    cuda: the current CUDA device; an error when CUDA is not available. cpu: the CPU; an error when the collectives
    run on NCCL, which only moves CUDA tensors. `backend` defaults to that of the initialised default process group
    ("auto" or None: not checked).
    """
    if requested not in DEVICES:
        raise ValueError(f"trainer.device={requested!r} must be one of {', '.join(DEVICES)}")
    if backend is None:
        backend = _current_backend()
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise RuntimeError("trainer.device=cuda but torch finds no CUDA device (torch.cuda.is_available() is False): "
                           "run on a GPU node with a CUDA build of torch, or set trainer.device=cpu (or auto)")
    if requested == "cuda" or (requested == "auto" and cuda):
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "nccl":
        why = "trainer.device=cpu" if requested == "cpu" else "trainer.device=auto found no CUDA device, so it is cpu"
        raise RuntimeError(f"{why}, but parallel.backend=nccl needs CUDA tensors: set parallel.backend=gloo (or auto), "
                           "or train on CUDA (trainer.device=cuda or auto on a GPU node)")
    return torch.device("cpu")


def collective_device(group=None) -> torch.device:
    """Where tensors given to torch.distributed collectives of `group` must live: the current CUDA device when the
    group runs on NCCL (GPU-only: not run (no GPU was available)), else the CPU (gloo; no process group)."""
    if dist.is_available() and dist.is_initialized() and str(dist.get_backend(group)) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_megatron(tp: int = 1, pp: int = 1, seed: int = 0, backend: str = "auto", device: str = "auto") -> None:
    """Initialise torch.distributed and megatron-core's parallel state for a TP x PP x DP layout.

    device (trainer.device) picks the backend for backend="auto" (nccl on CUDA, gloo on the CPU) and, on CUDA, the
    rank's GPU (LOCAL_RANK). On the CPU the megatron_patches.cpu patches are applied, also on a GPU node with
    trainer.device=cpu (then megatron's CUDA device literals must map to the CPU too). The CUDA branches (set_device,
    nccl, and cpu on a GPU node) are GPU-only: not run (no GPU was available)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = compute_device(device, None if backend == "auto" else backend).type == "cuda"
    if not on_gpu:
        from megatron_patches.cpu import apply_cpu_patches

        apply_cpu_patches(force=torch.cuda.is_available())
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
