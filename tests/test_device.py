"""Where the trainer computes: `parallel.compute_device` (trainer.device -> torch.device, with its errors),
`parallel.collective_device`, the micro-batch mover and its use in `run_microbatches`, the model's placement, and
`rl_step.update_policy` handing its loss tensors on the actor's device.

No GPU here: CUDA is faked where only the decision is tested (torch.cuda.is_available / current_device patched), and
the `meta` device stands in for "another device" where tensors must actually move (plain tensors only: megatron
models cannot be built on meta). The CUDA paths themselves are GPU-only: not run (no GPU was available).
"""

from __future__ import annotations

import types

import pytest
import torch

from megatron_harness import per_row_microbatches, spawn, tiny_case
from mssr_megatron import parallel
from mssr_megatron.config import ModelConfig, ParallelConfig
from mssr_megatron.models.provider import MODEL_INPUTS, module_device, move_batch, run_microbatches
from mssr_megatron.parallel import collective_device, compute_device


def _fake_cuda(monkeypatch, available: bool, current: int = 0) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)


# ---------------------------------------------------------------------------------------------------- compute_device


def test_auto_is_the_cpu_without_cuda_and_the_current_gpu_with_it(monkeypatch):
    _fake_cuda(monkeypatch, False)
    assert compute_device("auto") == torch.device("cpu")
    assert compute_device("auto", "gloo") == torch.device("cpu")
    _fake_cuda(monkeypatch, True, current=3)  # init_megatron has set cuda:<LOCAL_RANK> as the current device
    assert compute_device("auto") == torch.device("cuda", 3)
    assert compute_device("auto", "nccl") == torch.device("cuda", 3)


def test_cuda_is_the_current_gpu_and_a_clear_error_without_one(monkeypatch):
    _fake_cuda(monkeypatch, True, current=1)
    assert compute_device("cuda", "nccl") == torch.device("cuda", 1)
    _fake_cuda(monkeypatch, False)
    with pytest.raises(RuntimeError, match=r"trainer.device=cuda but torch finds no CUDA device.*trainer.device=cpu"):
        compute_device("cuda")


def test_cpu_is_the_cpu_even_on_a_gpu_node_but_not_with_nccl(monkeypatch):
    for available in (False, True):
        _fake_cuda(monkeypatch, available)
        assert compute_device("cpu") == torch.device("cpu")
        assert compute_device("cpu", "gloo") == torch.device("cpu")
        with pytest.raises(RuntimeError, match=r"trainer.device=cpu, but parallel.backend=nccl needs CUDA"):
            compute_device("cpu", "nccl")
    _fake_cuda(monkeypatch, False)  # auto falls back to the CPU, which NCCL cannot use either
    with pytest.raises(RuntimeError, match=r"trainer.device=auto found no CUDA device.*parallel.backend=gloo"):
        compute_device("auto", "nccl")


def test_unknown_device_is_named():
    with pytest.raises(ValueError, match=r"trainer.device='tpu' must be one of auto, cpu, cuda"):
        compute_device("tpu")


def test_backend_defaults_to_the_initialised_process_group(monkeypatch):
    _fake_cuda(monkeypatch, False)
    monkeypatch.setattr(parallel, "_current_backend", lambda: "nccl")
    with pytest.raises(RuntimeError, match="parallel.backend=nccl"):
        compute_device("cpu")
    monkeypatch.setattr(parallel, "_current_backend", lambda: "gloo")
    assert compute_device("cpu") == torch.device("cpu")


def test_collectives_use_cuda_tensors_under_nccl_only(monkeypatch):
    assert collective_device() == torch.device("cpu")  # no process group in this process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert collective_device() == torch.device("cuda", 2)


# ---------------------------------------------------------------------------------------------------- moving batches


def _batch() -> dict:
    return {"input_ids": torch.arange(6).reshape(2, 3), "position_ids": torch.zeros(3, 2, 3, dtype=torch.long),
            "pixel_values": torch.randn(4, 8), "image_grid_thw": torch.tensor([[1, 2, 2]]),
            "logit_mask": torch.ones(2, 3, dtype=torch.bool), "rows": torch.tensor([5, 7]), "row": 1}


def test_move_batch_on_the_cpu_changes_nothing():
    batch = _batch()
    moved = move_batch(batch, torch.device("cpu"))
    assert moved is not batch and moved.keys() == batch.keys()
    assert all(moved[k] is batch[k] for k in batch)  # same tensors: nothing copied


def test_move_batch_targets_the_requested_device_for_model_inputs_only():
    batch = _batch()
    moved = move_batch(batch, "meta")
    for key in MODEL_INPUTS:
        assert moved[key].device.type == "meta" and moved[key].shape == batch[key].shape, key
        assert batch[key].device.type == "cpu", key  # the caller's batch is untouched
    assert moved["rows"] is batch["rows"] and moved["row"] == 1  # bookkeeping stays where the loss reads it


def test_run_microbatches_moves_each_microbatch_as_it_is_taken_and_hands_the_moved_one_to_the_loss(monkeypatch):
    import megatron.core.pipeline_parallel as pipeline_parallel

    seen_by_stage, seen_by_loss = [], []

    def fake_schedule(*, forward_step_func, data_iterator, model, num_microbatches, forward_only, **_):
        out = []
        for _ in range(num_microbatches):
            output, reduce = forward_step_func(data_iterator, model)
            out.append(reduce(output)[1])
        return out

    def stage(input_ids, position_ids, pixel_values, image_grid_thw, logit_mask=None):
        seen_by_stage.append({t.device.type for t in (input_ids, position_ids, pixel_values, image_grid_thw,
                                                      logit_mask)})
        return input_ids

    def loss_fn(output, batch):
        seen_by_loss.append((output.device.type, batch["input_ids"].device.type, batch["rows"].device.type))
        return output, {"n": 1}

    monkeypatch.setattr(pipeline_parallel, "get_forward_backward_func", lambda: fake_schedule)
    batches = [_batch(), _batch()]
    assert run_microbatches(stage, batches, forward_only=True, loss_fn=loss_fn, device="meta") == [{"n": 1}] * 2
    assert seen_by_stage == [{"meta"}, {"meta"}]
    assert seen_by_loss == [("meta", "meta", "cpu")] * 2
    assert all(b["input_ids"].device.type == "cpu" for b in batches)


def test_module_device_is_where_the_parameters_are():
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")


def test_build_model_refuses_a_gpu_that_is_not_the_current_one(monkeypatch):
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.provider import build_model

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ValueError, match=r"device cuda:1 is not the current CUDA device cuda:0"):
        build_model(None, ModelConfig(), "cuda:1")


# ---------------------------------------------------------------------------------------------------- update_policy


def test_update_policy_gives_the_loss_its_tensors_on_the_actors_device(monkeypatch):
    from megatron.core import parallel_state as ps

    from mssr_megatron.train import rl_step
    from mssr_megatron.train.experience import Experience

    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda *a, **k: 1)
    rows, width = 4, 5
    exp = Experience(prompt_keys=list(range(rows)), group_index=torch.arange(rows), rewards=torch.ones(rows),
                     input_ids=torch.ones(rows, width, dtype=torch.long),
                     position_ids=torch.zeros(3, rows, width, dtype=torch.long),
                     response_mask=torch.ones(rows, width - 1), rollout_logprobs=torch.zeros(rows, width - 1))
    devices = []

    class Algo:
        def loss(self, logprobs, old, advantages, mask, *, ref_logprobs, rollout_logprobs, entropy, crossmodal,
                 normalizer):
            devices.append({t.device.type for t in (old, advantages, mask, ref_logprobs, rollout_logprobs)})
            assert old.shape == (2, width - 1) and normalizer == 2 * (width - 1)
            return logprobs.sum(), {}

    class Actor:
        device = torch.device("meta")

        def train_step(self, batches, loss_fn, temperature, masked_token_ids):
            for batch in batches:  # as the schedule would: log-probs on the model's device
                loss_fn(torch.zeros(len(batch["rows"]), width - 1, device="meta"), None, batch)
            return {"actor/loss": 0.0}

    cfg = types.SimpleNamespace(rollout=types.SimpleNamespace(temperature=1.0),
                                optimizer=types.SimpleNamespace(mini_batch_size=2, ppo_epochs=1),
                                parallel=ParallelConfig(micro_batch_size=2), model=ModelConfig(),
                                algorithm=types.SimpleNamespace(loss_agg_mode="token-mean", crossmodal_coef=0.0))
    ctx = types.SimpleNamespace(cfg=cfg, actor=Actor(), algo=Algo(), blocked_ids=[])
    per_token = torch.randn(rows, width - 1)
    metrics = rl_step.update_policy(ctx, exp, torch.arange(rows), per_token, per_token.clone(), per_token.clone())
    assert metrics == {"actor/loss": 0.0} and devices == [{"meta"}, {"meta"}]


# ---------------------------------------------------------------------------------------------------- a real stage


def _placement_worker(rank: int, out_dir: str) -> None:
    from mssr_megatron.train.actor import MegatronActor, shifted_logprobs
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.parallel import destroy_megatron, init_megatron

    init_megatron(1, 1, seed=0, device="auto")
    try:
        device = compute_device("auto")
        cfg, hf, inputs = tiny_case(tied=True)
        actor = MegatronActor(cfg, ModelConfig(params_dtype="float32"), device=device)
        actor.load_hf_state(published_state_dict(hf))
        micro = per_row_microbatches(inputs)
        reduced = actor.token_logprobs(micro, temperature=0.7, masked_token_ids=[3, 5])
        with torch.no_grad():  # the per-micro-batch reduction equals reducing the raw outputs afterwards
            raw = run_microbatches(actor.model, micro, forward_only=True)
            direct = [shifted_logprobs(out, b["input_ids"], actor.vocab_size, 0.7, [3, 5])
                      for out, b in zip(raw, micro)]
        torch.save({"device": str(device), "actor_device": str(actor.device),
                    "param_devices": sorted({str(p.device) for p in actor.module.parameters()}),
                    "cpu_init": actor.module.config.use_cpu_initialization,
                    "result_devices": sorted({str(t.device) for pair in reduced for t in pair}),
                    "equal": all(torch.equal(a, b) for pr, pd in zip(reduced, direct) for a, b in zip(pr, pd))
                    and len(reduced) == len(direct) == len(micro)},
                   f"{out_dir}/placement.pt")
    finally:
        destroy_megatron()


@pytest.mark.slow
def test_actor_lives_on_the_compute_device_and_reduces_each_microbatch_on_the_cpu(tmp_path):
    spawn(_placement_worker, 1, str(tmp_path))
    result = torch.load(tmp_path / "placement.pt")
    assert result["device"] == result["actor_device"] == "cpu"
    assert result["param_devices"] == ["cpu"] and result["cpu_init"] is True
    assert result["result_devices"] == ["cpu"] and result["equal"] is True


# ---------------------------------------------------------------------------------------------------- GPU only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_worker(rank: int, out_dir: str) -> None:
    from mssr_megatron.train.actor import MegatronActor
    from mssr_megatron.config import ModelConfig, OptimizerConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.rollout.weight_export import export_full_weights

    init_megatron(1, 1, seed=0, device="cuda")
    try:
        device = compute_device("cuda")
        cfg, hf, inputs = tiny_case(tied=True)
        actor = MegatronActor(cfg, ModelConfig(params_dtype="float32"), OptimizerConfig(lr=1e-3, weight_decay=0.0), 10,
                              device=device)
        state = published_state_dict(hf)
        actor.load_hf_state(state)
        micro = per_row_microbatches(inputs)  # on the CPU, as the trainer builds them
        logprobs = actor.token_logprobs(micro)
        mask = inputs["attention_mask"][:, 1:].float().to(device)

        def nll(lp, entropy, mb):
            return -(lp * mask[mb["row"] : mb["row"] + 1]).sum() / mask.sum(), {}

        metrics = actor.train_step(micro, nll)
        exported = {name: t.cpu() for name, t in export_full_weights(actor.module, actor.dims)}
        torch.save({"device": str(device), "actor_device": str(actor.device),
                    "param_devices": sorted({str(p.device) for p in actor.module.parameters()}),
                    "cpu_init": actor.module.config.use_cpu_initialization,
                    "logprobs": [tuple(t.cpu() for t in pair) for pair in logprobs],
                    "logprob_devices": sorted({str(t.device) for pair in logprobs for t in pair}),
                    "metrics": metrics, "exported": set(exported) == set(state)}, f"{out_dir}/cuda.pt")
    finally:
        destroy_megatron()


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_actor_trains_on_cuda_from_cpu_microbatches(tmp_path):
    """GPU-only: not run (no GPU was available). The stage is built on the GPU (megatron initialises there), CPU
    micro-batches are moved to it, log-probs come back on it and match the Hugging Face model's on the CPU, one
    optimizer step runs, and the weights export from CUDA parameters."""
    from megatron_harness import hf_logits

    spawn(_cuda_worker, 1, str(tmp_path))
    result = torch.load(tmp_path / "cuda.pt")
    assert result["device"] == result["actor_device"] == "cuda:0"
    assert result["param_devices"] == ["cuda:0"] and result["cpu_init"] is False
    assert result["logprob_devices"] == ["cuda:0"]
    cfg, hf, inputs = tiny_case(tied=True)
    expected = torch.log_softmax(hf_logits(hf, inputs)[:, :-1].float(), -1).gather(
        -1, inputs["input_ids"][:, 1:, None])[..., 0]
    got = torch.cat([pair[0] for pair in result["logprobs"]])
    keep = inputs["attention_mask"][:, 1:].bool()
    assert torch.allclose(got[keep], expected[keep], atol=5e-3)  # TF32 convolutions in the vision tower
    assert result["metrics"]["actor/update_skipped"] == 0.0 and result["exported"]


def _train_worker(rank: int, config_path: str, extra: list) -> None:
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    train(load_config(config_path, extra))


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_trainer_runs_two_steps_on_cuda_with_nccl(tmp_path):
    """GPU-only: not run (no GPU was available). `mssr train` with trainer.device=cuda, NCCL and the HF engine on the
    GPU: two finite steps, with the reference model (kl loss) and weight sync every step."""
    import json

    from trainer_assets import build_assets, overrides

    assets = build_assets(str(tmp_path / "assets"))
    run_dir = tmp_path / "run"
    spawn(_train_worker, 1, "examples/configs/tiny_cpu.yaml",
          overrides(assets, str(run_dir), "trainer.device=cuda", "parallel.backend=nccl",
                    "algorithm.use_kl_loss=true"))
    with open(run_dir / "metrics.jsonl") as f:
        steps = [m for m in map(json.loads, f) if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert m["actor/update_skipped"] == 0.0 and m["actor/loss"] is not None and m["sync/bytes"] > 0


def test_a_private_world_leaves_no_port_for_child_processes(monkeypatch):
    """Without a launcher, init_megatron makes a one-process world on a free port without writing it to os.environ:
    a later subprocess (a test's `mssr train`) that inherited MASTER_PORT found that port held (EADDRINUSE)."""
    import os

    import torch.distributed as dist

    from mssr_megatron.parallel import destroy_megatron, init_megatron

    for name in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    init_megatron(1, 1, seed=0, device="cpu")
    try:
        assert dist.get_world_size() == 1
        assert "MASTER_PORT" not in os.environ and "MASTER_ADDR" not in os.environ
    finally:
        destroy_megatron()
