"""SIGTERM (SLURM preemption) mid-training saves a checkpoint and exits cleanly; resuming with
checkpoint.resume=auto gives exactly the metrics of an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer_assets import build_assets, overrides

VOLATILE = ("time", "time/", "sync/seconds", "sync/gb_per_s")  # wall-clock figures differ between any two runs


def _start(assets, run_dir, *extra) -> subprocess.Popen:
    args = overrides(assets, str(run_dir), "trainer.total_steps=4", "checkpoint.save_every=0", *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mssr_megatron.cli", "train", "examples/configs/tiny_cpu.yaml",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(run_dir) -> dict[int, dict]:
    with open(run_dir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows}


def _wait(proc, timeout=600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_then_resume_continues_exactly(tmp_path):
    assets = build_assets(str(tmp_path / "assets"))
    _wait(_start(assets, tmp_path / "full"))

    interrupted = _start(assets, tmp_path / "cut")
    metrics_file = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:  # signal once step 1 is logged: the run is then inside step 2
        if metrics_file.exists() and any(json.loads(l)["step"] == 1 for l in metrics_file.read_text().splitlines()):
            break
        time.sleep(0.2)
    interrupted.send_signal(signal.SIGTERM)
    out = _wait(interrupted)
    assert "signal SIGTERM: saving a checkpoint" in out
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert saved and all(not name.endswith(".tmp") for name in saved), saved
    cut_at = int(saved[-1].split("_")[1])
    assert 1 <= cut_at < 4

    _wait(_start(assets, tmp_path / "cut", "checkpoint.resume=auto"))
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "cut")
    assert sorted(resumed) == sorted(full)  # no duplicated or missing steps after the resume
    for step in range(cut_at + 1, 5):
        assert resumed[step] == full[step], step
