"""The cross-modal regulariser KL(pi(.|x, img) || pi(.|x)) in the update: the fused vocabulary-parallel KL against an
unfused one, the text-only copies, the gradient of the whole path against autograd through the Hugging Face model
(with and without the image) at TP=1, and training at TP=2 and PP=2 (real gloo processes)."""

from __future__ import annotations

import pytest
import torch

from megatron_harness import VOCAB, spawn, tiny_case

RESPONSE = 4  # the last 4 tokens of each tiny_case row play the response
# megatron parameter -> published HF name, for tensors both sides lay out the same way at TP=1
SAME_LAYOUT = {
    "language_model.decoder.layers.0.self_attention.linear_proj.weight": "model.layers.0.self_attn.o_proj.weight",
    "language_model.decoder.layers.3.mlp.linear_fc2.weight": "model.layers.3.mlp.down_proj.weight",
    "language_model.decoder.final_layernorm.weight": "model.norm.weight",
    "language_model.output_layer.weight": "lm_head.weight",
    "language_model.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "vision_model.blocks.0.mlp.down_proj.weight": "visual.blocks.0.mlp.down_proj.weight",
}


def _unfused_kl(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p, log_q = torch.log_softmax(a / temperature, -1), torch.log_softmax(b / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def test_fused_kl_matches_unfused_with_gradients_and_excluded_columns():
    from mssr_megatron.ops.vocab_parallel_kl import vocab_parallel_kl

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    # columns 10, 11 are TP padding (vocab_size=10) and 3 is blocked: the reference drops them
    kept = [0, 1, 2, 4, 5, 6, 7, 8, 9]
    ref = _unfused_kl(a[:, kept], b[:, kept], 0.7)
    weights = torch.randn(5, generator=gen, dtype=torch.float64)
    ra, rb = torch.autograd.grad((ref * weights).sum(), (a, b))
    for chunk_size in (None, 2):  # 2: chunks of 2, 2 and 1 rows
        ours = vocab_parallel_kl(a, b, temperature=0.7, vocab_size=10, masked_token_ids=[3], chunk_size=chunk_size)
        assert torch.allclose(ours, ref, atol=1e-12)
        ga, gb = torch.autograd.grad((ours * weights).sum(), (a, b))
        assert torch.allclose(ga, ra, atol=1e-12) and torch.allclose(gb, rb, atol=1e-12)
        assert ga[:, [3, 10, 11]].abs().max() == 0 and gb[:, [3, 10, 11]].abs().max() == 0
    assert vocab_parallel_kl(a, a).abs().max() < 1e-12


def test_text_only_rows_drop_the_image_block_and_count_positions_from_zero():
    from mssr_megatron.train.crossmodal import text_only_rows

    vs, img, ve, pad = 90, 91, 92, 0
    ids = torch.tensor([[5, vs, img, img, ve, 6, 7, 8], [9, 10, 11, pad, pad, pad, pad, pad]])
    out, positions, removed = text_only_rows(ids, torch.tensor([8, 3]), (vs, img, ve), pad, img, 2)
    assert out.tolist() == [[5, 6, 7, 8, pad, pad, pad, pad], [9, 10, 11, pad, pad, pad, pad, pad]]
    assert removed.tolist() == [4, 0]
    assert positions.tolist() == [[[0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]]] * 3


def _experience(inputs):
    """tiny_case's two image prompts as an Experience whose last RESPONSE tokens of each row are the response."""
    from mssr_megatron.train.experience import Experience

    lengths = inputs["attention_mask"].sum(-1)
    mask = torch.zeros(2, inputs["input_ids"].shape[1] - 1)
    for b, n in enumerate(lengths.tolist()):
        mask[b, n - 1 - RESPONSE: n - 1] = 1
    patches = inputs["image_grid_thw"].prod(-1).tolist()
    return Experience(prompt_keys=[0, 1], group_index=torch.arange(2), rewards=torch.zeros(2),
                      input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], response_mask=mask,
                      rollout_logprobs=torch.zeros_like(mask),
                      pixel_values=list(inputs["pixel_values"].split(patches)),
                      image_grid_thw=list(inputs["image_grid_thw"].split(1)), lengths=lengths)


def _train_worker(rank: int, tp: int, pp: int, micro_batch_size: int, out_dir: str) -> None:
    from mssr_megatron.algorithms.losses import compute_policy_loss
    from mssr_megatron.config import AlgorithmConfig, ModelConfig, OptimizerConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.train.crossmodal import KL_KEY, paired_microbatches

    init_megatron(tp, pp, seed=0)
    try:
        cfg, hf, inputs = tiny_case(tied=False)
        actor = MegatronActor(cfg, ModelConfig(params_dtype="float32"),
                              OptimizerConfig(lr=1e-3, weight_decay=0.0, grad_clip=1e9), 10)
        actor.load_hf_state(published_state_dict(hf))
        exp = _experience(inputs)
        batches = paired_microbatches(exp.microbatches(torch.arange(2), micro_batch_size, same_width=True), exp, cfg,
                                      pad_id=0)
        algo = AlgorithmConfig(use_kl_loss=False, crossmodal_coef=1.0)
        tokens = float(exp.response_mask.sum())

        def loss_fn(logprobs, entropy, batch):  # advantages 0: the pg term is 0, only the cross-modal term is left
            mask = exp.response_mask[batch["rows"], : logprobs.shape[-1]]
            zeros = torch.zeros_like(logprobs)
            return compute_policy_loss(algo, logprobs, logprobs.detach(), zeros, mask, crossmodal=batch[KL_KEY],
                                       normalizer=tokens)

        before = {n: p.detach().clone() for n, p in actor.module.named_parameters()}
        metrics = actor.train_step(batches, loss_fn)
        grads = {n: p.main_grad.detach().clone() for n, p in actor.module.named_parameters() if n in SAME_LAYOUT}
        moved = sum(float((p.detach() - before[n]).abs().sum()) for n, p in actor.module.named_parameters())
        torch.save({"metrics": metrics, "grads": grads, "moved": moved}, f"{out_dir}/rank{rank}.pt")
    finally:
        destroy_megatron()


def _hf_reference(tied: bool = False):
    """Autograd through the HF model: the token-mean KL over the response tokens between the forward with the image
    and the forward on the same ids with the image block left out (HF's own positions). Returns (kl, grads)."""
    from mssr_megatron.models.tiny_hf import published_state_dict

    cfg, hf, inputs = tiny_case(tied)
    hf.train(False)
    with_image = hf(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                               "mm_token_type_ids")}).logits
    vision = {cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id}
    kls = []
    for b, n in enumerate(inputs["attention_mask"].sum(-1).tolist()):
        ids = inputs["input_ids"][b, :n].tolist()
        text = [t for t in ids if t not in vision]
        text_logits = hf(input_ids=torch.tensor([text]), attention_mask=torch.ones(1, len(text))).logits[0]
        # response token j (ids[n - RESPONSE + j]) is predicted at column n - RESPONSE - 1 + j; the copy's columns
        # are shifted by the image block's length, so its response is predicted by its last RESPONSE + 1 columns but 1
        kls.append(_unfused_kl(with_image[b, n - RESPONSE - 1: n - 1], text_logits[len(text) - RESPONSE - 1: -1], 1.0))
    kl = torch.cat(kls).mean()
    kl.backward()
    modules = dict(hf.named_parameters())
    from mssr_megatron.checkpoint.mapping import published_to_module_names

    names = published_to_module_names(hf)
    state = published_state_dict(hf)
    assert set(SAME_LAYOUT.values()) <= set(state)
    return float(kl.detach()), {p: modules[names[p]].grad for p in SAME_LAYOUT.values()}


@pytest.mark.slow
def test_crossmodal_gradient_matches_hugging_face_autograd_at_tp1(tmp_path):
    spawn(_train_worker, 1, 1, 1, 2, str(tmp_path))
    ours = torch.load(tmp_path / "rank0.pt")
    kl, grads = _hf_reference()
    assert ours["metrics"]["actor/crossmodal_kl"] == pytest.approx(kl, abs=1e-6)  # fp32 noise: KL ~ 6e-3
    assert kl > 1e-3  # the image changes the predictions: the test compares something
    for name, published in SAME_LAYOUT.items():
        ref, got = grads[published], ours["grads"][name][: grads[published].shape[0]]
        assert ref.abs().max() > 0, published
        error = float((got - ref).abs().max() / ref.abs().max())  # fp32 noise: <= 3.4e-6 measured
        assert error < 2e-4, (name, error)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_crossmodal_loss_trains_at_tp2_and_pp2(tmp_path, tp, pp):
    spawn(_train_worker, 2, tp, pp, 1, str(tmp_path))
    kl, _ = _hf_reference()
    last = torch.load(tmp_path / "rank1.pt")  # the last stage (PP) / a TP rank: it holds the loss metrics
    assert last["metrics"]["actor/crossmodal_kl"] == pytest.approx(kl, abs=1e-6)
    assert torch.isfinite(torch.tensor(last["metrics"]["actor/loss"]))
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt")["moved"] > 0, f"rank {rank}: weights did not change"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from trainer_assets import build_assets

    return build_assets(str(tmp_path_factory.mktemp("crossmodal_assets")))


def _cli_worker(rank: int, argv: list) -> None:
    from mssr_megatron.cli import main

    assert main(argv) == 0


@pytest.mark.slow
def test_mssr_train_with_crossmodal_coef_runs_to_the_end(tmp_path, assets):
    """`mssr train examples/configs/tiny_cpu.yaml algorithm.crossmodal_coef=0.05` (on the test's tiny assets)."""
    import json
    import math

    from trainer_assets import overrides

    run_dir = tmp_path / "run"
    spawn(_cli_worker, 1, ["train", "examples/configs/tiny_cpu.yaml",
                           *overrides(assets, str(run_dir), "algorithm.crossmodal_coef=0.05")])
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert math.isfinite(m["actor/loss"]) and m["actor/update_skipped"] == 0.0
        assert math.isfinite(m["actor/crossmodal_kl"]) and m["actor/crossmodal_kl"] >= 0.0


@pytest.mark.slow
def test_bench_reports_the_update_with_and_without_the_regulariser(tmp_path, assets):
    import json

    from trainer_assets import overrides

    out = tmp_path / "bench.json"
    spawn(_cli_worker, 1, ["bench", "examples/configs/tiny_cpu.yaml",
                           *overrides(assets, str(tmp_path / "run"), "algorithm.crossmodal_coef=0.05"),
                           "--out", str(out), "--warmup", "0", "--repeats", "1"])
    result = json.loads(out.read_text())
    assert {"update", "update_no_crossmodal", "hf_update"} <= set(result["phases"])
    cost = result["crossmodal_cost"]
    assert cost["coef"] == 0.05 and cost["time_ratio"] > 0
    assert cost["time_ratio"] == pytest.approx(
        result["phases"]["update"]["median_s"] / result["phases"]["update_no_crossmodal"]["median_s"])
