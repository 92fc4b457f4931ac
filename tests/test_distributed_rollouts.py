"""Two HF rollout engines (rollout.engines=per_node on 2 CPU ranks: two data-parallel groups, or the two TP ranks of
one), in real gloo processes through the trainer's own build_context and rl_step:
  * one rl_step.generate covers every prompt exactly once, in prompt order, each engine serving its contiguous slice
    with its slice's seed; the rollouts equal those of one HF engine in the test process generating each slice with
    that seed (independent reference), and rl_step.grade's rewards equal one grader's over the whole batch;
  * after a weight sync from a perturbed policy, both engines' logits equal the Megatron model's (<= 1e-4);
  * a two-step DP=2 training run with the two engines completes.
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_harness import LAYERS, VOCAB, spawn
from trainer_assets import build_assets, overrides

PROMPTS, N, SEED = 8, 2, 100


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The trainer assets, with a model whose config is tiny_case's (VOCAB, LAYERS), so its inputs fit the model."""
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    root = tmp_path_factory.mktemp("assets")
    out = build_assets(str(root))
    out["model"] = build_tiny_model_dir(root / "model_vocab", seed=3, tie_word_embeddings=False, vocab_size=VOCAB,
                                        num_layers=LAYERS)
    return out


def _two_engine_worker(rank: int, extra: list, out_dir: str) -> None:
    from megatron_harness import gather_tp_logits, megatron_batch, tiny_case

    from mssr_megatron.config import load_config
    from mssr_megatron.models.provider import run_microbatches
    from mssr_megatron.rollout.weight_export import sync_weights
    from mssr_megatron.train import rl_step
    from mssr_megatron.train.run_context import build_context

    ctx = build_context(load_config("examples/configs/tiny_cpu.yaml", extra))
    try:
        served, graded = [], []
        if ctx.engine is not None:
            generate, score = ctx.engine.generate, ctx.grader.score

            def recording_generate(requests, sampling):
                served.append({"ids": [r.request_id for r in requests], "seed": sampling.seed})
                return generate(requests, sampling)

            def recording_score(texts, answers, weight):
                graded.append(len(texts))
                return score(texts, answers, weight)

            ctx.engine.generate, ctx.grader.score = recording_generate, recording_score
        records = [ctx.train[i] for i in range(PROMPTS)]
        sampling = rl_step.sampling_params(ctx, seed=SEED)
        sampling.n = N
        rollouts = rl_step.generate(ctx, records, sampling)
        rewards, metrics = rl_step.grade(ctx, records, rollouts)

        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
        cfg, _, inputs = tiny_case(tied=False)
        with torch.no_grad():
            before = ctx.engine.model(**{k: inputs[k] for k in keys}).logits
        with torch.no_grad():  # move the policy away from the engines' weights, the same way on every rank
            gen = torch.Generator().manual_seed(10)
            for p in ctx.actor.module.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        sync_weights(ctx.actor.module, ctx.actor.dims, ctx.engine, ctx.cfg.rollout.weight_bucket_bytes,
                     hosts=ctx.engine_hosts)
        with torch.no_grad():
            ours = gather_tp_logits(run_microbatches(ctx.actor.model.eval(), [megatron_batch(inputs)],
                                                     forward_only=True)[0], cfg.text_config.vocab_size)
            theirs = ctx.engine.model(**{k: inputs[k] for k in keys}).logits
        valid = inputs["attention_mask"].bool()
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"slots": [[s.index, s.host_rank, s.node, list(s.gpu_ids)] for s in ctx.engine_slots],
                       "served": served, "graded": graded,
                       "rollouts": [[r.request_id, r.sample_index, r.response_ids, r.text] for r in rollouts],
                       "rewards": rewards, "accuracy": metrics["reward/accuracy"],
                       "logit_diff": (ours - theirs)[valid].abs().max().item(),
                       "moved": (theirs - before)[valid].abs().max().item()}, f)
    finally:
        ctx.close()


def _reference_rollouts(assets, extra) -> list:
    """One HF engine in this process generating each engine's slice with that slice's seed."""
    from mssr_megatron.config import load_config
    from mssr_megatron.data.prompts import build_request, load_split
    from mssr_megatron.models.processor import load_processor
    from mssr_megatron.rollout.hf_engine import HFEngine
    from mssr_megatron.train.rl_step import sampling_params

    cfg = load_config("examples/configs/tiny_cpu.yaml", extra)
    processor = load_processor(cfg.model.hf_path)
    records = load_split(cfg.data.train_path, cfg.data, "train", processor)
    engine = HFEngine(cfg.model.hf_path, dtype=cfg.model.params_dtype, max_batch_size=cfg.rollout.hf_batch_size)
    ctx = type("Ctx", (), {"cfg": cfg})()
    out = []
    for start, end in ((0, PROMPTS // 2), (PROMPTS // 2, PROMPTS)):  # worked by hand: 8 prompts over 2 engines
        sampling = sampling_params(ctx, seed=SEED + start * N)
        sampling.n = N
        requests = [build_request(records[i], cfg.data.prompt_template, processor, request_id=str(i))
                    for i in range(start, end)]
        out += [[r.request_id, r.sample_index, r.response_ids, r.text] for r in engine.generate(requests, sampling)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_two_engines_cover_the_step_in_order_and_serve_the_policys_weights(tmp_path, assets, tp):
    """DP=2: one engine per replica. TP=2: both TP ranks of the one replica drive an engine (per_node fills the
    node), so TP rank 1 must receive the full weights too."""
    from mssr_megatron.rewards import RewardGrader

    extra = overrides(assets, str(tmp_path / "run"), "rollout.engines=per_node", "rollout.max_new_tokens=4",
                      f"parallel.tensor_model_parallel_size={tp}")
    spawn(_two_engine_worker, 2, extra, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["slots"] == [[0, 0, 0, []], [1, 1, 0, []]]  # one HF engine per CPU rank
    # each engine served its contiguous slice once, seeded so that request i's seeds are those of one engine
    assert results[0]["served"] == [{"ids": ["0", "1", "2", "3"], "seed": SEED}]
    assert results[1]["served"] == [{"ids": ["4", "5", "6", "7"], "seed": SEED + 4 * N}]
    assert results[0]["graded"] == [4 * N] and results[1]["graded"] == [4 * N]
    # every rank holds every rollout, each prompt exactly once per sample, in prompt order
    assert results[0]["rollouts"] == results[1]["rollouts"]
    rollouts = results[0]["rollouts"]
    assert [(r[0], r[1]) for r in rollouts] == [(str(i), s) for i in range(PROMPTS) for s in range(N)]
    assert rollouts == _reference_rollouts(assets, extra)
    # rewards: one grader over the whole batch, in this process
    from mssr_megatron.config import load_config
    from mssr_megatron.data.prompts import load_split
    from mssr_megatron.models.processor import load_processor

    cfg = load_config("examples/configs/tiny_cpu.yaml", extra)
    records = load_split(cfg.data.train_path, cfg.data, "train", load_processor(cfg.model.hf_path))
    with RewardGrader(cfg.data.reward, num_workers=0) as grader:
        expected = grader.score([r[3] for r in rollouts], [records[int(r[0])].answer for r in rollouts],
                                cfg.data.format_reward_weight)
    for result in results:
        assert result["rewards"] == expected.scores and result["accuracy"] == expected.as_metrics()["reward/accuracy"]
        assert result["moved"] > 1e-2  # the sync really changed the engine's weights ...
        assert result["logit_diff"] <= 1e-4  # ... to exactly the Megatron policy's, on both engines


def _train_worker(rank: int, extra: list, out_dir: str) -> None:
    from mssr_megatron.config import load_config
    from mssr_megatron.rollout.hf_engine import HFEngine
    from mssr_megatron.train.trainer import train

    served = []
    generate = HFEngine.generate

    def recording_generate(self, requests, sampling):
        served.append(len(requests))
        return generate(self, requests, sampling)

    HFEngine.generate = recording_generate
    train(load_config("examples/configs/tiny_cpu.yaml", extra))
    with open(f"{out_dir}/served{rank}.json", "w") as f:
        json.dump(served, f)


@pytest.mark.slow
def test_two_step_data_parallel_run_with_an_engine_per_rank(tmp_path, assets):
    extra = overrides(assets, str(tmp_path / "run"), "rollout.engines=per_node")
    spawn(_train_worker, 2, extra, str(tmp_path))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        steps = [m for m in map(json.loads, f) if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2] and all(m["reward/count"] == 8 for m in steps)
    # tracker initialisation (24 prompts in chunks of prompts_per_step, 8), validation (4), 2 steps (8 each),
    # validation at step 2: half on each rank
    for rank in range(2):
        assert json.loads((tmp_path / f"served{rank}.json").read_text()) == [4, 4, 4, 2, 4, 4, 2]
