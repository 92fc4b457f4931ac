"""Build this rank's Qwen2.5-VL stage and run micro-batches through it with Megatron's pipeline schedules.

    model = build_model(hf_config, cfg.model, device)            # after init_megatron(tp, pp); device: compute_device
    outputs = run_microbatches(model, batches, forward_only=True)   # last stage: one output per micro-batch

A micro-batch is a dict with the MODEL_INPUTS: input_ids [B, S], position_ids [3, B, S], for prompts with images
pixel_values and image_grid_thw, and optionally logit_mask [B, S] (the last stage's logits at those positions only,
packed: Qwen2_5_VLMegatron.forward); plus any bookkeeping entries a loss needs (e.g. `rows`). With pipeline
parallelism every micro-batch of one call must have the same [B, S] (the stages exchange fixed shapes); without it,
each may have its own. Micro-batches may live anywhere (the
trainer builds them on the CPU): run_microbatches moves each one's model inputs to the model's device as the
schedule takes it (`move_batch`), so one micro-batch at a time is copied to the GPU.
"""

from __future__ import annotations

from typing import Callable

import torch

from mssr_megatron.models.qwen2_5_vl import Qwen2_5_VLMegatron


def check_layout(hf_config, tp: int, pp: int) -> None:
    """TP must divide the attention and key/value heads, PP the layers: a clear error before anything is built."""
    text = hf_config.text_config
    if text.num_attention_heads % tp or text.num_key_value_heads % tp:
        raise ValueError(f"parallel.tensor_model_parallel_size={tp} must divide the model's attention heads "
                         f"({text.num_attention_heads}) and key/value heads ({text.num_key_value_heads})")
    if text.num_hidden_layers % pp:
        raise ValueError(f"parallel.pipeline_model_parallel_size={pp} must divide the model's "
                         f"{text.num_hidden_layers} layers")


MODEL_INPUTS = ("input_ids", "position_ids", "pixel_values", "image_grid_thw", "logit_mask")
"""The micro-batch entries the model reads; `move_batch` moves these and leaves the rest where they are."""


def build_model(hf_config, model_cfg, device: torch.device | str | None = None,
                sequence_parallel: bool = False) -> Qwen2_5_VLMegatron:
    """The Qwen2.5-VL stage of this rank (vision tower on the first stage, output layer on the last), on `device`
    (default: the CPU; the trainer passes `parallel.compute_device`). sequence_parallel: `parallel.sequence_parallel`
    (activations sharded along the sequence inside TP regions; megatron-core refuses it at TP=1, and so does the
    config check).

    CPU: megatron initialises the weights on the CPU (use_cpu_initialization), as it always did here. CUDA (GPU-only:
    not run (no GPU was available)): megatron creates and initialises the language model's weights directly on
    torch.cuda.current_device(), which must be `device` (Megatron-LM's default on GPU); the vision tower
    (transformers) is built on the CPU, so the whole stage is then moved with `.to(device)`, which keeps the
    Parameter objects and their megatron attributes (Megatron-LM's get_model does the same with `.cuda()`). On the
    CPU that `.to` changes nothing."""
    from megatron.core import parallel_state as ps

    device = torch.device("cpu") if device is None else torch.device(device)
    on_cuda = device.type == "cuda"
    if on_cuda:  # GPU-only: not run (no GPU was available)
        current = torch.cuda.current_device()
        if device.index not in (None, current):
            raise ValueError(f"build_model: device {device} is not the current CUDA device cuda:{current}, where "
                             "megatron creates the weights; call torch.cuda.set_device first (init_megatron does)")
        device = torch.device("cuda", current)
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    check_layout(hf_config, tp, pp)
    model = Qwen2_5_VLMegatron(
        hf_config, model_cfg, tp=tp, pp=pp,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        sequence_parallel=sequence_parallel, cpu_initialization=not on_cuda,
    )
    return model.to(device)


def module_device(model) -> torch.device:
    """The device of a (possibly DDP-wrapped) model stage: that of its first parameter (the CPU without any)."""
    param = next(iter(model.parameters()), None)
    return torch.device("cpu") if param is None else param.device


def move_batch(batch: dict, device: torch.device | str) -> dict:
    """A copy of the micro-batch dict with its MODEL_INPUTS tensors on `device` (copies to CUDA are issued
    non_blocking; tensors already there are not copied). Other entries, e.g. the `rows` a loss uses to look up its
    per-token tensors, are kept as they are."""
    device = torch.device(device)
    non_blocking = device.type == "cuda"  # host-to-device only: a non-blocking copy to the host could be read early
    return {k: v.to(device, non_blocking=non_blocking) if k in MODEL_INPUTS and isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def run_microbatches(
    model,
    batches: list[dict],
    *,
    forward_only: bool,
    loss_fn: Callable | None = None,
    device: torch.device | str | None = None,
) -> list:
    """Run the micro-batches through the pipeline (1F1B when pp > 1).

    loss_fn(output, batch) -> (loss, metrics dict) makes it a training pass (backward included unless
    forward_only); a forward_only pass with a loss_fn reduces each micro-batch's output as soon as it is computed
    (the way to get per-token results without keeping every micro-batch's logits). Without loss_fn the last stage
    returns the raw outputs (vocab-parallel logits [B, S, V/TP], or [1, N, V/TP] with a logit_mask).
    Each micro-batch's MODEL_INPUTS are moved to `device` (default: the model's, `module_device`) as it is taken,
    and loss_fn receives the moved batch, so its input_ids are on the logits' device.
    Returns, on the last stage, loss_fn's metrics or the outputs per micro-batch; [] on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []
    from megatron.core import parallel_state as ps

    shape = batches[0]["input_ids"].shape
    if any(b["input_ids"].shape != shape for b in batches) and ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("all micro-batches of one pipeline pass need the same [batch, sequence] shape; pad them")
    iterator = iter(batches)
    device = module_device(model) if device is None else torch.device(device)

    def forward_step(data_iterator, stage):
        batch = move_batch(next(data_iterator), device)
        output = stage(batch["input_ids"], batch.get("position_ids"), batch.get("pixel_values"),
                       batch.get("image_grid_thw"), logit_mask=batch.get("logit_mask"))
        if loss_fn is None:
            return output, None
        return output, lambda out: loss_fn(out, batch)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterator,
        model=model,
        num_microbatches=len(batches),
        seq_length=shape[1],
        micro_batch_size=shape[0],
        forward_only=forward_only,
    )
