"""Sequence parallelism and Megatron's distributed optimizer on CPU + gloo (real processes, 2 ranks each):
TP2 + SP trains as TP1, and DP2 with the distributed optimizer as DP1 (fp32 and bf16), within 1e-5 in loss, grad norm
and updated weights over 2 optimizer steps; a run saved and resumed with the distributed optimizer continues bit for
bit."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_harness import per_row_microbatches, spawn, tiny_case

STEPS = 2


def _train(actor, inputs, rows: list[int], steps: int) -> list[dict]:
    """`steps` optimizer steps on the micro-batches of `rows`, each step's loss normalised by the token count of the
    whole 2-prompt batch (so one DP rank holding one row and one rank holding both see the same mini-batch loss)."""
    mask = inputs["attention_mask"][:, 1:].float()
    micro = [mb for mb in per_row_microbatches(inputs) if mb["row"] in rows]

    def nll(logprobs, entropy, mb):
        row = mask[mb["row"] : mb["row"] + 1]
        return -(logprobs * row).sum() / mask.sum(), {}

    return [actor.train_step(micro, nll) for _ in range(steps)]


def _actor(tp: int, sp: bool, distributed: bool, dtype: str = "float32"):
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from mssr_megatron.models.tiny_hf import published_state_dict

    cfg, hf, inputs = tiny_case(tied=False)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                              use_distributed_optimizer=distributed)
    actor = MegatronActor(cfg, ModelConfig(params_dtype=dtype),
                          OptimizerConfig(lr=1e-4, weight_decay=0.1, grad_clip=1.0), 10, parallel_cfg=parallel)
    actor.load_hf_state({k: v.to(getattr(torch, dtype)) for k, v in published_state_dict(hf).items()})
    return actor, inputs


def _check_layout(actor, sp: bool, distributed: bool) -> None:
    """The flags reached megatron: SP in the model config, a DistributedOptimizer sharding the Adam state."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    assert actor.module.config.sequence_parallel == sp
    optimizers = getattr(actor.optimizer, "chained_optimizers", [actor.optimizer])
    assert all(isinstance(o, DistributedOptimizer) == distributed for o in optimizers), optimizers


def _result(actor, metrics, rows) -> dict | None:
    """Mini-batch losses, grad norms and the full updated weights (HF names) on the weight owner; None elsewhere."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.rollout.weight_export import export_full_weights, is_weight_owner

    # actor/loss is the mean over this rank's micro-batches of their shares of the mini-batch loss: the mini-batch
    # loss is their sum over micro-batches and DP ranks
    losses = torch.tensor([m["actor/loss"] * len(rows) for m in metrics])
    torch.distributed.all_reduce(losses, group=ps.get_data_parallel_group())
    weights = {name: t.clone() for name, t in export_full_weights(actor.module, actor.dims)}
    if not is_weight_owner():
        return None
    return {"losses": losses.tolist(), "grad_norms": [m["actor/grad_norm"] for m in metrics], "weights": weights}


def _rows(dp: int) -> list[int]:
    from megatron.core import parallel_state as ps

    return [0, 1] if dp == 1 else [ps.get_data_parallel_rank()]


def _train_worker(rank: int, tp: int, dp: int, sp: bool, distributed: bool, dtype: str, out_dir: str) -> None:
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(tp, 1, seed=0)
    try:
        actor, inputs = _actor(tp, sp, distributed, dtype)
        _check_layout(actor, sp, distributed)
        if sp:  # the output layer gathers the sequence back: logits stay [B, S, V_padded / TP]
            logits = actor.module(inputs["input_ids"], inputs["position_ids"], inputs["pixel_values"],
                                  inputs["image_grid_thw"])
            assert logits.shape == (*inputs["input_ids"].shape, actor.dims.padded_vocab_size // tp)
            # SP splits the sequence over TP: an odd length is refused with the fix named
            with pytest.raises(ValueError, match=f"must be a multiple of {tp}; pad it"):
                actor.module(inputs["input_ids"][:, :-1], inputs["position_ids"][:, :, :-1])
        rows = _rows(dp)
        result = _result(actor, _train(actor, inputs, rows, STEPS), rows)
        if result is not None:
            torch.save(result, f"{out_dir}/result.pt")
    finally:
        destroy_megatron()


def _run(path, tp=1, dp=1, sp=False, distributed=False, dtype="float32") -> dict:
    path.mkdir()
    spawn(_train_worker, tp * dp, tp, dp, sp, distributed, dtype, str(path))
    return torch.load(path / "result.pt")


def _assert_same_training(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got["losses"] == pytest.approx(want["losses"], abs=atol)
    assert got["grad_norms"] == pytest.approx(want["grad_norms"], abs=atol)
    assert got["weights"].keys() == want["weights"].keys()
    for name, weight in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory) -> dict:
    """The reference: TP1, DP1, no SP, the plain optimizer, both prompts on one rank."""
    return _run(tmp_path_factory.mktemp("single") / "run")


@pytest.mark.slow
def test_tp2_with_sequence_parallelism_trains_as_tp1(tmp_path, single_rank):
    _assert_same_training(_run(tmp_path / "tp2_sp", tp=2, sp=True), single_rank)


@pytest.mark.slow
def test_dp2_with_the_distributed_optimizer_trains_as_dp1(tmp_path, single_rank):
    _assert_same_training(_run(tmp_path / "dp2_distopt", dp=2, distributed=True), single_rank)


@pytest.mark.slow
def test_dp2_with_the_distributed_optimizer_trains_as_dp1_in_bfloat16(tmp_path):
    """bf16 weights: the distributed optimizer keeps sharded fp32 main weights (another code path than fp32)."""
    base = _run(tmp_path / "dp1", dtype="bfloat16")
    _assert_same_training(_run(tmp_path / "dp2_distopt", dp=2, distributed=True, dtype="bfloat16"), base)


def _resume_worker(rank: int, resume: bool, out_dir: str) -> None:
    """DP2 with the distributed optimizer: 2 steps, save, 1 more step; or load that checkpoint and take the step."""
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.train.run_checkpoint import load_model_and_optimizer, save_model_and_optimizer

    init_megatron(1, 1, seed=0)
    try:
        actor, inputs = _actor(1, False, True)
        _check_layout(actor, False, True)
        rows = _rows(2)
        checkpoint = f"{out_dir}/checkpoint"
        if resume:
            load_model_and_optimizer(actor, checkpoint)
            actor.scheduler.load_state_dict(torch.load(f"{checkpoint}/scheduler.pt"))
        else:
            _train(actor, inputs, rows, STEPS)
            if rank == 0:
                os.makedirs(checkpoint)
            torch.distributed.barrier()
            save_model_and_optimizer(actor, checkpoint)
            if rank == 0:
                torch.save(actor.scheduler.state_dict(), f"{checkpoint}/scheduler.pt")
        result = _result(actor, _train(actor, inputs, rows, 1), rows)
        if result is not None:
            torch.save(result, f"{out_dir}/{'resumed' if resume else 'continued'}.pt")
    finally:
        destroy_megatron()


@pytest.mark.slow
def test_resume_with_the_distributed_optimizer_is_exact(tmp_path):
    spawn(_resume_worker, 2, False, str(tmp_path))
    spawn(_resume_worker, 2, True, str(tmp_path))
    continued, resumed = torch.load(tmp_path / "continued.pt"), torch.load(tmp_path / "resumed.pt")
    _assert_same_training(resumed, continued, atol=0.0)


@pytest.mark.slow
def test_trainer_runs_with_sequence_parallelism_and_the_distributed_optimizer(tmp_path):
    """The config flags reach the trainer's policy: 2 RL steps at TP2 + SP + distributed optimizer, the engine's and
    the trainer's log-probs agree, and the run checkpoint (distributed-optimizer format) converts to HF."""
    import json

    from test_trainer_e2e import _train_worker
    from trainer_assets import build_assets, overrides

    from mssr_megatron.checkpoint.convert import megatron_to_hf

    extra = overrides(build_assets(str(tmp_path / "assets")), str(tmp_path / "run"),
                      "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
                      "parallel.use_distributed_optimizer=true")
    spawn(_train_worker, 2, [("examples/configs/tiny_cpu.yaml", extra)])
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(m["actor/update_skipped"] == 0.0 and m["mismatch/max_abs_diff"] < 1e-4 for m in steps)
    assert os.listdir(megatron_to_hf(tmp_path / "run" / "checkpoints" / "step_000002", tmp_path / "hf",
                                     progress=False))
