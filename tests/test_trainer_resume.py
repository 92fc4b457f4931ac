"""SIGTERM (SLURM preemption) mid-training saves a checkpoint and exits cleanly; resuming with
checkpoint.resume=auto gives exactly the metrics of an uninterrupted run with the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from trainer_assets import (assert_resumed_as_uninterrupted, build_assets, overrides, saved_step,
                            wait_until_logged)



def _start(assets, run_dir, *extra) -> subprocess.Popen:
    args = overrides(assets, str(run_dir), "trainer.total_steps=4", "checkpoint.save_every=0", *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mssr_megatron.cli", "train", "examples/configs/tiny_cpu.yaml",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_then_resume_continues_exactly(tmp_path):
    assets = build_assets(str(tmp_path / "assets"))
    _wait(_start(assets, tmp_path / "full"))

    interrupted = _start(assets, tmp_path / "cut")
    wait_until_logged(tmp_path / "cut", 1, timeout_s=600, poll_s=0.2)
    interrupted.send_signal(signal.SIGTERM)
    out = _wait(interrupted)
    assert "signal SIGTERM: saving a checkpoint" in out
    cut_at = saved_step(tmp_path / "cut", 4)

    _wait(_start(assets, tmp_path / "cut", "checkpoint.resume=auto"))
    assert_resumed_as_uninterrupted(tmp_path / "full", tmp_path / "cut", cut_at, 4)
