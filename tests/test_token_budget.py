"""Token-budget micro-batches (parallel.max_tokens_per_microbatch, train/token_budget.py): the packing on hand-made
rows, the same micro-batch count on every data-parallel rank (real gloo processes), the config check, the same loss
and gradients as fixed micro-batches for every loss aggregation mode (a real Megatron actor), and the rows dealt out
to data-parallel ranks by cost (balanced_row_order: hand-worked, and the same step at DP = 2)."""

from __future__ import annotations

import logging
import os
import types

import pytest
import torch

from megatron_harness import spawn
from mssr_megatron.config import ParallelConfig, RunConfig
from mssr_megatron.config_loader import ConfigError
from mssr_megatron.train import token_budget
from mssr_megatron.train.token_budget import equal_count, microbatch_cost, pack, padding_fraction

# Six rows: tokens, patches (multiple 8, full width 64). Padded widths 8, 32, 16, 8, 24, 8.
TOKENS = [5, 30, 12, 7, 20, 3]
PATCHES = [16, 0, 64, 0, 16, 0]


def test_first_fit_decreasing_packs_by_padded_tokens_plus_patches():
    # Hand-worked, budget 100, order by width then patches: r1 (32), r4 (24+16), r2 (16+64), r0 (8+16), r3 (8), r5 (8).
    # r1 opens A (32); r4 joins A (32 + 32 + 16 = 80); r2 opens B (80); r0: A 80+32+16, B 80+16+16 over -> opens C
    # (24); r3: A 80+32 over, B 80+16 = 96 fits; r5: A, B over, C 24+8 = 32 fits.
    bins = pack(TOKENS, PATCHES, budget=100, multiple=8, full_width=64)
    assert bins == [[1, 4], [2, 3], [0, 5]]
    assert [microbatch_cost(b, TOKENS, PATCHES, 8, 64) for b in bins] == [80, 96, 32]
    # slots 2*32 + 2*16 + 2*8 = 112, real tokens 77: 35 padded
    assert padding_fraction(bins, TOKENS, 8, 64) == pytest.approx(35 / 112)
    # fixed pairs in row order: slots 2*32 + 2*16 + 2*24 = 144, 67 padded
    assert padding_fraction([[0, 1], [2, 3], [4, 5]], TOKENS, 8, 64) == pytest.approx(67 / 144)


def test_a_row_over_the_budget_gets_its_own_microbatch_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(token_budget, "_warned_oversized", False)
    tokens, patches = TOKENS + [90, 95], PATCHES + [16, 0]  # 96 + 16 = 112 and 96 alone, over a budget of 90
    with caplog.at_level(logging.WARNING, logger=token_budget.__name__):
        bins = pack(tokens, patches, budget=90, multiple=8, full_width=128)
    assert [6] in bins and [7] in bins
    assert sorted(r for b in bins for r in b) == list(range(8))  # every row once
    assert all(microbatch_cost(b, tokens, patches, 8, 128) <= 90 for b in bins if b not in ([6], [7]))
    assert sum("over parallel.max_tokens_per_microbatch=90" in r.getMessage() for r in caplog.records) == 1


def test_equal_count_splits_the_costliest_microbatches():
    bins = [[1, 4], [2, 3], [0, 5]]  # costs 80, 96, 32
    assert equal_count(bins, 3, TOKENS, PATCHES, 8, 64) == bins
    # B (96) splits into its longer row r2 and r3; then A (80) into r1 (30 tokens) and r4
    assert equal_count(bins, 5, TOKENS, PATCHES, 8, 64) == [[1], [4], [2], [3], [0, 5]]
    with pytest.raises(ValueError, match="6 rows cannot fill 7 micro-batches"):
        equal_count(bins, 7, TOKENS, PATCHES, 8, 64)


def test_balanced_row_order_deals_each_minibatch_out_by_cost():
    """Hand-worked: 2 ranks, 2 mini-batches of 2 rows per rank. Contiguous blocks: rank 0 = rows 0-3, rank 1 = rows
    4-7; mini-batch 0 = slots {0, 1, 4, 5}, mini-batch 1 = slots {2, 3, 6, 7}."""
    costs = [10, 1, 1, 1, 9, 2, 2, 2]
    order = token_budget.balanced_row_order(costs, dp=2, local_mini=2)
    # mini-batch 0: rows 0 (10), 4 (9), 5 (2), 1 (1) -> rank 0 gets 10, then 1 after rank 1's 9 + 2: {0, 1} = 11 vs
    # {4, 5} = 11. mini-batch 1: rows 6, 7 (2), 2, 3 (1) -> 6 to rank 0, 7 to rank 1, 2 to rank 0, 3 to rank 1
    assert order == [0, 1, 2, 6, 4, 5, 3, 7]
    assert sorted(order) == list(range(8))
    minibatch = {0: {0, 1, 4, 5}, 1: {2, 3, 6, 7}}
    for k, slots in minibatch.items():  # each mini-batch keeps its rows
        assert {order[s] for s in slots} == slots
    before = [sum(costs[r] for r in range(4)), sum(costs[r] for r in range(4, 8))]
    after = [sum(costs[order[s]] for s in range(4)), sum(costs[order[s]] for s in range(4, 8))]
    assert before == [13, 15] and after == [14, 14]
    with pytest.raises(ValueError, match="mini-batches of 3"):
        token_budget.balanced_row_order(costs, dp=2, local_mini=3)


def _count_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 0: six short rows (one micro-batch fits them all); rank 1: six long ones (one per micro-batch)
        lengths = torch.tensor([5] * 6 + [60] * 6)
        grids = [torch.tensor([[1, 4, 4]])] * 12
        rows = torch.arange(6) + 6 * rank
        parts = token_budget.budget_parts(rows, lengths, grids, budget=100, multiple=8, full_width=64,
                                          count_group=dist.group.WORLD)
        alone = token_budget.budget_parts(rows, lengths, grids, budget=100, multiple=8, full_width=64)
        torch.save({"parts": [p.tolist() for p in parts], "alone": len(alone)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_data_parallel_rank_runs_the_same_number_of_microbatches(tmp_path):
    spawn(_count_worker, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert (r0["alone"], r1["alone"]) == (2, 6)  # on their own: 6 x (8 + 16) = 144 > 100, so 4 + 2; 64 + 16 each
    assert len(r0["parts"]) == len(r1["parts"]) == 6
    assert sorted(sum(r0["parts"], [])) == list(range(6)) and sorted(sum(r1["parts"], [])) == list(range(6, 12))


def test_config_checks_the_budget():
    RunConfig(parallel=ParallelConfig(max_tokens_per_microbatch=4096)).validate()
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch=0 must be > 0"):
        RunConfig(parallel=ParallelConfig(max_tokens_per_microbatch=0)).validate()
    with pytest.raises(ConfigError, match="set parallel.max_tokens_per_microbatch=null"):
        RunConfig(parallel=ParallelConfig(max_tokens_per_microbatch=4096, pipeline_model_parallel_size=2)).validate()


# ---- exactness on a real actor ------------------------------------------------------------------------------------

def _step_rows(hf_config):
    """An Experience of 6 rollouts: prompts with a 56x56 image (16 patches), a 56x112 one (32) or none, responses of
    2..9 tokens; plus fixed per-token advantages."""
    from mssr_megatron.train.experience import build_experience

    g = torch.Generator().manual_seed(4)
    image = [hf_config.vision_start_token_id], [hf_config.vision_end_token_id]
    shapes = [(4, 4, 3), (4, 8, 9), (None, None, 2), (4, 4, 7), (None, None, 5), (4, 8, 4)]
    rollouts, images = [], []
    for i, (h, w, response) in enumerate(shapes):
        prompt = torch.randint(10, 300, (3 + 2 * i,), generator=g).tolist()
        if h is None:
            images.append(None)
        else:
            prompt = prompt + image[0] + [hf_config.image_token_id] * (h * w // 4) + image[1]
            images.append((torch.randn(h * w, 3 * 2 * 14 * 14, generator=g), torch.tensor([[1, h, w]])))
        rollouts.append(types.SimpleNamespace(prompt_ids=prompt, response_ids=torch.randint(10, 300, (response,),
                        generator=g).tolist(), response_logprobs=[-1.0] * response))
    exp = build_experience(rollouts, [1.0] * 6, list(range(6)), list(range(6)), images,
                           image_token_id=hf_config.image_token_id,
                           spatial_merge_size=hf_config.vision_config.spatial_merge_size, pad_id=0)
    return exp, torch.randn(6, exp.input_ids.shape[1] - 1, generator=g)


def _exact_worker(rank: int, world: int, micro_batch_size: int, out_dir: str) -> None:
    """Fixed vs budget micro-batches on the 6 rows of `_step_rows`, at data-parallel size `world` (TP = PP = 1)."""
    from mssr_megatron.algorithms.losses import LOSS_AGG_MODES, compute_policy_loss
    from mssr_megatron.config import AlgorithmConfig, ModelConfig, OptimizerConfig
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.train import rl_step, token_budget
    from mssr_megatron.train.actor import MegatronActor

    init_megatron(1, 1, seed=0)
    try:
        hf_config = tiny_qwen2_5_vl_config(vocab_size=331, num_layers=2)
        model_cfg = ModelConfig(params_dtype="float32")
        torch.manual_seed(0)  # the same random weights on every rank (a run loads them from the HF checkpoint)
        actor = MegatronActor(hf_config, model_cfg, OptimizerConfig(lr=0.0, weight_decay=0.0, grad_clip=0.0), 10)
        step, step_advantages = _step_rows(hf_config)
        rows = torch.arange(6).chunk(world)[rank]  # rl_step.data_parallel_rows: contiguous blocks
        # the rows of the step reordered as rl_step.balance_data_parallel does (one mini-batch of 6)
        order = token_budget.balanced_row_order(token_budget.row_costs(
            step.lengths, step.image_grid_thw, 6, 8, step.input_ids.shape[1]), world, 6 // world)
        results = {"lengths": step.lengths[rows].tolist(), "order": order, "own_count": len(token_budget.budget_parts(
            rows, step.lengths, step.image_grid_thw, 120, 8, step.input_ids.shape[1]))}
        for name, budget, exp, advantages in (("fixed", None, step, step_advantages[rows]),
                                              ("budget", 120, step, step_advantages[rows]),
                                              ("balanced", 120, step.select(order), step_advantages[order][rows])):
            cfg = RunConfig(model=model_cfg, parallel=ParallelConfig(micro_batch_size=micro_batch_size,
                                                                     max_tokens_per_microbatch=budget))
            cfg.optimizer.mini_batch_size = 6
            ctx = types.SimpleNamespace(cfg=cfg, actor=actor, blocked_ids=[])
            parts = [b["rows"].tolist() for b in rl_step.microbatches(ctx, exp, rows)]
            logprobs, entropy = rl_step.token_logprobs(ctx, actor, exp, rows, 1.0)
            old = logprobs - 0.05 * advantages.sign()  # ratios off 1, some clipped
            results[name] = {"parts": parts, "logprobs": logprobs, "entropy": entropy}
            for mode in LOSS_AGG_MODES:
                algo_cfg = AlgorithmConfig(loss_agg_mode=mode, use_kl_loss=True, kl_loss_coef=0.1,
                                           entropy_coef=0.01)
                cfg.algorithm = algo_cfg
                losses = []

                class Algo:
                    def loss(self, *args, **terms):
                        loss, metrics = compute_policy_loss(algo_cfg, *args, **terms)
                        losses.append(loss.detach())
                        return loss, metrics

                ctx.algo = Algo()
                rl_step.update_policy(ctx, exp, rows, advantages, old, old + 0.1)
                grads = {n: p.main_grad.detach().clone() for n, p in actor.module.named_parameters()}
                results[name][mode] = {"loss": float(sum(losses)), "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        destroy_megatron()


def _assert_same_step(fixed: dict, budget: dict, lengths: list[int]) -> None:
    from mssr_megatron.algorithms.losses import LOSS_AGG_MODES

    for i, n in enumerate(lengths):  # back in row order; real columns agree (padding ones hold any value)
        for key in ("logprobs", "entropy"):
            torch.testing.assert_close(budget[key][i, : n - 1], fixed[key][i, : n - 1], rtol=0, atol=1e-5)
    for mode in LOSS_AGG_MODES:
        assert any(g.abs().sum() > 0 for g in fixed[mode]["grads"].values())
        for name, grad in fixed[mode]["grads"].items():
            torch.testing.assert_close(budget[mode]["grads"][name], grad, rtol=0, atol=1e-5, msg=f"{mode} {name}")


@pytest.mark.slow
def test_budget_microbatches_give_the_loss_and_gradients_of_fixed_ones(tmp_path):
    from mssr_megatron.algorithms.losses import LOSS_AGG_MODES

    spawn(_exact_worker, 1, 1, 2, str(tmp_path))
    r = torch.load(tmp_path / "rank0.pt")
    fixed, budget = r["fixed"], r["budget"]
    assert fixed["parts"] == [[0, 1], [2, 3], [4, 5]]
    assert budget["parts"] != fixed["parts"] and len({len(p) for p in budget["parts"]}) > 1, budget["parts"]
    _assert_same_step(fixed, budget, r["lengths"])
    for mode in LOSS_AGG_MODES:
        assert budget[mode]["loss"] == pytest.approx(fixed[mode]["loss"], abs=1e-5), mode


@pytest.mark.slow
def test_budget_microbatches_at_two_data_parallel_ranks(tmp_path):
    """DP = 2 (real gloo processes): the ranks' own packings differ in count, the budget split runs the same count on
    both, and the step's loss (summed over ranks) and all-reduced gradients equal the fixed split's."""
    from mssr_megatron.algorithms.losses import LOSS_AGG_MODES

    spawn(_exact_worker, 2, 2, 1, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["own_count"] != ranks[1]["own_count"], [r["own_count"] for r in ranks]
    assert len(ranks[0]["budget"]["parts"]) == len(ranks[1]["budget"]["parts"])
    for r in ranks:
        _assert_same_step(r["fixed"], r["budget"], r["lengths"])
    for mode in LOSS_AGG_MODES:
        total = [sum(r[name][mode]["loss"] for r in ranks) for name in ("fixed", "budget", "balanced")]
        assert total[1] == pytest.approx(total[0], abs=1e-5), mode
        assert total[2] == pytest.approx(total[0], abs=1e-5), mode
    # balanced: the ranks' blocks were rows {0,1,2} / {3,4,5}; the reordered step deals them out by cost, and the
    # all-reduced gradients are those of the original order
    assert ranks[0]["order"] != list(range(6)), ranks[0]["order"]
    for r in ranks:
        for mode in LOSS_AGG_MODES:
            for name, grad in r["fixed"][mode]["grads"].items():
                torch.testing.assert_close(r["balanced"][mode]["grads"][name], grad, rtol=0, atol=1e-5,
                                           msg=f"{mode} {name}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from trainer_assets import build_assets

    return build_assets(str(tmp_path_factory.mktemp("assets")))


@pytest.mark.slow
def test_bench_reports_token_budget_and_fixed_microbatches(tmp_path, assets):
    """`mssr bench` with a budget: the RL steps run through trainer.train_step with it, and the report holds both
    splits' padding and the interleaved update-time ratio."""
    import json
    import subprocess
    import sys

    from trainer_assets import overrides

    out = tmp_path / "bench.json"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "mssr_megatron.cli", "bench", "examples/configs/tiny_cpu.yaml",
           *overrides(assets, str(tmp_path / "run"), "parallel.max_tokens_per_microbatch=96"), "--out", str(out),
           "--warmup", "0", "--repeats", "1", "--no-hf-compare"]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    micro = result["microbatches"]
    assert micro["fixed"]["sizes"] == [2] * 4  # 8 rows in mini-batches of 4, micro-batches of 2
    assert sum(micro["configured"]["sizes"]) == 8 and micro["configured"]["sizes"] != micro["fixed"]["sizes"]
    assert micro["configured"]["real_tokens"] == micro["fixed"]["real_tokens"]
    assert micro["configured"]["padding_fraction"] <= micro["fixed"]["padding_fraction"]
    assert "update_fixed_microbatches" in result["phases"] and result["token_budget"]["time_ratio"] > 0
    assert "update micro-batches (configured)" in proc.stdout and "token-budget / fixed" in proc.stdout
