"""Process groups for Megatron-Core, and the compute device: one call that every entry point (trainer, converter,
tests) makes.

    init_megatron(tp=2, pp=1, seed=0, device="auto")   # torch.distributed (nccl on GPU, gloo on CPU) + parallel_state
    device = compute_device("auto")                     # where models and micro-batches live: cuda:<local rank> or cpu
    rollouts = wait_for_driver(lambda: engine.generate(...), "rollout")   # rank 0 works, every rank gets the result
    parts = run_on_hosts(lambda: engine.generate(...), [0, 8], "rollout")  # ranks 0 and 8 work, all get both results
    ...
    destroy_megatron()

Waiting for the hosts: while the engines' host ranks generate or grade (minutes to hours on a 7B run), no rank may
sit in a collective, where NCCL's watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, as the SLURM scripts set) would kill
the job after the process-group timeout. `run_on_hosts` (and `wait_for_driver`, its one-host form) makes every rank
poll the rendezvous TCPStore for per-call keys instead, and only then join the (short) exchange of the results.
`parallel.timeout_minutes` bounds the collectives that remain.

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
import time
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")
T = TypeVar("T")


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


def init_megatron(tp: int = 1, pp: int = 1, seed: int = 0, backend: str = "auto", device: str = "auto",
                  timeout_minutes: float = 60.0) -> None:
    """Initialise torch.distributed and megatron-core's parallel state for a TP x PP x DP layout.

    device (trainer.device) picks the backend for backend="auto" (nccl on CUDA, gloo on the CPU) and, on CUDA, the
    rank's GPU (LOCAL_RANK). On the CPU the megatron_patches.cpu patches are applied, also on a GPU node with
    trainer.device=cpu (then megatron's CUDA device literals must map to the CPU too). timeout_minutes
    (parallel.timeout_minutes) is the timeout of the default process group, of its store, and of every group
    megatron-core creates. The CUDA branches (set_device, nccl, and cpu on a GPU node) are GPU-only: not run (no GPU
    was available)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    on_gpu = compute_device(device, None if backend == "auto" else backend).type == "cuda"
    if not on_gpu:
        from megatron_patches.cpu import apply_cpu_patches

        apply_cpu_patches(force=torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if on_gpu else "gloo"
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        init_method = None  # the launcher's world (env://: MASTER_ADDR, MASTER_PORT)
        if "MASTER_PORT" not in os.environ:
            # No launcher: a private world on a free port, given directly rather than through os.environ, so that
            # processes this one starts later (tests, tools) do not inherit a port that this world's store holds.
            init_method = f"tcp://{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{free_port()}"
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tensor x pipeline parallel size {tp} x {pp}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             distributed_timeout_minutes=timeout_minutes)
    model_parallel_cuda_manual_seed(seed)


def destroy_megatron() -> None:
    global _driver_calls
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _driver_calls = 0  # the next process group's store starts without keys


_driver_calls = 0  # run_on_hosts calls in this process group: the same sequence on every rank
_MAX_POLL_S = 0.1


def run_on_hosts(work: Callable[[], T], hosts: Sequence[int], what: str, *, share: bool = True):
    """Run `work()` on each global rank in `hosts` at once while every other rank waits, outside any collective.

    Every rank polls the default process group's TCPStore until each host has posted this call's key
    (`Store.check` does not block; sleeps back off to 0.1 s), so no NCCL/gloo timeout runs while the hosts work,
    however long; a host that finishes early waits the same way for the others. Then, with `share`, every rank
    returns the list of the hosts' results in `hosts` order (one all_gather_object, entered when all are ready);
    without it, each host returns its own result and the others None (for results that stay where they were made,
    such as an engine). An exception in `work` is raised on its host and, naming it, on every other rank; a host
    process that dies is the launcher's to handle (torchrun ends the other workers, as `srun --kill-on-bad-exit`
    in examples/slurm does). Every rank must make the same calls in the same order (the key is a per-call
    counter). One process: `[work()]` (or `work()` without `share`).
    """
    global _driver_calls
    hosts = list(hosts)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        result = work()
        return [result] if share else result
    store = dist.distributed_c10d._get_default_store()  # the rendezvous store (no public accessor in torch 2.13)
    key = f"mssr/run_on_hosts/{_driver_calls}"
    _driver_calls += 1
    rank, result = dist.get_rank(), None
    if rank in hosts:
        try:
            result = work()
        except BaseException as exc:
            store.set(f"{key}/{rank}", f"failed: {type(exc).__name__}: {exc}")
            raise
        store.set(f"{key}/{rank}", "done")
    keys = [f"{key}/{host}" for host in hosts]
    delay = 0.001
    while not store.check(keys):
        time.sleep(delay)
        delay = min(2 * delay, _MAX_POLL_S)
    failed = [(host, status) for host, status in zip(hosts, (store.get(k).decode() for k in keys))
              if status != "done"]
    if store.add(f"{key}/seen", 1) == dist.get_world_size():  # the last reader removes the call's keys
        for k in keys + [f"{key}/seen"]:
            store.delete_key(k)
    if failed:  # a host that failed raised its own exception above
        host, status = failed[0]
        raise RuntimeError(f"rank {host} {status} (during {what}); this rank stops too")
    if not share:
        return result
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return [gathered[host] for host in hosts]


def wait_for_driver(work: Callable[[], T], what: str, *, src: int = 0, share: bool = True) -> T | None:
    """`run_on_hosts` with one host, global rank `src`: with `share` every rank returns its result, without it
    `src` does and the others get None."""
    result = run_on_hosts(work, [src], what, share=share)
    return result[0] if share else result
