"""use_fused_torch_adam (train/actor.py): on the CPU megatron's optimizer steps with torch's fused AdamW kernel. Two
actors on the same model and micro-batches, one switched back to torch's default (per-parameter) AdamW, which is what
megatron uses without Transformer Engine or apex: the same weights after two steps. The switch is re-applied after an
optimizer load whose param groups say otherwise. Megatron runs in this process (one gloo rank, megatron_patches.cpu)."""

from __future__ import annotations

import pytest
import torch

from megatron_harness import megatron_in_this_process, per_row_microbatches, tiny_case


@pytest.fixture(scope="module")
def megatron():
    with megatron_in_this_process():
        yield


def _adam_groups(actor) -> list[dict]:
    return [group for inner in actor.optimizer.chained_optimizers for group in inner.optimizer.param_groups]


def _trained(fused: bool) -> tuple[list[torch.Tensor], object]:
    from mssr_megatron.config import ModelConfig, OptimizerConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.train.actor import MegatronActor

    cfg, hf, inputs = tiny_case(tied=True)
    actor = MegatronActor(cfg, ModelConfig(params_dtype="float32"), OptimizerConfig(lr=1e-3, weight_decay=1.0), 10)
    actor.load_hf_state(published_state_dict(hf))
    assert all(group["fused"] and not group["foreach"] for group in _adam_groups(actor))
    if not fused:  # torch's defaults, as megatron builds its fallback AdamW
        for group in _adam_groups(actor):
            group["fused"], group["foreach"] = None, None
    mask = inputs["attention_mask"][:, 1:].float()

    def nll(logprobs, entropy, mb):
        return -(logprobs * mask[mb["row"]: mb["row"] + 1]).sum() / mask.sum(), {}

    for _ in range(2):
        metrics = actor.train_step(per_row_microbatches(inputs), nll)
        assert metrics["actor/update_skipped"] == 0.0
    return [p.detach().clone() for p in actor.module.parameters()], actor


def test_fused_adam_gives_the_default_adams_weights(megatron):
    fused, actor = _trained(fused=True)
    default, _ = _trained(fused=False)
    # Float rounding differs between the kernels, and Adam divides it by sqrt(v): where a gradient is itself rounding
    # noise (the key bias: softmax ignores a shift shared by all keys) the normalised steps differ by up to ~1e-3 of
    # lr (7e-7 measured here). A wrong decay would move the weights by lr * 1.0 * |w| ~ 1e-4, a wrong moment far more.
    moved = max((f - d).abs().max().item() for f, d in zip(fused, default))
    assert moved < 1e-5
    assert any(state["step"].item() == 2 for state in actor.optimizer.chained_optimizers[0].optimizer.state.values())


def test_the_switch_is_reapplied_after_a_load(megatron):
    from mssr_megatron.train.actor import use_fused_torch_adam

    _, actor = _trained(fused=True)
    state = actor.optimizer.state_dict()
    for inner in state if isinstance(state, list) else [state]:
        for group in inner.get("optimizer", inner)["param_groups"]:  # FP32Optimizer: torch's own state dict
            group["fused"] = None  # a checkpoint written by torch's default AdamW
    actor.optimizer.load_state_dict(state)
    assert not any(group["fused"] for group in _adam_groups(actor))
    assert use_fused_torch_adam(actor.optimizer) == len(_adam_groups(actor)) > 0
    assert use_fused_torch_adam(actor.optimizer) == 0  # idempotent
    assert all(group["fused"] for group in _adam_groups(actor))
