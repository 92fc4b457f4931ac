"""MetricsLogger (JSONL, NaN, resume, summary, TensorBoard), StepTimer, and the PNG figures of plot_runs."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from mssr_megatron.metrics import MetricsLogger, StepTimer, read_metrics
from mssr_megatron.plots import main_plot, plot_runs


def _logger(run_dir, **kw):
    kw.setdefault("tensorboard", False)
    kw.setdefault("progress_bar", False)
    return MetricsLogger(str(run_dir), total_steps=kw.pop("total_steps", 10), **kw)


def _steps(run_dir):
    return [r["step"] for r in read_metrics(str(run_dir))]


def test_jsonl_round_trip(tmp_path):
    before = time.time()
    with _logger(tmp_path) as logger:
        logger.log(0, {"val/accuracy": 0.25})
        logger.log(1, {"reward/mean": 0.5, "actor/entropy": 1.25, "reward/count": 8})
        logger.log(2, {"reward/mean": 0.75})
    records = read_metrics(str(tmp_path))
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["reward/mean"] == 0.5 and records[1]["actor/entropy"] == 1.25 and records[1]["reward/count"] == 8
    assert all(before <= r["time"] <= time.time() for r in records)
    assert "nonfinite" not in records[1]
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == records  # the file path works too


def test_each_line_is_on_disk_before_close(tmp_path):
    logger = _logger(tmp_path)
    logger.log(1, {"reward/mean": 0.5})
    assert _steps(tmp_path) == [1]  # a run killed now keeps step 1
    logger.close()


def test_array_scalars_and_reserved_names(tmp_path):
    import numpy as np

    with _logger(tmp_path) as logger:
        logger.log(1, {"a": np.float32(0.5), "b": np.array(3)})  # torch tensors go through the same .item()
        with pytest.raises(ValueError, match="reserved"):
            logger.log(2, {"step": 1.0})
        with pytest.raises(TypeError, match="'c'"):
            logger.log(2, {"c": "high"})
    assert read_metrics(str(tmp_path))[0] | {"time": 0} == {"step": 1, "time": 0, "a": 0.5, "b": 3.0}


def test_nonfinite_values_become_null(tmp_path):
    with _logger(tmp_path) as logger:
        logger.log(1, {"loss": float("nan"), "grad": float("inf"), "kl": -math.inf, "ok": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)  # strict JSON
    assert record["loss"] is None and record["grad"] is None and record["kl"] is None and record["ok"] == 1.0
    assert sorted(record["nonfinite"]) == ["grad", "kl", "loss"]


def test_truncated_last_line_is_tolerated(tmp_path):
    with _logger(tmp_path) as logger:
        logger.log(1, {"x": 1.0})
        logger.log(2, {"x": 2.0})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "time": 1.0, "x": 3')  # killed mid-write
    assert _steps(tmp_path) == [1, 2]
    # reopening the run (without resume) drops the fragment so the next record starts on its own line
    with _logger(tmp_path) as logger:
        logger.log(3, {"x": 3.0})
    assert _steps(tmp_path) == [1, 2, 3]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_unreadable_middle_line_warns(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\ngarbage\n{"step": 2}\n')
    with pytest.warns(RuntimeWarning, match=":2: skipping"):
        assert _steps(tmp_path) == [1, 2]


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_metrics(str(tmp_path))


def test_resume_truncates_later_steps(tmp_path):
    with _logger(tmp_path) as logger:
        for step in range(6):
            logger.log(step, {"x": float(step)})
        logger.log(5, {"val/accuracy": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "x"')  # the crash
    with _logger(tmp_path, resume_step=3) as logger:  # checkpoint of step 3
        assert _steps(tmp_path) == [0, 1, 2, 3]
        logger.log(4, {"x": 40.0})
    assert _steps(tmp_path) == [0, 1, 2, 3, 4]
    assert read_metrics(str(tmp_path))[-1]["x"] == 40.0
    # resume() after opening (the trainer restores the checkpoint after building the logger)
    with _logger(tmp_path) as logger:
        logger.resume(2)
        logger.log(3, {"x": 30.0})
    assert _steps(tmp_path) == [0, 1, 2, 3]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_resume_on_empty_run_dir(tmp_path):
    with _logger(tmp_path / "new", resume_step=7) as logger:
        logger.log(8, {"x": 1.0})
    assert _steps(tmp_path / "new") == [8]


def test_disabled_logger_writes_nothing(tmp_path):
    run_dir = tmp_path / "rank1"
    logger = MetricsLogger(str(run_dir), total_steps=5, enabled=False, resume_step=2)
    logger.log(1, {"x": 1.0})
    logger.log_summary({"final": 1.0})
    logger.resume(0)
    logger.close()
    assert not run_dir.exists()


def test_summary_is_written_atomically(tmp_path, monkeypatch):
    with _logger(tmp_path) as logger:
        logger.log_summary({"steps": 3, "final_val_accuracy": 0.5, "best": float("nan"), "nested": {"a": [1, 2.5]}})
        assert json.loads((tmp_path / "summary.json").read_text()) == {
            "steps": 3, "final_val_accuracy": 0.5, "best": None, "nested": {"a": [1, 2.5]}}
        calls = []
        real_replace = os.replace

        def spy(src, dst):
            calls.append((src, dst))
            assert json.loads(open(src).read())["steps"] == 4  # complete before it takes the name
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", spy)
        logger.log_summary({"steps": 4})
    assert calls and calls[0][1].endswith("summary.json") and calls[0][0] != calls[0][1]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"steps": 4}
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "summary.json"]


def test_progress_bar_postfix(tmp_path, capsys):
    logger = MetricsLogger(str(tmp_path), tensorboard=False, total_steps=4)
    logger.log(1, {"reward/mean": 0.5, "actor/entropy": 1.0, "tracker/rho": 0.9, "time/step": 2.0, "other": 3.0})
    logger.log(2, {"reward/mean": 0.625, "val/accuracy": 0.75})
    logger.log(3, {"reward/mean": 0.7})
    bar = logger._bar
    assert bar.n == 3
    postfix = bar.postfix
    assert "reward=0.700" in postfix and "val_acc=0.750" in postfix and "rho=0.900" in postfix
    assert "s/step=2.0" in postfix and "other" not in postfix
    logger.close()


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    with MetricsLogger(str(tmp_path), progress_bar=False, total_steps=3) as logger:
        logger.log(1, {"reward/mean": 0.5, "loss": float("nan")})
        logger.log(2, {"reward/mean": 0.75})
    tb_dir = tmp_path / "tensorboard"
    events = [p for p in os.listdir(tb_dir) if p.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tb_dir / events[0]) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]


def test_tensorboard_missing_warns_once(tmp_path, monkeypatch):
    import builtins

    import mssr_megatron.metrics as metrics

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    monkeypatch.setattr(metrics, "_tensorboard_warned", False)
    with pytest.warns(RuntimeWarning, match="tensorboard"):
        with MetricsLogger(str(tmp_path), progress_bar=False, total_steps=3) as logger:
            logger.log(1, {"x": 1.0})
            logger.log(2, {"x": 2.0})
    assert _steps(tmp_path) == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_step_timer():
    timer = StepTimer()
    with timer("step"):
        with timer("rollout"):
            time.sleep(0.01)
        for _ in range(2):
            with timer("update"):
                time.sleep(0.005)
    times = timer.pop()
    assert set(times) == {"time/step", "time/rollout", "time/update"}
    assert times["time/rollout"] >= 0.01 and times["time/update"] >= 0.01
    assert times["time/step"] >= times["time/rollout"] + times["time/update"]
    with pytest.raises(RuntimeError):
        with timer("reward"):
            raise RuntimeError
    times = timer.pop()  # without an explicit "step": seconds since the last pop
    assert set(times) == {"time/reward", "time/step"} and times["time/step"] >= times["time/reward"]


# ------------------------------------------------------------------------------------------------------------ plots
def _fake_run(run_dir, estimator=None, steps=30, seed=0, extra=("train", "time")):
    """A metrics.jsonl like the trainer's: reward, entropy and validation every 5 steps, plus the `extra` groups."""
    import random

    rng = random.Random(seed)
    os.makedirs(run_dir, exist_ok=True)
    if estimator is not None:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(f"algorithm:\n  estimator: {estimator}\n  shaping_alpha: 0.4\n")
    with _logger(run_dir) as logger:
        logger.log(0, {"val/accuracy": 0.3 + 0.01 * seed})
        for s in range(1, steps + 1):
            m = {"reward/mean": min(1.0, 0.3 + 0.01 * s + rng.uniform(-0.05, 0.05)),
                 "actor/entropy": 1.0 - 0.01 * s + rng.uniform(-0.02, 0.02)}
            if "train" in extra:
                m |= {"rollout/response_length": 300 + 2 * s, "adv/mean": 0.0, "adv/std": 1.0,
                      "actor/pg_clipfrac": 0.01 * rng.random(), "actor/pg_clipfrac_dual": 0.001,
                      "actor/kl_loss": 0.001 * s if s != 7 else float("nan"), "tracker/rho": 0.9,
                      "tracker/coverage": min(1.0, s / 10), "mismatch/mean_abs_diff": 0.01,
                      "mismatch/num_tokens": 1000}
            if "time" in extra:
                m |= {"time/rollout": 5 + rng.random(), "time/reward": 0.5, "time/logprobs": 1.0,
                      "time/update": 3.0, "time/weight_sync": 0.4, "time/step": 10.5}
            logger.log(s, m)
            if s % 5 == 0:
                logger.log(s, {"val/accuracy": 0.3 + 0.01 * s + 0.01 * seed})
    return str(run_dir)


def _assert_png(path):
    from PIL import Image

    assert os.path.getsize(path) > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.verify()


def test_plot_single_run(tmp_path):
    run = _fake_run(tmp_path / "mssr_run", "mssr")
    paths = plot_runs([run], str(tmp_path / "plots"), smooth=5)
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(["accuracy.png", "entropy.png", "response_length.png", "advantage_clip.png",
                            "kl_rho.png", "logprob_mismatch.png", "step_time.png"])
    for path in paths:
        _assert_png(path)


def test_plot_several_runs_and_seeds(tmp_path):
    # three seeds of one method (mean and min-max band), a shorter run, and a run without step times
    runs = [_fake_run(tmp_path / f"mssr_s{i}", "mssr", seed=i, extra=("time",)) for i in range(3)]
    runs += [_fake_run(tmp_path / "grpo", "grpo", steps=20, seed=5, extra=("time",)),
             _fake_run(tmp_path / "mvsr", "mvsr", extra=())]
    paths = plot_runs(runs, str(tmp_path / "compare"), labels=["mssr", "mssr", "mssr", "grpo", "mvsr"], smooth=3)
    assert sorted(os.path.basename(p) for p in paths) == ["accuracy.png", "entropy.png", "step_time.png"]
    for path in paths:
        _assert_png(path)


def test_default_labels(tmp_path):
    from mssr_megatron.plots import _auto_labels

    runs = [tmp_path / "mssr_s0", tmp_path / "mssr_s1", tmp_path / "grpo_s0", tmp_path / "plain"]
    for run, estimator in zip(runs, ["mssr", "mssr", "grpo", None]):
        run.mkdir()
        if estimator:
            (run / "config.yaml").write_text(f"algorithm:\n  estimator: {estimator}\n")
    # the config's estimator, told apart by the directory name where estimators collide; else the directory name
    assert _auto_labels([str(r) for r in runs]) == ["mssr (mssr_s0)", "mssr (mssr_s1)", "grpo", "plain"]


def test_plot_of_empty_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    assert plot_runs([str(empty)], str(tmp_path / "none")) == []


def test_plot_errors(tmp_path):
    run = _fake_run(tmp_path / "r", steps=3, extra=())
    with pytest.raises(ValueError, match="labels"):
        plot_runs([run], str(tmp_path / "p"), labels=["a", "b"])
    with pytest.raises(FileNotFoundError):
        plot_runs([str(tmp_path / "nope")], str(tmp_path / "p"))


def test_main_plot_cli_skips_figures_without_data(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", steps=8, extra=("time",))
    b = _fake_run(tmp_path / "b", steps=8, seed=1, extra=())
    out = tmp_path / "cli"
    assert main_plot([a, b, "--out", str(out), "--labels", "x", "x", "--smooth", "3"]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(os.path.basename(p) for p in printed) == ["accuracy.png", "entropy.png", "step_time.png"]
    assert all(p.startswith(str(out)) for p in printed)
    c = tmp_path / "c"
    with _logger(c) as logger:
        logger.log(1, {"actor/entropy": 1.0})
        logger.log(2, {"actor/entropy": 0.9})
    assert main_plot([str(c)]) == 0  # default --out: RUN_DIR/plots
    assert os.listdir(c / "plots") == ["entropy.png"]
    assert main_plot([str(tmp_path / "missing")]) == 2
