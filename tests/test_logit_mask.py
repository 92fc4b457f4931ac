"""Logits at the response positions only (actor.with_logit_masks, Qwen2_5_VLMegatron.forward's logit_mask): the same
per-token log-probs and entropies at those positions as the full logits give (0 elsewhere), and the same loss and
gradients of a training step, at TP = 1 (this process, tied and untied output layer) and TP = 2 with and without
sequence parallelism (2 gloo processes, vocabulary-parallel logits). The reference is the same actor on the same
micro-batch without a response_mask, which computes the logits at every position as before."""

from __future__ import annotations

import pytest
import torch

from megatron_harness import megatron_batch, megatron_in_this_process, spawn, tiny_case


def _response_mask(inputs, last: int = 4) -> torch.Tensor:
    """[B, L-1]: column t is True when token t + 1 is one of the row's last `last` real tokens (its 'response')."""
    lengths = inputs["attention_mask"].sum(-1)
    column = torch.arange(inputs["input_ids"].shape[1] - 1)
    return (column + 1 < lengths.unsqueeze(1)) & (column + 1 >= (lengths - last).unsqueeze(1))


def _compare_runs(tp: int, tied: bool, sequence_parallel: bool = False) -> dict:
    """Per-token results and one training step's loss and gradients, with and without the response_mask."""
    from mssr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.train.actor import MegatronActor

    cfg, hf, inputs = tiny_case(tied=tied)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    actor = MegatronActor(cfg, ModelConfig(params_dtype="float32"), OptimizerConfig(lr=0.0, weight_decay=0.0), 10,
                          parallel_cfg=parallel)
    assert actor.module.config.sequence_parallel == sequence_parallel
    actor.load_hf_state(published_state_dict(hf))
    mask = _response_mask(inputs)
    full = {**megatron_batch(inputs), "rows": torch.arange(2)}
    packed = {**full, "response_mask": mask}

    def loss_fn(logprobs, entropy, batch):
        m = mask.to(logprobs.dtype)
        return -(logprobs * m).sum() / m.sum() - 0.1 * (entropy * m).sum() / m.sum(), {}

    out = {"mask": mask}
    for name, batch in (("full", full), ("packed", packed)):
        results = actor.token_logprobs([batch])
        metrics = actor.train_step([batch], loss_fn)
        grads = [p.main_grad.detach().clone() for p in actor.module.parameters() if p.requires_grad]
        out[name] = {"per_token": results, "loss": metrics.get("actor/loss"), "grad_norm": metrics["actor/grad_norm"],
                     "grads": grads}
    return out


def _check(out: dict, last_stage: bool) -> None:
    full, packed, mask = out["full"], out["packed"], out["mask"]
    if last_stage:
        for got, want in zip(packed["per_token"][0], full["per_token"][0]):  # logprobs, then entropy
            torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=1e-5)
            assert not got[~mask].any()  # 0 where no logit was computed
        assert packed["loss"] == pytest.approx(full["loss"], abs=1e-6)
    assert packed["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    for got, want in zip(packed["grads"], full["grads"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("tied", [True, False])
def test_packed_logits_give_the_full_logits_results_at_tp1(tied):
    with megatron_in_this_process():
        _check(_compare_runs(1, tied), last_stage=True)


def _tp2_worker(rank: int, sequence_parallel: bool, out_dir: str) -> None:
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(2, 1, seed=0)
    try:
        _check(_compare_runs(2, tied=True, sequence_parallel=sequence_parallel), last_stage=True)
        open(f"{out_dir}/rank{rank}.ok", "w").close()
    finally:
        destroy_megatron()


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_packed_logits_give_the_full_logits_results_at_tp2(tmp_path, sequence_parallel):
    """Vocabulary-parallel logits; with sequence parallelism the decoder's output is split over the sequence and is
    gathered before the positions are picked (its gradient then must not be reduced twice)."""
    spawn(_tp2_worker, 2, sequence_parallel, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0.ok", "rank1.ok"]


def test_no_mask_where_the_logits_cannot_be_packed():
    from mssr_megatron.train.actor import with_logit_masks
    from mssr_megatron.train.crossmodal import PAIRED_KEY

    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    packed = with_logit_masks([{"input_ids": ids, "response_mask": mask}])[0]
    assert packed["logit_mask"].tolist() == [[False, False, True, True, False], [False, True, True, False, False]]
    for batch in ({"input_ids": ids},  # no response_mask
                  {"input_ids": ids, "response_mask": torch.zeros_like(mask)},  # no response token
                  {"input_ids": ids, "response_mask": mask, PAIRED_KEY: {}}):  # cross-modal pair
        assert "logit_mask" not in with_logit_masks([batch])[0]
