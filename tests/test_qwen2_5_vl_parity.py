"""Our Megatron Qwen2.5-VL against the Hugging Face model itself: same weights, same image + text batch, same logits
(max abs diff <= 1e-4 in fp32) at TP=1, TP=2 and PP=2, tied and untied embeddings, vocabulary 331 (TP pads it)."""

from __future__ import annotations

import pytest
import torch

from megatron_harness import VOCAB, gather_tp_logits, hf_logits, megatron_batch, spawn, tiny_case
from mssr_megatron.models.rope_index import mrope_position_ids

TOL = 1e-4


def _parity_worker(rank: int, tp: int, pp: int, out_dir: str) -> None:
    from mssr_megatron.checkpoint.hf_bridge import load_hf_weights
    from mssr_megatron.checkpoint.mapping import ModelDims
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.provider import build_model, run_microbatches
    from mssr_megatron.models.qwen2_5_vl import padded_vocab_size
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(tp, pp, seed=0)
    try:
        for tied in (True, False):
            cfg, hf, inputs = tiny_case(tied)
            model = build_model(cfg, ModelConfig(params_dtype="float32")).eval()
            consumed = load_hf_weights(model, published_state_dict(hf), ModelDims.from_hf_config(
                cfg, padded_vocab_size(VOCAB, tp)))
            with torch.no_grad():
                outputs = run_microbatches(model, [megatron_batch(inputs)], forward_only=True)
            if outputs:
                torch.save(gather_tp_logits(outputs[0], VOCAB), f"{out_dir}/logits_{tied}_{rank}.pt")
            torch.save(sorted(consumed), f"{out_dir}/consumed_{tied}_{rank}.pt")
    finally:
        destroy_megatron()


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_logits_match_hugging_face(tmp_path, tp, pp):
    spawn(_parity_worker, tp * pp, tp, pp, str(tmp_path))
    from mssr_megatron.models.tiny_hf import published_state_dict

    for tied in (True, False):
        _, hf, inputs = tiny_case(tied)
        reference = hf_logits(hf, inputs)
        valid = inputs["attention_mask"].bool()
        last_stage_ranks = [r for r in range(tp * pp) if r >= tp * (pp - 1)]
        for rank in last_stage_ranks:
            ours = torch.load(tmp_path / f"logits_{tied}_{rank}.pt")
            assert ours.shape == reference.shape
            diff = (ours - reference)[valid].abs().max().item()
            assert diff <= TOL, f"tied={tied} rank={rank}: max abs diff {diff}"
        consumed = set().union(*(torch.load(tmp_path / f"consumed_{tied}_{r}.pt") for r in range(tp * pp)))
        assert consumed == set(published_state_dict(hf)), "every HF tensor is read by some stage, nothing else"


def test_mrope_positions_match_hugging_face():
    cfg, hf, inputs = tiny_case(tied=True)
    expected, _ = hf.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
    )
    assert torch.equal(inputs["position_ids"], expected)
    # Left padding gives the same positions to the real tokens.
    ids, mask = inputs["input_ids"][1:], inputs["attention_mask"][1:]
    n = int(mask.sum())
    left_ids = torch.cat([torch.zeros(1, ids.shape[1] - n, dtype=torch.long), ids[:, :n]], 1)
    left_mask = torch.cat([torch.zeros(1, ids.shape[1] - n, dtype=torch.long), mask[:, :n]], 1)
    left = mrope_position_ids(left_ids, inputs["image_grid_thw"][1:], cfg.image_token_id, 2, left_mask)
    assert torch.equal(left[:, 0, -n:], inputs["position_ids"][:, 1, :n])


def test_more_image_runs_than_grids_is_an_error():
    cfg, _, inputs = tiny_case(tied=True)
    with pytest.raises(ValueError, match="more <\\|image_pad\\|> runs"):
        mrope_position_ids(inputs["input_ids"], inputs["image_grid_thw"][:1], cfg.image_token_id, 2)
