"""The RL loop end to end on a tiny random Qwen2.5-VL: every estimator for two steps, TP=2 and PP=2 on gloo,
and bad configs that fail before any work starts."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from megatron_harness import spawn
from trainer_assets import build_assets, overrides

ESTIMATOR_SETTINGS = {
    "mssr": [], "mvsr": [], "reinforce_pp": [],
    "grpo": ["rollout.n=2", "data.prompts_per_step=4"], "drgrpo": ["rollout.n=2", "data.prompts_per_step=4"],
    "rloo": ["rollout.n=2", "data.prompts_per_step=4"],
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("assets")))


def _train_worker(rank: int, runs: list) -> None:
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    for config_path, extra in runs:
        train(load_config(config_path, extra))


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_every_estimator_runs_two_steps(tmp_path, assets):
    from mssr_megatron.algorithms import ESTIMATORS

    assert set(ESTIMATOR_SETTINGS) == set(ESTIMATORS.names())
    runs = [("examples/configs/tiny_cpu.yaml",
             overrides(assets, str(tmp_path / name), f"algorithm.estimator={name}", *extra))
            for name, extra in ESTIMATOR_SETTINGS.items()]
    spawn(_train_worker, 1, runs)
    for name in ESTIMATOR_SETTINGS:
        steps = [m for m in _metrics(tmp_path / name) if m["step"] > 0]
        assert [m["step"] for m in steps] == [1, 2], name
        for m in steps:
            assert math.isfinite(m["actor/loss"]) and m["actor/update_skipped"] == 0.0, (name, m)
            assert m["reward/count"] == 8
        assert ("tracker/rho" in steps[0]) == (name in ("mssr", "mvsr"))
        assert ("shaping/psi_mean" in steps[0]) == (name == "mssr")


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_loop_trains_with_tensor_and_pipeline_parallelism(tmp_path, assets, tp, pp):
    extra = overrides(assets, str(tmp_path / "run"), f"parallel.tensor_model_parallel_size={tp}",
                      f"parallel.pipeline_model_parallel_size={pp}", "checkpoint.export_hf_at_end=true",
                      # per_node would put an engine on the stage-1 rank, which does not receive the full weights
                      *(["rollout.engines=per_dp_group"] if pp > 1 else []))
    spawn(_train_worker, 2, [("examples/configs/tiny_cpu.yaml", extra)])
    steps = [m for m in _metrics(tmp_path / "run") if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["actor/loss"]) and math.isfinite(m["actor/grad_norm"]) for m in steps)
    assert all(m["mismatch/max_abs_diff"] < 1e-4 for m in steps)  # engine and trainer agree on log-probs

    # The run checkpoint converts to HF at another layout (TP=PP=1) and equals the trainer's own export of the
    # in-memory weights at the same step.
    from safetensors.torch import load_file

    from mssr_megatron.checkpoint.convert import megatron_to_hf

    out = megatron_to_hf(tmp_path / "run" / "checkpoints" / "step_000002", tmp_path / "converted", progress=False)
    converted = {}
    for name in os.listdir(out):
        if name.endswith(".safetensors"):
            converted.update(load_file(os.path.join(out, name)))
    exported = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))
    assert sorted(converted) == sorted(exported)
    for name, tensor in exported.items():
        assert torch.equal(converted[name], tensor), name


@pytest.mark.parametrize("override,expected", [
    ("algorithm.estimatr=grpo", "unknown config key 'algorithm.estimatr' (did you mean 'algorithm.estimator'?)"),
    ("parallel.tensor_model_parallel_size=3", "parallel.tensor_model_parallel_size=3 must divide"),
    ("data.train_path=/no/such/train.jsonl", "data.train_path: no such file '/no/such/train.jsonl'"),
    ("model.hf_path=/no/such/model", "model.hf_path='/no/such/model' has no config.json"),
])
def test_bad_config_fails_before_any_work_with_one_line(tmp_path, assets, capsys, override, expected):
    from mssr_megatron.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "examples/configs/tiny_cpu.yaml", *overrides(assets, str(run_dir)), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mssr train: error: ") and expected in err[0], err
    assert not run_dir.exists()  # nothing was started or written


def _nan_worker(rank: int, config_path: str, extra: list, out_dir: str) -> None:
    from mssr_megatron.algorithms.pipeline import RLAlgorithm
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    original = RLAlgorithm.loss

    def nan_loss(self, *args, **kwargs):  # a loss that turns non-finite, as a diverging run's would
        loss, metrics = original(self, *args, **kwargs)
        return loss * float("nan"), metrics

    RLAlgorithm.loss = nan_loss
    try:
        train(load_config(config_path, extra))
    except RuntimeError as exc:
        with open(f"{out_dir}/error.txt", "w") as f:
            f.write(str(exc))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_reported_and_stop_the_run_with_a_checkpoint(tmp_path, assets):
    run_dir = tmp_path / "run"
    extra = overrides(assets, str(run_dir), "trainer.total_steps=4", "trainer.max_nonfinite_steps=1")
    spawn(_nan_worker, 1, "examples/configs/tiny_cpu.yaml", extra, str(tmp_path))
    error = (tmp_path / "error.txt").read_text()
    assert error.startswith("stopping at step 2: 2 steps had non-finite values (last: loss)"), error
    steps = [m for m in _metrics(run_dir) if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2] and all(m["actor/update_skipped"] == 1.0 for m in steps)
    assert (run_dir / "checkpoints" / "step_000002" / "COMPLETE").exists()
