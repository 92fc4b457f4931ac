"""Fault injection, end to end with real trainer processes: resumes with an edited config, and an update that
overflows the weights. One tiny 2-step run writes the checkpoint every case resumes from (a copy of its directory).

- a longer run (trainer.total_steps up) with a new optimizer.lr continues; both changes are logged and the new LR
  is the one the next steps use (actor/lr in metrics.jsonl);
- an estimator change is refused in one line (exit code 2) before config.yaml is rewritten;
- an update that puts Inf into the weights stops the run in one line naming the step, the tensor and the last good
  checkpoint, and writes neither a checkpoint nor an HF export of those weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from trainer_assets import build_assets, logged_metrics, overrides

pytestmark = pytest.mark.slow
BASE_STEPS = 2


def _train(assets, run_dir, *extra) -> subprocess.CompletedProcess:
    args = overrides(assets, str(run_dir), f"trainer.total_steps={BASE_STEPS}", *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "mssr_megatron.cli", "train", "examples/configs/tiny_cpu.yaml",
                           *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(assets, run directory) of a finished 2-step run with its checkpoint at step 2."""
    root = tmp_path_factory.mktemp("faults_resume")
    assets = build_assets(str(root / "assets"))
    done = _train(assets, root / "base")
    assert done.returncode == 0, done.stderr[-3000:]
    assert os.path.exists(root / "base" / "checkpoints" / "step_000002" / "COMPLETE")
    return assets, root / "base"


def _resume(trained, tmp_path, *extra) -> tuple[subprocess.CompletedProcess, str]:
    assets, base = trained
    run_dir = str(tmp_path / "run")
    shutil.copytree(base, run_dir)
    return _train(assets, run_dir, "checkpoint.resume=auto", *extra), run_dir


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]


def test_a_longer_run_with_a_new_learning_rate_continues_with_both_applied(trained, tmp_path):
    done, run_dir = _resume(trained, tmp_path, "trainer.total_steps=3", "optimizer.lr=1e-3")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resume: trainer.total_steps 2 -> 3 (loop: " in done.stderr
    assert "resume: optimizer.lr 0.0002 -> 0.001 (applied: the learning-rate schedule of this config" in done.stderr
    metrics = logged_metrics(run_dir)
    assert sorted(metrics) == [0, 1, 2, 3]
    assert metrics[2]["actor/lr"] == 2e-4 and metrics[3]["actor/lr"] == 1e-3  # constant schedule: the new peak LR


def test_an_estimator_change_is_refused_in_one_line_before_config_yaml_is_rewritten(trained, tmp_path):
    before = open(trained[1] / "config.yaml").read()
    done, run_dir = _resume(trained, tmp_path, "algorithm.estimator=grpo", "rollout.n=2")
    assert done.returncode == 2
    checkpoint = os.path.join(run_dir, "checkpoints", "step_000002")
    assert _errors(done) == [f"mssr train: error: resuming {checkpoint}: these settings cannot change on resume: "
                             "rollout.n 1 -> 2, algorithm.estimator 'mssr' -> 'grpo'; set them back to the "
                             "checkpoint's values, or start a new run (a new trainer.output_dir, without "
                             "checkpoint.resume)"]
    assert open(os.path.join(run_dir, "config.yaml")).read() == before
    assert sorted(logged_metrics(run_dir)) == [0, 1, 2]


def test_an_update_that_overflows_the_weights_stops_without_saving_or_exporting(trained, tmp_path):
    """lr x weight decay = 1e40 > float32's range: AdamW's decoupled decay turns every decayed weight into Inf while
    the loss and the gradients are finite (the checks before the step see nothing)."""
    overflow = ("optimizer.lr=1e30", "optimizer.weight_decay=1e10")
    done, run_dir = _resume(trained, tmp_path, "trainer.total_steps=3", *overflow, "checkpoint.save_every=1",
                            "checkpoint.export_hf_at_end=true")
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = _errors(done)
    good = os.path.join(run_dir, "checkpoints", "step_000002")
    assert line.startswith("mssr train: error: step 3: non-finite weights after the optimizer step: weight ")
    assert line.endswith(f"the run stops without saving or exporting them; the last good checkpoint is {good} "
                         "(checkpoint.resume=auto, e.g. with a lower optimizer.lr)")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_000002"]
    assert not os.path.exists(os.path.join(run_dir, "hf"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(row)["step"] for row in f] == [0, 1, 2]
