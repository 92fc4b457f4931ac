"""The efficiency study's report: steps to target, ratios and final accuracies, against hand-worked values."""

import json
import os
import sys

import pytest

from mssr_megatron.study import format_table, outcome, steps_to_target, summarise, train_command


def _write_run(path, val: dict[int, float], entropy: list[float]):
    os.makedirs(path)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for step, h in enumerate(entropy, start=1):
            f.write(json.dumps({"step": step, "actor/entropy": h}) + "\n")
        for step, acc in val.items():
            f.write(json.dumps({"step": step, "val/accuracy": acc}) + "\n")
    return str(path)


def test_steps_to_target_first_step_at_or_above():
    assert steps_to_target({0: 0.4, 10: 0.6, 20: 0.59, 30: 0.7}, 0.6) == 10
    assert steps_to_target({0: 0.4, 10: 0.5}, 0.6) is None
    assert steps_to_target({20: 0.61, 0: 0.2, 10: 0.7}, 0.65) == 10  # unsorted input


def test_summarise_hand_worked(tmp_path):
    flat = [1.0] * 10 + [0.5] * 10  # first 10 mean 1.0, last 10 mean 0.5
    runs = {
        # reference: seed-mean curve 0.4, 0.5, 0.55, 0.6 -> target 0.6 reached at step 30
        "grpo": [_write_run(tmp_path / "g0", {0: 0.4, 10: 0.5, 20: 0.5, 30: 0.6}, flat),
                 _write_run(tmp_path / "g1", {0: 0.4, 10: 0.5, 20: 0.6, 30: 0.6}, flat)],
        # mean curve 0.4, 0.6, 0.7, 0.65 -> reaches 0.6 at step 10: ratio 1/3; seeds reach at 10 and 10
        "mssr": [_write_run(tmp_path / "m0", {0: 0.4, 10: 0.6, 20: 0.7, 30: 0.6}, flat),
                 _write_run(tmp_path / "m1", {0: 0.4, 10: 0.6, 20: 0.7, 30: 0.7}, flat)],
        # never reaches 0.6 on the mean; one seed touches it at 20
        "mvsr": [_write_run(tmp_path / "v0", {0: 0.4, 10: 0.3, 20: 0.6, 30: 0.2}, [2.0] * 20),
                 _write_run(tmp_path / "v1", {0: 0.4, 10: 0.3, 20: 0.4, 30: 0.2}, [2.0] * 20)],
    }
    assert summarise(runs, "grpo")["target_val_accuracy"] == pytest.approx((0.5 + 0.55 + 0.6) / 3)  # last 3
    s = summarise(runs, "grpo", final_window=1)
    assert s["target_val_accuracy"] == pytest.approx(0.6)
    g, m, v = s["rows"]["grpo"], s["rows"]["mssr"], s["rows"]["mvsr"]
    assert g["steps_to_target_mean_curve"] == 30 and g["steps_to_target_ratio"] == pytest.approx(1.0)
    assert m["steps_to_target_mean_curve"] == 10 and m["steps_to_target_ratio"] == pytest.approx(1 / 3)
    assert m["steps_to_target_per_seed"] == [10, 10]
    assert m["final_val_accuracy_mean"] == pytest.approx(0.65)
    assert (m["final_val_accuracy_min"], m["final_val_accuracy_max"]) == (0.6, 0.7)
    assert v["steps_to_target_mean_curve"] is None and v["steps_to_target_ratio"] is None
    assert v["steps_to_target_per_seed"] == [20, None] and v["seeds_reaching_target"] == 1
    assert v["steps_to_target_median_of_reaching_seeds"] == 20
    assert g["entropy_first10_mean"] == pytest.approx(1.0) and g["entropy_last10_mean"] == pytest.approx(0.5)
    table = format_table(s)
    assert "| mvsr | 2 | 0.400 | 0.200 [0.200, 0.200] | not reached | not reached | 1/2 (20) |" in table
    assert "ratio 0.33" in outcome(s) and "mvsr did not reach the target" in outcome(s)


def test_summarise_needs_the_reference(tmp_path):
    runs = {"mssr": [_write_run(tmp_path / "m0", {0: 0.4}, [1.0])]}
    with pytest.raises(ValueError, match="reference estimator 'grpo'"):
        summarise(runs, "grpo")


def test_train_command_sets_every_seed_and_turns_off_checkpoints():
    cmd = train_command("c.yaml", 3, "out/x", 50, 5)
    assert cmd[:5] == [sys.executable, "-m", "mssr_megatron.cli", "train", "c.yaml"]
    for override in ("trainer.seed=3", "rollout.seed=3", "data.seed=3", "trainer.total_steps=50",
                     "trainer.val_every=5", "trainer.output_dir=out/x", "checkpoint.save_every=0"):
        assert override in cmd
