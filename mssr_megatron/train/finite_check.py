"""NaN/Inf checks of what a run keeps: the weights after each optimizer step, the optimizer state after a checkpoint
load, and both before a checkpoint or an HF export is written. A non-finite value stops the run (`NonFiniteError`):
nothing is rolled back, nothing of it is saved.

Why stop rather than roll back: a rollback needs a copy of the weights from before the step (for a 7B model, 14 GB
of bf16 weights copied every step, plus the Adam moments: the update that produced the NaN may have come from a bad
moment, which a retry would reuse), while the last checkpoint is already such a copy, checked finite when it was
written (`require_finite` runs before every save).

Where megatron-core 0.16.1 keeps what a step updates (megatron/core/optimizer/):
- FP32Optimizer (float32 weights): torch's Adam updates the model parameters themselves.
- Float16OptimizerWithFloat16Params (bf16/fp16 weights): Adam updates float32 main copies (`fp32_from_float16_groups`),
  which step() then copies into the model's parameters (`float16_groups`).
- DistributedOptimizer: each data-parallel rank updates its shard of the float32 main params (`shard_fp32_groups`,
  `shard_fp32_from_float16_groups`), copies it into the model's parameter buffer and all-gathers the buffer (at once:
  the actor turns overlap_param_gather off), so every rank holds the full updated weights when step() returns.
So after step() the model parameters hold the step's result on every rank (a NaN or an Inf of a main param reaches
them through the copy; a float32 value beyond bfloat16's range becomes Inf there): the per-step check reads them.
The state check reads the inner torch optimizer: each parameter it updates (main param or shard) and that parameter's
state (exp_avg, exp_avg_sq, step), named after the model parameter.

Every check ends in one collective over the world, so that every rank takes the same branch; the name of the first
non-finite tensor is gathered only when there is one (on NCCL through the current CUDA device: GPU-only: not run (no
GPU was available)). Cost: one aminmax per tensor (CPU, one thread, 256M bfloat16 values: 0.17 s, against 3.2 s for
isfinite().all()); CUDA tensors and Transformer Engine's FP8 weights: GPU-only: not run (no GPU was available).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from mssr_megatron.train import RunStopped


class NonFiniteError(RunStopped):
    """NaN/Inf in the weights or the optimizer state: the run stops without saving or exporting them."""


def _first_nonfinite(named: Iterable[tuple[str, object]]) -> str | None:
    """Name of the first tensor holding a NaN or an Inf, None when all are finite. One aminmax per tensor (NaN
    propagates through both, +Inf shows in the max, -Inf in the min): a single pass without isfinite's full-size
    boolean copy (0.5 GB for a 7B model's embedding); then one host sync for all of them."""
    import torch

    names, extremes = [], []
    for name, tensor in named:
        if tensor.numel():
            low, high = torch.aminmax(tensor.detach())
            names.append(name)
            extremes.append(torch.stack([low, high]).float())
    if not names:
        return None
    bad = ~torch.isfinite(torch.stack(extremes)).all(dim=1)
    index = int(bad.to(torch.int8).argmax())  # the first True (argmax of an all-False tensor is 0: checked below)
    return names[index] if bool(bad[index]) else None


def agreed(found: str | None) -> str | None:
    """`found` of the lowest rank that found something (with its rank in a multi-rank job), the same on every rank;
    None when no rank did."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return found
    from mssr_megatron.parallel import collective_device

    flag = torch.tensor([0.0 if found is None else 1.0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, found)
    rank, name = next((rank, name) for rank, name in enumerate(names) if name is not None)
    return f"{name} (rank {rank})"


def nonfinite_weight(module) -> str | None:
    """The first model parameter with a NaN/Inf on any rank ("weight <name>"), or None. Every rank calls this."""
    return agreed(_first_nonfinite((f"weight {name}", p) for name, p in module.named_parameters()))


def nonfinite_gradient(ddp_model) -> str | None:
    """The first parameter whose accumulated gradient holds a NaN/Inf on THIS rank ("gradient of <name>"), or None.
    Reads megatron DDP's contiguous gradient buffers (every trained parameter's main_grad is a view into one): one
    aminmax per buffer, and the parameters are searched for the name only when a buffer is non-finite (one
    isfinite().all() per parameter took 0.19 s per update on a 100M model, the buffers take a few ms)."""
    buffers = getattr(ddp_model, "buffers", None)
    if isinstance(buffers, list):  # megatron DDP (an nn.Module's buffers is a method)
        grads = [("gradient buffer", b.grad_data) for b in buffers + list(ddp_model.expert_parallel_buffers)]
        if _first_nonfinite(grads) is None:
            return None
    def grad(param):  # DDP accumulates into main_grad; a bare module into .grad
        main = getattr(param, "main_grad", None)
        return param.grad if main is None else main

    module = getattr(ddp_model, "module", ddp_model)
    return _first_nonfinite((f"gradient of {name}", grad(p)) for name, p in module.named_parameters()
                            if grad(p) is not None)


def _optimizer_tensors(optimizer, module) -> Iterator[tuple[str, object]]:
    """(name, tensor) of every parameter the inner torch optimizers update and of their state tensors."""
    names = {id(p): name for name, p in module.named_parameters()}  # FP32Optimizer: Adam updates these themselves
    inners = getattr(optimizer, "chained_optimizers", [optimizer])
    for inner in inners:  # main params (and shards) named after the model parameter they are copied into
        for model_attr, main_attr, what in (("float16_groups", "fp32_from_float16_groups", "main param of"),
                                            ("model_float16_groups", "shard_fp32_from_float16_groups", "main shard of"),
                                            ("model_fp32_groups", "shard_fp32_groups", "shard of")):
            for model_group, main_group in zip(getattr(inner, model_attr, ()), getattr(inner, main_attr, ())):
                for model_param, main_param in zip(model_group, main_group):
                    names[id(main_param)] = f"{what} {names.get(id(model_param), 'an unnamed parameter')}"
    for inner in inners:
        torch_optimizer = inner.optimizer
        for group in torch_optimizer.param_groups:
            for param in group["params"]:
                name = names.get(id(param), "an unnamed parameter")
                yield f"optimizer parameter ({name})", param
                for key, value in torch_optimizer.state.get(param, {}).items():
                    if hasattr(value, "is_floating_point") and value.is_floating_point():
                        yield f"optimizer state {key} of {name}", value


def nonfinite_in(actor, optimizer_state: bool = True) -> str | None:
    """The first non-finite weight, or (optimizer_state) main parameter or Adam state tensor, on any rank; None when
    all are finite. Every rank calls this."""
    tensors = [(f"weight {name}", p) for name, p in actor.module.named_parameters()]
    if optimizer_state and actor.optimizer is not None:
        tensors += list(_optimizer_tensors(actor.optimizer, actor.module))
    return agreed(_first_nonfinite(tensors))


def check_loaded(actor, checkpoint: str) -> None:
    """Raise NonFiniteError naming the checkpoint and the tensor when the weights or the optimizer state just loaded
    from it hold a NaN/Inf (the first update would put them into every weight). Every rank calls this."""
    bad = nonfinite_in(actor)
    if bad is not None:
        raise NonFiniteError(f"checkpoint {checkpoint} holds non-finite values ({bad}): it cannot be resumed; resume "
                             "from an earlier checkpoint (checkpoint.resume=<save_dir>/step_N)")


def require_finite(actor, what: str) -> None:
    """Raise NonFiniteError instead of writing `what` (a checkpoint, an export) from non-finite weights or optimizer
    state. Every rank calls this."""
    bad = nonfinite_in(actor)
    if bad is not None:
        raise NonFiniteError(f"not writing {what}: non-finite values in {bad}")
