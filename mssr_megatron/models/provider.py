"""Build this rank's Qwen2.5-VL stage and run micro-batches through it with Megatron's pipeline schedules.

    model = build_model(hf_config, cfg.model)                    # after init_megatron(tp, pp)
    outputs = run_microbatches(model, batches, forward_only=True)   # last stage: one output per micro-batch

A micro-batch is a dict with input_ids [B, S], position_ids [3, B, S] and, for prompts with images, pixel_values
and image_grid_thw. Every micro-batch of one call must have the same [B, S] (pipeline stages exchange fixed shapes).
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


def build_model(hf_config, model_cfg) -> Qwen2_5_VLMegatron:
    """The Qwen2.5-VL stage of this rank (vision tower on the first stage, output layer on the last)."""
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    check_layout(hf_config, tp, pp)
    return Qwen2_5_VLMegatron(
        hf_config, model_cfg, tp=tp, pp=pp,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )


def run_microbatches(
    model,
    batches: list[dict],
    *,
    forward_only: bool,
    loss_fn: Callable | None = None,
) -> list:
    """Run the micro-batches through the pipeline (1F1B when pp > 1).

    loss_fn(output, batch) -> (loss, metrics dict) makes it a training pass (backward included unless
    forward_only); without loss_fn the last stage returns the raw outputs (vocab-parallel logits [B, S, V/TP]).
    Returns, on the last stage, loss_fn's metrics or the outputs per micro-batch; [] on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not batches:
        return []
    shape = batches[0]["input_ids"].shape
    if any(b["input_ids"].shape != shape for b in batches):
        raise ValueError("all micro-batches of one pipeline pass need the same [batch, sequence] shape; pad them")
    iterator = iter(batches)

    def forward_step(data_iterator, stage):
        batch = next(data_iterator)
        output = stage(batch["input_ids"], batch.get("position_ids"), batch.get("pixel_values"),
                       batch.get("image_grid_thw"))
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
