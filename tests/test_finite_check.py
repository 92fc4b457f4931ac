"""Non-finite weights and optimizer state on a real actor (one gloo process; two for the agreement between ranks):
an optimizer step that puts NaN into a weight raises naming it; a checkpoint whose Adam state holds an Inf is refused
at load, naming the checkpoint and the state tensor; no checkpoint or export is written from NaN weights; and the
learning rate after a resume with a changed schedule is the new config's, computed by hand."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch

from megatron_harness import per_row_microbatches, spawn, tiny_case

pytestmark = pytest.mark.slow  # a tiny actor in one process (~15 s), then in two (~25 s)
DAMAGED = "language_model.decoder.layers.1.mlp.linear_fc2.weight"


def _actor(lr: float, min_lr: float, distributed: bool = False):
    """Tiny float32 actor, cosine schedule over 10 optimizer steps, no warmup. Without the distributed optimizer,
    torch's Adam updates the model parameters themselves (megatron's FP32Optimizer)."""
    from mssr_megatron.config import ModelConfig, OptimizerConfig, ParallelConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.train.actor import MegatronActor

    cfg, hf, inputs = tiny_case(tied=False)
    optim = OptimizerConfig(lr=lr, min_lr=min_lr, lr_schedule="cosine", weight_decay=0.1, grad_clip=1.0)
    actor = MegatronActor(cfg, ModelConfig(params_dtype="float32"), optim, 10,
                          parallel_cfg=ParallelConfig(use_distributed_optimizer=distributed))
    actor.load_hf_state(published_state_dict(hf))
    return actor, per_row_microbatches(inputs)


def _step(actor, micro) -> dict:
    def nll(logprobs, entropy, mb):
        return -logprobs.mean() / len(micro), {}

    return actor.train_step(micro, nll)


def _adam_state(actor, name: str) -> dict:
    """torch Adam's state of model parameter `name` (FP32Optimizer: the state is keyed by the parameter itself)."""
    param = dict(actor.module.named_parameters())[name]
    for inner in getattr(actor.optimizer, "chained_optimizers", [actor.optimizer]):
        if param in inner.optimizer.state:
            return inner.optimizer.state[param]
    raise KeyError(name)


def _outcome(fn) -> str:
    from mssr_megatron.train.finite_check import NonFiniteError

    try:
        fn()
    except NonFiniteError as exc:
        return f"NonFiniteError: {exc}"
    return "no error"


def _worker(rank: int, out: str) -> None:
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.train import run_checkpoint

    init_megatron(1, 1, seed=0)
    result = {}
    try:
        actor, micro = _actor(lr=1e-3, min_lr=1e-4)
        _step(actor, micro)
        _step(actor, micro)
        os.makedirs(f"{out}/good/model")
        os.makedirs(f"{out}/bad/model")
        run_checkpoint.save_model_and_optimizer(actor, f"{out}/good/model")
        scheduler_state = actor.scheduler.state_dict()

        # resume with another peak and final LR: the new schedule at the checkpoint's step count
        resumed, _ = _actor(lr=2e-3, min_lr=2e-4)
        run_checkpoint.load_model_and_optimizer(resumed, f"{out}/good/model")
        resumed.load_scheduler_state(scheduler_state)
        result["lr_after_resume"] = [g["lr"] for g in resumed.optimizer.param_groups]
        result["lr_reported_by_the_next_step"] = _step(resumed, micro)["actor/lr"]

        # an Inf in Adam's second moment, written by the real save path and read by the real load path
        _adam_state(actor, DAMAGED)["exp_avg_sq"][0, 0] = math.inf
        run_checkpoint.save_model_and_optimizer(actor, f"{out}/bad/model")
        fresh, _ = _actor(lr=1e-3, min_lr=1e-4)
        result["load"] = _outcome(lambda: run_checkpoint.load_model_and_optimizer(fresh, f"{out}/bad/model"))

        # a NaN first moment: finite loss and gradients, NaN weight after the update
        _adam_state(actor, DAMAGED)["exp_avg_sq"][0, 0] = 1.0
        _adam_state(actor, DAMAGED)["exp_avg"][0, 0] = math.nan
        result["step"] = _outcome(lambda: _step(actor, micro))
        ctx = SimpleNamespace(actor=actor, algo=None, step=3, run_dir=f"{out}/run",
                              cfg=SimpleNamespace(checkpoint_dir=f"{out}/run/checkpoints"))
        result["save"] = _outcome(lambda: run_checkpoint.save(ctx))
        result["export"] = _outcome(lambda: run_checkpoint.export_hf(ctx))
    finally:
        destroy_megatron()
    torch.save(result, f"{out}/result.pt")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("finite"))
    spawn(_worker, 1, out)
    return out, torch.load(f"{out}/result.pt")


def _cosine(step: int, lr: float, min_lr: float, decay_steps: int = 10) -> float:
    """megatron's cosine decay without warmup, by hand: min + (max - min) * (1 + cos(pi * step / decay)) / 2."""
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))


def test_the_learning_rate_after_a_resume_is_the_new_configs(outcome):
    _, result = outcome
    assert result["lr_after_resume"] == pytest.approx([_cosine(2, 2e-3, 2e-4)] * len(result["lr_after_resume"]))
    assert result["lr_reported_by_the_next_step"] == pytest.approx(_cosine(3, 2e-3, 2e-4))


def test_a_loaded_adam_state_with_an_inf_is_refused_naming_the_checkpoint_and_the_tensor(outcome):
    out, result = outcome
    assert result["load"] == (f"NonFiniteError: checkpoint {out}/bad holds non-finite values (optimizer state "
                              f"exp_avg_sq of {DAMAGED}): it cannot be resumed; resume from an earlier checkpoint "
                              "(checkpoint.resume=<save_dir>/step_N)")


def test_an_update_that_puts_nan_into_a_weight_raises_naming_it(outcome):
    _, result = outcome
    assert result["step"] == f"NonFiniteError: non-finite weights after the optimizer step: weight {DAMAGED}"


def test_no_checkpoint_or_export_is_written_from_nan_weights(outcome):
    out, result = outcome
    assert result["save"] == ("NonFiniteError: not writing the checkpoint of step 3: non-finite values in weight "
                              f"{DAMAGED}")
    assert result["export"] == (f"NonFiniteError: not writing the HF export {out}/run/hf: non-finite values in "
                                f"weight {DAMAGED}")
    assert not os.path.exists(f"{out}/run")


def _sharded_worker(rank: int, out: str) -> None:
    """DP2 with the distributed optimizer: Adam updates each rank's shard of the weights (float32: views of the
    parameters). A NaN in the second moment of one of rank 1's shards, saved and loaded back ('dp_reshardable': each
    rank reads its own shard)."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.train import run_checkpoint
    from mssr_megatron.train.finite_check import nonfinite_in

    init_megatron(1, 1, seed=0)
    try:
        actor, micro = _actor(1e-3, 1e-4, distributed=True)
        _step(actor, [mb for mb in micro if mb["row"] == ps.get_data_parallel_rank()])
        clean = nonfinite_in(actor)
        damaged = None
        if rank == 1:  # megatron's own bookkeeping: model parameter k of a group <-> its shard
            names = {id(p): name for name, p in actor.module.named_parameters()}
            (inner,) = actor.optimizer.chained_optimizers
            model_param, shard = next((m, s) for m, s in zip(inner.model_fp32_groups[0], inner.shard_fp32_groups[0])
                                      if s.numel())
            inner.optimizer.state[shard]["exp_avg_sq"][0] = math.nan
            damaged = names[id(model_param)]
        if rank == 0:
            os.makedirs(f"{out}/sharded/model")
        torch.distributed.barrier()
        run_checkpoint.save_model_and_optimizer(actor, f"{out}/sharded/model")
        fresh, _ = _actor(1e-3, 1e-4, distributed=True)
        outcome = _outcome(lambda: run_checkpoint.load_model_and_optimizer(fresh, f"{out}/sharded/model"))
        torch.save((clean, outcome, damaged), f"{out}/rank_{rank}.pt")
    finally:
        destroy_megatron()


def test_a_nan_in_one_ranks_shard_of_the_distributed_optimizer_is_refused_on_every_rank(tmp_path):
    spawn(_sharded_worker, 2, str(tmp_path))
    damaged = torch.load(tmp_path / "rank_1.pt")[2]
    for rank in range(2):
        clean, outcome, _ = torch.load(tmp_path / f"rank_{rank}.pt")
        assert clean is None  # before the damage: finite on both ranks
        assert outcome == (
            f"NonFiniteError: checkpoint {tmp_path}/sharded holds non-finite values (optimizer state exp_avg_sq of "
            f"shard of {damaged} (rank 1)): it cannot be resumed; resume from an earlier checkpoint "
            "(checkpoint.resume=<save_dir>/step_N)")
