"""model.vision_balance=tp_balanced (models/vision_balance.py): the image-to-rank assignment checked by hand, and at
TP2 on gloo (2 real processes) the same logits and gradients as `replicate` (<= 1e-5), each rank encoding about half
of the patches, and the vision weights bit-identical across the TP group after 2 optimizer steps; micro-batches with
several images of different sizes, with one image (one rank encodes nothing) and with none; mssr bench's vision
phase on them (patches per rank by hand); TP2 x DP2 with the distributed optimizer and clipping, and TP2 x PP2
(4 processes each)."""

from __future__ import annotations

import pytest
import torch

from megatron_harness import VOCAB, LAYERS, gather_tp_logits, spawn

from mssr_megatron.models.vision_balance import assign_images

# patch grids (t, h, w) of the images of micro-batch 0 (rows 0 and 1; row 2 has none), of micro-batch 1 (one image),
# micro-batch 2 has no image
GRIDS_MB0 = [(1, 4, 4), (1, 6, 4), (1, 8, 6)]  # 16, 24, 48 patches
GRIDS_MB1 = [(1, 2, 2)]


def test_assignment_by_hand():
    # largest first: 48 -> rank 0; 24 -> rank 1 (load 0); 16 -> rank 1 (24 < 48); then 16 -> rank 1 (40 < 48)
    assert assign_images([16, 24, 48, 16], 2) == [1, 1, 0, 1]
    # by patches, not images: one big image on one rank, three small ones on the other
    assert assign_images([64, 20, 20, 20], 2) == [0, 1, 1, 1]
    # ties: the earlier image first, the lower rank first
    assert assign_images([8, 8, 8, 8], 2) == [0, 1, 0, 1]
    assert assign_images([30, 20, 10, 10, 10], 3) == [0, 1, 2, 2, 1]
    assert assign_images([5], 2) == [0] and assign_images([], 2) == []


def _case():
    """(hf_config, published HF state, micro-batches, mask [rows, S-1] of loss tokens per micro-batch)."""
    from mssr_megatron.models.rope_index import mrope_position_ids
    from mssr_megatron.models.tiny_hf import init_tiny_model, published_state_dict, tiny_qwen2_5_vl_config

    cfg = tiny_qwen2_5_vl_config(vocab_size=VOCAB, tie_word_embeddings=False, num_layers=LAYERS)
    hf = init_tiny_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(1)
    merge = cfg.vision_config.spatial_merge_size

    def text(n):
        return torch.randint(10, 300, (n,), generator=gen).tolist()

    def image(grid):
        return [cfg.vision_start_token_id] + [cfg.image_token_id] * (grid[0] * grid[1] * grid[2] // merge**2) + [
            cfg.vision_end_token_id]

    def microbatch(rows, grids):
        length = max(map(len, rows))
        input_ids = torch.zeros(len(rows), length, dtype=torch.long)
        attention = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)], attention[i, : len(row)] = torch.tensor(row), 1
        grid = torch.tensor(grids) if grids else None
        batch = {"input_ids": input_ids,
                 "position_ids": mrope_position_ids(input_ids, grid, cfg.image_token_id, merge, attention)}
        if grids:
            patches = sum(t * h * w for t, h, w in grids)
            batch.update(pixel_values=torch.randn(patches, 3 * 2 * 14 * 14, generator=gen), image_grid_thw=grid)
        return batch, attention[:, 1:].float()

    micro = [
        microbatch([text(3) + image(GRIDS_MB0[0]) + text(2) + image(GRIDS_MB0[1]) + text(4),
                    text(2) + image(GRIDS_MB0[2]) + text(3), text(9)], GRIDS_MB0),
        microbatch([text(4) + image(GRIDS_MB1[0]) + text(5)], GRIDS_MB1),
        microbatch([text(7)], []),
    ]
    return cfg, published_state_dict(hf), [b for b, _ in micro], [m for _, m in micro]


def _actor(cfg, state, balance: str, distributed: bool = False, grad_clip: float = 0.0):
    from mssr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from mssr_megatron.train.actor import MegatronActor

    # grad_clip 0: no clipping, so the gradient buffers still hold the raw gradients after the step
    actor = MegatronActor(cfg, ModelConfig(params_dtype="float32", vision_balance=balance),
                          OptimizerConfig(lr=1e-3, weight_decay=0.1, grad_clip=grad_clip), 10,
                          parallel_cfg=ParallelConfig(tensor_model_parallel_size=2,
                                                      use_distributed_optimizer=distributed))
    actor.load_hf_state(state)
    return actor


def _bench_vision(actor, micro) -> dict:
    """bench/vision.bench_vision with the parts of a run context and step record it reads."""
    from types import SimpleNamespace

    from mssr_megatron.bench.vision import bench_vision

    exp = SimpleNamespace(microbatches=lambda rows, size: micro)
    ctx = SimpleNamespace(actor=actor, cfg=SimpleNamespace(parallel=SimpleNamespace(micro_batch_size=3),
                                                           model=SimpleNamespace(train_vision=True)))
    rec = SimpleNamespace(first=lambda name: ((None, exp, [0, 1, 2]), {}, None))
    out = bench_vision(ctx, rec, warmup=0, repeats=2, device=torch.device("cpu"))
    assert actor.module.vision_balance == "tp_balanced"  # the option in use, restored
    return out


def _worker(rank: int, out_dir: str) -> None:
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    from mssr_megatron.models import vision_balance

    init_megatron(2, 1, seed=0)
    vision_balance.BUCKET_ELEMENTS = 5000  # several all-reduce buckets, one parameter bigger than a bucket
    try:
        cfg, state, micro, masks = _case()
        tokens = sum(m.sum() for m in masks)
        result = {}
        for balance in ("replicate", "tp_balanced"):
            actor = _actor(cfg, state, balance)
            initial = {n: p.detach().clone() for n, p in actor.module.vision_model.named_parameters()}
            encoded: list[int] = []  # patches this rank's vision tower encoded, call by call

            def count(module, args, kwargs):
                encoded.append(int(kwargs["grid_thw"].prod(-1).sum()))

            actor.module.vision_model.register_forward_pre_hook(count, with_kwargs=True)
            with torch.no_grad():
                logits = [gather_tp_logits(actor.module(b["input_ids"], b["position_ids"], b.get("pixel_values"),
                                                        b.get("image_grid_thw")), VOCAB) for b in micro]
            forward_patches = list(encoded)
            for i, b in enumerate(micro):
                b["row_mask"] = masks[i]

            def nll(logprobs, entropy, batch):
                return -(logprobs * batch["row_mask"]).sum() / tokens, {}

            losses = [actor.train_step(micro, nll)["actor/loss"]]
            grads = {n: p.main_grad.clone() for n, p in actor.module.named_parameters()}
            losses.append(actor.train_step(micro, nll)["actor/loss"])
            if balance == "tp_balanced":  # mssr bench's vision phase on these micro-batches
                result["bench"] = _bench_vision(actor, micro)
            result[balance] = {
                "logits": logits, "patches": forward_patches, "grads": grads, "losses": losses,
                "vision": {n: p.detach().clone() for n, p in actor.module.vision_model.named_parameters()},
                "vision_initial": initial,
            }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        destroy_megatron()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("vision_balance")
    spawn(_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_tp_balanced_logits_equal_replicate(ranks):
    for result in ranks:
        for got, want in zip(result["tp_balanced"]["logits"], result["replicate"]["logits"]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert result["tp_balanced"]["losses"] == pytest.approx(result["replicate"]["losses"], abs=1e-6)


@pytest.mark.slow
def test_tp_balanced_gradients_equal_replicate(ranks):
    for result in ranks:
        got, want = result["tp_balanced"]["grads"], result["replicate"]["grads"]
        assert got.keys() == want.keys() and any(n.startswith("vision_model.") for n in got)
        assert all(want[n].abs().max() > 0 for n in want if n.startswith("vision_model.merger"))
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_each_rank_encodes_about_half_the_patches(ranks):
    total = [sum(t * h * w for t, h, w in GRIDS_MB0), sum(t * h * w for t, h, w in GRIDS_MB1)]
    for result in ranks:  # replicate: every rank encodes every image (micro-batch 2 has none: no call)
        assert result["replicate"]["patches"] == total
    # micro-batch 0, by hand: 48 -> rank 0; 24 and 16 -> rank 1; micro-batch 1: its one image on rank 0, and rank 1
    # does not call the tower at all
    assert ranks[0]["tp_balanced"]["patches"] == [48, 4]
    assert ranks[1]["tp_balanced"]["patches"] == [40]
    assert max(48, 40) <= 0.6 * total[0]


@pytest.mark.slow
def test_vision_weights_identical_across_tp_ranks_after_two_steps(ranks):
    for balance in ("replicate", "tp_balanced"):
        first, second = ranks[0][balance]["vision"], ranks[1][balance]["vision"]
        for name in first:
            assert torch.equal(first[name], second[name]), (balance, name)
    # and they moved (two steps with the vision tower trained), as replicate's did
    initial = ranks[0]["tp_balanced"]["vision_initial"]
    assert all(not torch.equal(w, initial[n]) for n, w in ranks[0]["tp_balanced"]["vision"].items())
    for name, weight in ranks[0]["tp_balanced"]["vision"].items():
        torch.testing.assert_close(weight, ranks[0]["replicate"]["vision"][name], atol=1e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_bench_reports_vision_time_and_patches_per_rank(ranks):
    from mssr_megatron.bench.vision import vision_line

    result = ranks[0]["bench"]
    assert result["chosen"] == "tp_balanced" and result["tp"] == 2
    for option, per_rank in result["per_option"].items():  # gathered over the TP group: both ranks report all
        assert per_rank["median_s_per_rank"] == ranks[1]["bench"]["per_option"][option]["median_s_per_rank"]
    # by hand: replicate encodes 16 + 24 + 48 + 4 patches on each rank; tp_balanced 48 + 4 on rank 0, 24 + 16 on 1
    assert result["per_option"]["replicate"]["patches_per_rank"] == [92, 92]
    assert result["per_option"]["tp_balanced"]["patches_per_rank"] == [52, 40]
    assert result["per_option"]["tp_balanced_share"]["patches_per_rank"] == [52, 40]
    assert result["images"] == 4 and result["microbatches"] == 2
    for option in result["per_option"].values():
        assert len(option["median_s_per_rank"]) == 2 and option["slowest_rank_median_s"] > 0
        assert len(option["slowest_rank_s_per_round"]) == 2
    assert all(result[k] > 0 for k in ("time_ratio", "share_time_ratio", "time_ratio_paired_median",
                                       "share_time_ratio_paired_median"))
    assert "tp_balanced / replicate" in vision_line(result)


def _dp2_worker(rank: int, out_dir: str) -> None:
    """TP2 x DP2 with the distributed optimizer and gradient clipping: DP rank 0 trains on micro-batches 0 and 2, DP
    rank 1 on micro-batch 1 (the TP all-reduce of the tower's gradients comes before the DP reduce-scatter)."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(2, 1, seed=0)
    try:
        cfg, state, micro, masks = _case()
        tokens = sum(m.sum() for m in masks)
        for i, b in enumerate(micro):
            b["row_mask"] = masks[i]
        mine = micro[ps.get_data_parallel_rank()::2]

        def nll(logprobs, entropy, batch):
            return -(logprobs * batch["row_mask"]).sum() / tokens, {}

        result = {}
        for balance in ("replicate", "tp_balanced"):
            actor = _actor(cfg, state, balance, distributed=True, grad_clip=0.05)
            norms = [actor.train_step(mine, nll)["actor/grad_norm"] for _ in range(2)]
            result[balance] = {"grad_norms": norms, "vision": {
                n: p.detach().clone() for n, p in actor.module.vision_model.named_parameters()}}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        destroy_megatron()


@pytest.mark.slow
def test_tp_balanced_with_data_parallel_distributed_optimizer(tmp_path):
    spawn(_dp2_worker, 4, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    want = ranks[0]["replicate"]
    assert want["grad_norms"][0] > 0.05  # the clipping was active
    for result in ranks:
        got = result["tp_balanced"]
        assert got["grad_norms"] == pytest.approx(want["grad_norms"], abs=1e-5)
        for name, weight in got["vision"].items():
            assert torch.equal(weight, ranks[0]["tp_balanced"]["vision"][name]), name  # all 4 ranks bit-identical
            torch.testing.assert_close(weight, want["vision"][name], atol=1e-5, rtol=0, msg=name)


def _pp2_worker(rank: int, out_dir: str) -> None:
    """TP2 x PP2: the tower lives on the first stage only (its TP pair sums the tower's gradients), the loss on the
    last. Two micro-batches of one shape (the stages exchange fixed shapes): micro-batch 0 and a copy of it."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(2, 2, seed=0)
    try:
        cfg, state, micro, masks = _case()
        batch = dict(micro[0], row_mask=masks[0])
        tokens = 2 * masks[0].sum()

        def nll(logprobs, entropy, b):
            return -(logprobs * b["row_mask"]).sum() / tokens, {}

        result = {"first_stage": ps.is_pipeline_first_stage(), "last_stage": ps.is_pipeline_last_stage()}
        for balance in ("replicate", "tp_balanced"):
            actor = _actor(cfg, state, balance, grad_clip=0.05)
            steps = [actor.train_step([batch, dict(batch)], nll) for _ in range(2)]
            vision = actor.module.vision_model
            result[balance] = {"grad_norms": [s["actor/grad_norm"] for s in steps],
                               "losses": [s.get("actor/loss") for s in steps],
                               "vision": None if vision is None else {
                                   n: p.detach().clone() for n, p in vision.named_parameters()}}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        destroy_megatron()


@pytest.mark.slow
def test_tp_balanced_with_pipeline_parallelism(tmp_path):
    spawn(_pp2_worker, 4, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    first = [r for r in ranks if r["first_stage"]]
    last = [r for r in ranks if r["last_stage"]]
    assert len(first) == 2 and len(last) == 2 and all(r["tp_balanced"]["vision"] is None for r in last)
    want = ranks[0]["replicate"]
    assert want["grad_norms"][0] > 0.05  # clipping active: the norm covers the tower's summed gradients too
    for result in ranks:
        assert result["tp_balanced"]["grad_norms"] == pytest.approx(want["grad_norms"], abs=1e-5)
    for result in last:
        assert result["tp_balanced"]["losses"] == pytest.approx(result["replicate"]["losses"], abs=1e-6)
    for name, weight in first[0]["tp_balanced"]["vision"].items():
        assert torch.equal(weight, first[1]["tp_balanced"]["vision"][name]), name  # the TP pair bit-identical
        torch.testing.assert_close(weight, first[0]["replicate"]["vision"][name], atol=1e-5, rtol=0, msg=name)
