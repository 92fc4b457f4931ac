"""One Megatron training step (forward, loss from the fused log-prob op, backward, optimizer step) at TP=1, TP=2 and
PP=2 on CPU: the loss before the step and after it are the same in every layout (real gloo processes)."""

from __future__ import annotations

import pytest
import torch

from megatron_harness import per_row_microbatches, spawn, tiny_case


def _train_worker(rank: int, tp: int, pp: int, recompute: bool, out_dir: str) -> None:
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.config import ModelConfig, OptimizerConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(tp, pp, seed=0)
    try:
        cfg, hf, inputs = tiny_case(tied=True)
        model_cfg = ModelConfig(params_dtype="float32", **(
            dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) if recompute else {}))
        actor = MegatronActor(cfg, model_cfg, OptimizerConfig(lr=1e-3, weight_decay=0.0, grad_clip=1.0), 10)
        actor.load_hf_state(published_state_dict(hf))
        mask = inputs["attention_mask"][:, 1:].float()
        micro = per_row_microbatches(inputs)

        def nll(logprobs, entropy, mb):  # next-token NLL, normalised by the whole mini-batch's token count
            row = mask[mb["row"] : mb["row"] + 1]
            return -(logprobs * row).sum() / mask.sum(), {"entropy": entropy.mean()}

        losses = []
        for _ in range(3):
            metrics = actor.train_step(micro, nll)
            if "actor/loss" in metrics:
                losses.append(metrics["actor/loss"])
        if losses:
            torch.save({"losses": losses, "grad_norm": metrics["actor/grad_norm"]}, f"{out_dir}/rank{rank}.pt")
    finally:
        destroy_megatron()


def _run(out_dir, tp, pp, recompute=False):
    out_dir.mkdir()
    spawn(_train_worker, tp * pp, tp, pp, recompute, str(out_dir))
    return torch.load(out_dir / f"rank{tp * pp - 1}.pt")


@pytest.mark.slow
def test_training_step_moves_the_loss_the_same_way_at_tp2_and_pp2(tmp_path):
    base, tp2, pp2 = _run(tmp_path / "tp1", 1, 1), _run(tmp_path / "tp2", 2, 1), _run(tmp_path / "pp2", 1, 2)
    losses = base["losses"]
    assert losses[2] < losses[1] < losses[0], f"the loss should fall over 3 steps: {losses}"
    for other in (tp2, pp2):
        assert other["losses"] == pytest.approx(losses, abs=2e-5)
        assert other["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_activation_recompute_gives_the_same_step(tmp_path):
    plain, recomputed = _run(tmp_path / "plain", 1, 1), _run(tmp_path / "recompute", 1, 1, recompute=True)
    assert recomputed["losses"] == pytest.approx(plain["losses"], abs=1e-6)
