"""The engine/trainer log-prob mismatch alarm (trainer.max_logprob_mismatch) on a tiny end-to-end run: `stop` saves a
checkpoint and stops with a message naming the step, metric, value, threshold and checkpoint; `warn` logs and runs on
(here with the TIS rollout correction on, end to end).

The embedded HF engine and Megatron both run in float32 here, so the measured mismatch is small but not zero (summed
in different orders, the log-probs differ by ~1e-7 nats); a threshold below it forces the alarm honestly: the test
reads the value the run logged and checks it is over the threshold.
"""

from __future__ import annotations

import json
import logging

import pytest

from megatron_harness import spawn
from trainer_assets import build_assets, overrides

THRESHOLD = 1e-12  # nats: below any float32 disagreement


def _worker(rank: int, runs: list, log_path: str, error_path: str) -> None:
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    handler = logging.FileHandler(log_path)
    logging.getLogger("mssr").addHandler(handler)
    for config_path, extra in runs:
        try:
            train(load_config(config_path, extra))
        except RuntimeError as exc:
            with open(error_path, "w") as f:
                f.write(str(exc))


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [m for m in map(json.loads, f) if m["step"] > 0]


@pytest.mark.slow
def test_mismatch_alarm_stops_with_a_checkpoint_or_warns(tmp_path):
    assets = build_assets(str(tmp_path / "assets"))
    quick = ["trainer.val_every=0", "trainer.val_before_train=false", "algorithm.baseline.init_rollouts=0",
             f"trainer.max_logprob_mismatch={THRESHOLD}"]
    # The warn run also trains with the TIS correction: its weights reach the loss through update_policy's rows and
    # micro-batch widths, and are 1 up to the float32 mismatch when they are the right rows' engine log-probs.
    runs = [("examples/configs/tiny_cpu.yaml", overrides(assets, str(tmp_path / mode), *quick,
                                                          f"trainer.on_logprob_mismatch={mode}", *extra))
            for mode, extra in (("warn", ["algorithm.rollout_correction=tis"]), ("stop", []))]
    log_path, error_path = tmp_path / "log.txt", tmp_path / "error.txt"
    spawn(_worker, 1, runs, str(log_path), str(error_path))

    # warn: both steps ran, each step's warning names the step, the value, the threshold and what to check.
    warned = _metrics(tmp_path / "warn")
    assert [m["step"] for m in warned] == [1, 2]
    log = log_path.read_text()
    for m in warned:
        value = m["mismatch/mean_abs_diff"]
        assert value > THRESHOLD  # measured, not assumed: the float32 engine and trainer do differ
        assert abs(m["actor/tis_weight_mean"] - 1) < 1e-5 and m["actor/tis_capped_frac"] == 0.0
        assert (f"step {m['step']}: mismatch/mean_abs_diff={value:.4g} nats exceeds "
                f"trainer.max_logprob_mismatch={THRESHOLD:g}; check that the engine received") in log

    # stop: step 1 is logged, a checkpoint of step 1 is on disk, and the run raised naming all of it.
    stopped = _metrics(tmp_path / "stop")
    assert [m["step"] for m in stopped] == [1] and "actor/tis_weight_mean" not in stopped[0]
    checkpoint = tmp_path / "stop" / "checkpoints" / "step_000001"
    assert (checkpoint / "COMPLETE").exists()
    error = error_path.read_text()
    value = stopped[0]["mismatch/mean_abs_diff"]
    assert error.startswith(f"stopping at step 1: mismatch/mean_abs_diff={value:.4g} nats exceeds "
                            f"trainer.max_logprob_mismatch={THRESHOLD:g} (trainer.on_logprob_mismatch=stop); "
                            f"checkpoint saved: {checkpoint}"), error
    assert "stale weight sync" in error


def test_a_run_stopped_on_purpose_ends_in_one_line(monkeypatch, capsys):
    """What the alarm (and the non-finite stops) raise reaches the user as one line and exit code 1, no traceback."""
    from mssr_megatron import cli
    from mssr_megatron.train import RunStopped, trainer

    def stopped(cfg):
        raise RunStopped("stopping at step 3: mismatch/mean_abs_diff=0.5 nats exceeds trainer.max_logprob_mismatch=0.1")

    monkeypatch.setattr(trainer, "train", stopped)
    assert cli.main(["train", "examples/configs/tiny_cpu.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mssr train: error: stopping at step 3: mismatch/mean_abs_diff=0.5 nats exceeds "
                   "trainer.max_logprob_mismatch=0.1"]
