"""The loop on two ranks of a tiny random Qwen2.5-VL (gloo, real processes): at DP=2 the spo forgetting rule and
REINFORCE++ with the KL in the reward run, and the spo rule at PP=2 (every checkpoint save also checks that both ranks
hold the same algorithm state); SIGTERM to one worker then a resume at DP=2 gives exactly the metrics of an
uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import psutil
import pytest

from megatron_harness import spawn
from trainer_assets import (assert_resumed_as_uninterrupted, build_assets, logged_metrics, overrides,
                            saved_step, wait_until_logged)

STEPS = 6  # the signal lands while the loop still has steps to run, also when a step takes well under a second


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("assets")))


def _train_worker(rank: int, config_path: str, extra: list, record_dir: str) -> None:
    """Train, recording what this rank's algorithm pipeline returned at each step (advantage and tracker metrics)."""
    from mssr_megatron.algorithms.pipeline import RLAlgorithm
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    seen = {"advantages": [], "after_update": []}

    def recorded(name):
        method = getattr(RLAlgorithm, name)

        def call(self, *args, **kwargs):
            out = method(self, *args, **kwargs)
            seen[name].append(out if isinstance(out, dict) else out.metrics)
            return out
        return call

    RLAlgorithm.advantages, RLAlgorithm.after_update = recorded("advantages"), recorded("after_update")
    train(load_config(config_path, extra))
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["algorithm.baseline.rho_rule=spo", "data.prompts_per_step=24"],
                                   ["algorithm.estimator=reinforce_pp", "algorithm.kl_in_reward=true"],
                                   ["algorithm.baseline.rho_rule=spo", "data.prompts_per_step=24",
                                    "parallel.pipeline_model_parallel_size=2",
                                    "rollout.engines=per_dp_group"]],  # per_node would put one on stage 1
                         ids=["spo", "reinforce_pp_kl_in_reward", "spo_pp2"])
def test_two_ranks_train(tmp_path, assets, extra):
    spawn(_train_worker, 2, "examples/configs/tiny_cpu.yaml", overrides(assets, str(tmp_path / "run"), *extra),
          str(tmp_path))
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(per_rank[1]["advantages"]) == 2 and per_rank[0]["after_update"] == per_rank[1]["after_update"]
    if "parallel.pipeline_model_parallel_size=2" in extra:  # the first stage has no log-probs and needs none
        assert per_rank[0]["advantages"] == [{}, {}] and per_rank[1]["advantages"][0]
    else:  # both replicas computed the global batch's figures
        assert per_rank[0]["advantages"] == per_rank[1]["advantages"]
    steps = [m for s, m in sorted(logged_metrics(tmp_path / "run").items()) if s > 0]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["actor/loss"]) and m["actor/update_skipped"] == 0.0 for m in steps)
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "step_000002" / "COMPLETE")  # the state check passed
    if "algorithm.baseline.rho_rule=spo" in extra:
        assert all(0.875 <= m["tracker/rho"] <= 0.96 for m in steps)
        # all 24 prompts every step: step 1 sees each for the first time (D = 0), step 2 scores the responses kept
        # at step 1 with the policy after two updates
        assert steps[0]["tracker/spo_drift_mean"] == 0.0 and steps[1]["tracker/spo_drift_mean"] > 0.0
    else:  # the policy moved away from the reference after step 1: the KL in the reward is not zero at step 2
        assert steps[0]["kl/old_ref_k3"] == 0.0 and steps[1]["kl/old_ref_k3"] > 0.0


def _start(assets, run_dir, *extra) -> subprocess.Popen:
    # So that the tracker state moves what is trained: the random tiny model earns no reward, so a tracker seeded by
    # an initial pass holds v = 0 whatever rho does; from the prior (v = 0.5) the baseline falls with each 0 reward by
    # an amount that depends on rho. kl_target=1 keeps the step KLs (up to ~0.02 here) on the kl_window rule's slope,
    # where every KL gives its own rho.
    args = overrides(assets, str(run_dir), f"trainer.total_steps={STEPS}", "checkpoint.save_every=0",
                     "algorithm.baseline.init_rollouts=0", "algorithm.baseline.kl_target=1.0", *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "mssr_megatron.cli", "train", "examples/configs/tiny_cpu.yaml", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=900) -> str:
    out, _ = proc.communicate(timeout=timeout)
    noise = ("UserWarning: Transformer Engine and Apex", "warnings.warn(")
    assert proc.returncode == 0, "\n".join(line for line in out.splitlines() if not line.strip().startswith(noise)
                                           and "UserWarning: Transformer Engine and Apex" not in line)[-6000:]
    return out


def _worker_of_rank(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The trainer process of global rank `rank`: a direct child of torchrun (a process the trainer forks keeps its
    environment and, until it execs, its command line: signalling one of those would miss the trainer)."""
    for child in psutil.Process(launcher.pid).children(recursive=False):
        try:
            if child.environ().get("RANK") == str(rank) and "mssr_megatron.cli" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank} under torchrun")


@pytest.mark.slow
def test_sigterm_to_one_worker_then_resume_continues_exactly(tmp_path, assets):
    _wait(_start(assets, tmp_path / "full"))

    interrupted = _start(assets, tmp_path / "cut")
    wait_until_logged(tmp_path / "cut", 1, timeout_s=900, poll_s=0.02)
    _worker_of_rank(interrupted, 1).send_signal(signal.SIGTERM)  # not the driver: rank 0 learns it from rank 1
    out = _wait(interrupted)
    assert "signal (to another rank): saving a checkpoint" in out, out[-4000:]
    cut_at = saved_step(tmp_path / "cut", STEPS)

    _wait(_start(assets, tmp_path / "cut", "checkpoint.resume=auto"))
    assert_resumed_as_uninterrupted(tmp_path / "full", tmp_path / "cut", cut_at, STEPS)
