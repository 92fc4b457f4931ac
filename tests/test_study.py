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


def test_steps_to_target_first_step_after_the_start_at_or_above():
    assert steps_to_target({0: 0.4, 10: 0.6, 20: 0.59, 30: 0.7}, 0.6) == 10
    assert steps_to_target({0: 0.4, 10: 0.5}, 0.6) is None
    assert steps_to_target({20: 0.61, 0: 0.2, 10: 0.7}, 0.65) == 10  # unsorted input
    assert steps_to_target({0: 0.7, 10: 0.5, 20: 0.8}, 0.6) == 20  # the initial policy does not count


def test_summarise_hand_worked(tmp_path):
    flat = [1.0] * 10 + [0.5] * 10  # first 10 mean 1.0, last 10 mean 0.5
    runs = {
        # reference: seed-mean curve 0.4, 0.5, 0.55, 0.6 -> final (last 1) 0.6 reached at step 30
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
    s = summarise(runs, "grpo", final_window=1, thresholds=(0.5,))
    assert s["target_val_accuracy"] == pytest.approx(0.6)
    final, half = list(s["targets"])
    assert (final, half) == ("grpo final (0.600)", "0.50")
    g, m, v = (s["rows"][k]["targets"] for k in ("grpo", "mssr", "mvsr"))
    assert g[final]["steps_mean_curve"] == 30 and g[final]["ratio_vs_reference"] == pytest.approx(1.0)
    assert m[final]["steps_mean_curve"] == 10 and m[final]["ratio_vs_reference"] == pytest.approx(1 / 3)
    assert m[final]["steps_per_seed"] == [10, 10]
    assert v[final]["steps_mean_curve"] is None and v[final]["ratio_vs_reference"] is None
    assert v[final]["steps_per_seed"] == [20, None] and v[final]["seeds_reaching"] == 1
    # 0.50: grpo mean reaches it at 10, mssr at 10 (x1.00), mvsr's mean 0.3/0.5/0.2 at 20 (x2.00)
    assert g[half]["steps_mean_curve"] == 10 and m[half]["ratio_vs_reference"] == pytest.approx(1.0)
    assert v[half]["steps_mean_curve"] == 20 and v[half]["ratio_vs_reference"] == pytest.approx(2.0)
    row = s["rows"]["mssr"]
    assert row["final_val_accuracy_mean"] == pytest.approx(0.65)
    assert (row["final_val_accuracy_min"], row["final_val_accuracy_max"]) == (0.6, 0.7)
    assert s["rows"]["grpo"]["entropy_first10_mean"] == pytest.approx(1.0)
    assert s["rows"]["grpo"]["entropy_last10_mean"] == pytest.approx(0.5)
    table = format_table(s)
    assert "| mvsr | 2 | 0.400 | 0.200 [0.200, 0.200] | not reached (1/2 seeds) | 20, x2.00 (1/2 seeds) |" in table  # v1 never reaches 0.5
    text = outcome(s)
    assert "mssr: validation accuracy 0.400 -> 0.650" in text and "mvsr" in text


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


def test_two_variants_of_one_estimator_are_two_rows_and_a_clash_is_refused(tmp_path):
    """A config's row is its logging.run_name, else its estimator: MSSR with full and with sampled shaping entropy
    are two rows; two configs with one label would write into the same run folders and are refused."""
    from mssr_megatron.study import run_all, run_label, setup_table

    examples = os.path.abspath("examples/configs")
    (tmp_path / "val.jsonl").write_text('{"problem": "p", "answer": "1"}\n' * 3)
    configs = []
    for name in ("tiny_cpu.yaml", "tiny_cpu_sampled.yaml"):  # the example configs, on a local validation file
        (tmp_path / name).write_text(f"base: {examples}/{name}\ndata:\n  val_path: {tmp_path}/val.jsonl\n")
        configs.append(str(tmp_path / name))
    assert [run_label(c) for c in configs] == ["mssr", "mssr_sampled"]
    with pytest.raises(ValueError, match="share the label 'mssr'"):
        run_all([configs[0], configs[0]], [0], str(tmp_path / "out"), 1, 1)
    table = setup_table(configs, 100, 10)
    assert f"| mssr | mssr | `{configs[0]}` | 64 x 1 |" in table
    assert f"| mssr_sampled | mssr | `{configs[1]}` | 64 x 1 |" in table and table.endswith("| 100 | 10 | 3 |")
