"""Activation memory of the log-prob step: the trainer chunks the fused op (model.logprob_chunk_tokens) and cuts each
micro-batch to its own longest row (rounded to what FP8 and sequence parallelism need), with the same results as the
full-width, unchunked computation; peaks measured in bytes on the CPU allocator."""

from __future__ import annotations

import types

import pytest
import torch

from megatron_harness import spawn
from mssr_megatron.config import ModelConfig, ParallelConfig, RunConfig
from mssr_megatron.train.experience import Experience, sequence_multiple

BIG_VOCAB = 4099  # the logits dominate the step's memory, so the op's buffer shows in the peak


def _experience(lengths: list[int], width: int, seed: int = 0) -> Experience:
    """Rows of the given real lengths right-padded to `width`; the last 3 real tokens of each row are the response."""
    g = torch.Generator().manual_seed(seed)
    rows = len(lengths)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width - 1)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(10, 300, (n,), generator=g)
        mask[i, n - 4 : n - 1] = 1
    positions = torch.arange(width).expand(3, rows, width).clone()
    return Experience(prompt_keys=list(range(rows)), group_index=torch.arange(rows), rewards=torch.ones(rows),
                      input_ids=input_ids, position_ids=positions, response_mask=mask,
                      rollout_logprobs=torch.zeros(rows, width - 1), lengths=torch.tensor(lengths))


class _RecordingActor:
    """Stands in for MegatronActor: records the micro-batch shapes it is given, returns per-token zeros."""

    device = torch.device("cpu")

    def __init__(self):
        self.widths = []

    def token_logprobs(self, batches, temperature, masked_token_ids):
        self.widths.append([tuple(b["input_ids"].shape) for b in batches])
        return [(torch.zeros(b["input_ids"].shape[0], b["input_ids"].shape[1] - 1),) * 2 for b in batches]


def _ctx(**parallel) -> types.SimpleNamespace:
    cfg = RunConfig(parallel=ParallelConfig(micro_batch_size=2, **parallel))
    return types.SimpleNamespace(cfg=cfg, actor=_RecordingActor(), blocked_ids=[])


def test_microbatches_are_cut_to_their_own_longest_row():
    from mssr_megatron.train import rl_step

    exp = _experience([5, 3, 30, 9, 17, 17], width=32)
    ctx = _ctx()
    logprobs, _ = rl_step.token_logprobs(ctx, ctx.actor, exp, torch.arange(6), 1.0)
    # longest rows 5, 30, 17 rounded up to multiples of 8 (not all 32 columns, the step's longest)
    assert ctx.actor.widths == [[(2, 8), (2, 32), (2, 24)]]
    assert logprobs.shape == (6, 31)  # re-padded to the Experience's columns for the per-token tensors


def test_pipeline_passes_share_one_width_and_it_is_not_the_steps_longest():
    from mssr_megatron.train import rl_step

    exp = _experience([5, 3, 12, 9, 30, 2], width=32)
    ctx = _ctx(pipeline_model_parallel_size=2)
    rl_step.token_logprobs(ctx, ctx.actor, exp, torch.arange(4), 1.0)
    assert ctx.actor.widths == [[(2, 16), (2, 16)]]


def test_sequence_multiple_follows_fp8_and_sequence_parallelism():
    def multiple(fp8=None, recipe="delayed", tp=1, sp=False):
        return sequence_multiple(ModelConfig(transformer_impl="transformer_engine", fp8=fp8, fp8_recipe=recipe),
                                 ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp))

    assert multiple() == 8 and multiple(tp=2) == 8  # no FP8, no SP: only the few-shapes rounding
    assert multiple(fp8="e4m3") == 16 and multiple(fp8="hybrid", recipe="mxfp8") == 32  # TE's FP8 GEMM alignment
    assert multiple(tp=2, sp=True) == 8 and multiple(tp=3, sp=True) == 24  # divisible by TP
    assert multiple(fp8="e4m3", tp=2, sp=True) == 32  # each rank's S / TP share stays 16-aligned


def test_update_policy_cuts_the_per_token_tensors_to_each_microbatch():
    from mssr_megatron.train import rl_step

    exp = _experience([5, 4, 30, 9], width=32)
    seen = []

    class Algo:
        def loss(self, logprobs, old, advantages, mask, *, ref_logprobs, rollout_logprobs, entropy, crossmodal,
                 normalizer):
            seen.append((logprobs.shape, old.shape, advantages.shape, mask.shape, ref_logprobs.shape,
                         rollout_logprobs.shape, float(mask.sum())))
            return logprobs.sum(), {}

    class Actor:
        device = torch.device("cpu")

        def train_step(self, batches, loss_fn, temperature, masked_token_ids):
            for batch in batches:
                b, s = batch["input_ids"].shape
                loss_fn(torch.zeros(b, s - 1), torch.zeros(b, s - 1), batch)
            return {"actor/loss": 0.0}

    cfg = RunConfig(parallel=ParallelConfig(micro_batch_size=2))
    cfg.optimizer.mini_batch_size = 4
    ctx = types.SimpleNamespace(cfg=cfg, actor=Actor(), algo=Algo(), blocked_ids=[])
    per_token = torch.randn(4, 31)
    with pytest.MonkeyPatch.context() as mp:
        from megatron.core import parallel_state as ps

        mp.setattr(ps, "get_data_parallel_world_size", lambda *a, **k: 1)
        rl_step.update_policy(ctx, exp, torch.arange(4), per_token, per_token.clone(), per_token.clone())
    assert [s[:6] for s in seen] == [((2, 7),) * 6, ((2, 31),) * 6]
    assert [s[6] for s in seen] == [6.0, 6.0]  # every response token still reaches the loss


def _all_positions(batches: list[dict]) -> list[dict]:
    """The micro-batches without their response_mask: the actor then computes the logits at every position, as it
    did before it packed them to the response (actor.with_logit_masks)."""
    return [{k: v for k, v in batch.items() if k != "response_mask"} for batch in batches]


def _same_results_worker(rank: int, out: str) -> None:
    from mssr_megatron.train import rl_step
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.config import OptimizerConfig
    from mssr_megatron.models.qwen2_5_vl import padded_vocab_size
    from mssr_megatron.models.tiny_hf import tiny_qwen2_5_vl_config
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.profiling import peak_allocated_bytes

    init_megatron(1, 1, seed=0)
    try:
        hf_config = tiny_qwen2_5_vl_config(vocab_size=BIG_VOCAB, num_layers=2)
        model_cfg = ModelConfig(params_dtype="float32")
        actor = MegatronActor(hf_config, model_cfg, OptimizerConfig(lr=0.0, weight_decay=0.0, grad_clip=0.0), 10)
        exp = _experience([37, 11, 20, 6], width=40, seed=1)
        rows = torch.arange(4)
        cfg = RunConfig(model=model_cfg, parallel=ParallelConfig(micro_batch_size=2))
        cfg.optimizer.mini_batch_size = 4
        ctx = types.SimpleNamespace(cfg=cfg, actor=actor, blocked_ids=[])

        class Algo:  # a plain policy-gradient loss over the response tokens
            def loss(self, logprobs, old, advantages, mask, *, ref_logprobs, rollout_logprobs, entropy, crossmodal,
                 normalizer):
                return -(logprobs * advantages * mask).sum() / normalizer + 0.1 * (entropy * mask).sum() / normalizer, {}

        ctx.algo = Algo()
        advantages = torch.randn(4, 39, generator=torch.Generator().manual_seed(2))
        cut_lp, cut_ent = rl_step.token_logprobs(ctx, actor, exp, rows, 0.8)
        cut_update = rl_step.update_policy(ctx, exp, rows, advantages, cut_lp, None)
        full = _all_positions(exp.microbatches(rows, 2))  # the old way: the step's full width, every position
        actor.logprob_chunk_tokens = None
        full_out = actor.token_logprobs(full, 0.8)
        original = rl_step.microbatches
        rl_step.microbatches = lambda ctx, exp, rows: _all_positions(exp.microbatches(rows, 2))
        try:
            full_update = rl_step.update_policy(ctx, exp, rows, advantages, cut_lp, None)
        finally:
            rl_step.microbatches = original
        # Peak bytes the fused op allocates inside the actor's log-prob pass over one micro-batch of 2 x 400 tokens.
        import mssr_megatron.train.actor as actor_module

        op, peaks = actor_module.vocab_parallel_logprobs_entropy, []

        def measured(*args, **kwargs):
            peak, result = peak_allocated_bytes(lambda: op(*args, **kwargs))
            peaks.append(peak)
            return result

        actor_module.vocab_parallel_logprobs_entropy = measured
        one = _all_positions(_experience([400, 390], width=400, seed=3).microbatches(torch.arange(2), 2))
        actor.logprob_chunk_tokens = None
        actor.token_logprobs(one, 0.8)
        actor.logprob_chunk_tokens = 16
        actor.token_logprobs(one, 0.8)
        unchunked_peak, chunked_peak = peaks
        torch.save({"mask": exp.response_mask.bool(), "cut": (cut_lp, cut_ent),
                    "full": (torch.cat([o[0] for o in full_out]), torch.cat([o[1] for o in full_out])),
                    "cut_update": cut_update, "full_update": full_update, "lengths": exp.lengths,
                    "peaks": (unchunked_peak, chunked_peak), "padded_vocab": padded_vocab_size(BIG_VOCAB, 1)}, out)
    finally:
        destroy_megatron()


@pytest.mark.slow
def test_cut_chunked_step_equals_the_full_width_unchunked_one_with_a_lower_peak(tmp_path):
    out = tmp_path / "result.pt"
    spawn(_same_results_worker, 1, str(out))
    r = torch.load(out)
    for cut, full in zip(r["cut"], r["full"]):  # the cut pass computes the response columns only, 0 elsewhere
        torch.testing.assert_close(cut[r["mask"]], full[r["mask"]], rtol=0, atol=1e-5)
        assert not cut[~r["mask"]].any()
    assert r["cut_update"]["actor/loss"] == pytest.approx(r["full_update"]["actor/loss"], abs=1e-6)
    assert r["cut_update"]["actor/grad_norm"] == pytest.approx(r["full_update"]["actor/grad_norm"], rel=1e-5)
    unchunked, chunked = r["peaks"]
    # Hand-worked: unchunked works in one float32 [800 tokens, V] buffer (V: Megatron's padded vocabulary), chunked in a [16, V] one; the rest (per-token
    # [800] vectors) is the same in both and well under 1% of the difference.
    saved = (800 - 16) * r["padded_vocab"] * 4
    assert unchunked - chunked == pytest.approx(saved, rel=0.01), (unchunked, chunked, saved)
