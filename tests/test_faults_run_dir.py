"""Fault injection: a run directory reused. A fresh run into a directory that holds a run is refused in one line and
changes nothing there; trainer.overwrite=true deletes the previous run's files first; checkpoints carry their run's
id, so that keep-last and resume=auto never touch another run's; a requeue with no checkpoint yet starts over once.
In-process cases on hand-made directories, then real `mssr train` processes (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from checkpoint_fakes import fake_checkpoint
from mssr_megatron.config import ConfigError, load_config
from mssr_megatron.train import run_dir as R
from mssr_megatron.train import run_checkpoint
from mssr_megatron.train.run_checkpoint import resolve_resume


def _cfg(run, *extra):
    return load_config(None, [f"trainer.output_dir={run}", *extra])


def _checkpoint(save_dir, step: int, run_id: str | None) -> str:
    """A complete checkpoint that verifies, naming run `run_id` ('legacy': from before run ids)."""
    return fake_checkpoint(save_dir, step, run_id=None if run_id == "legacy" else run_id)


def _used_run(run, run_id="aaa") -> None:
    """A run directory as a finished run leaves it: id, metrics, summary, plots, TensorBoard, two checkpoints."""
    os.makedirs(os.path.join(run, "plots"))
    os.makedirs(os.path.join(run, "tensorboard"))
    for name, text in (("RUN_ID", run_id + "\n"), ("metrics.jsonl", '{"step": 0}\n'), ("summary.json", "{}"),
                       ("config.yaml", "")):
        with open(os.path.join(run, name), "w") as f:
            f.write(text)
    for step in (2, 4):
        _checkpoint(os.path.join(run, "checkpoints"), step, run_id)


def _snapshot(root) -> dict:
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(base, name))
            out[os.path.relpath(os.path.join(base, name), root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_fresh_run_into_a_used_directory_is_refused_in_one_line(tmp_path):
    run = str(tmp_path / "run")
    _used_run(run)
    before = _snapshot(run)
    with pytest.raises(ConfigError) as err:
        R.plan_run_dir(_cfg(run))
    message = str(err.value)
    assert "\n" not in message and run in message
    assert "checkpoint.resume=auto" in message and "trainer.overwrite=true" in message
    assert "metrics.jsonl" in message and "2 checkpoint(s)" in message
    assert _snapshot(run) == before


@pytest.mark.parametrize("leftover", ["PREEMPTED", "summary.json", "hf"])
def test_any_run_file_counts_as_a_run(tmp_path, leftover):
    run = tmp_path / "run"
    os.makedirs(run)
    (run / leftover).mkdir() if leftover == "hf" else (run / leftover).write_text("{}")
    with pytest.raises(ConfigError, match=leftover):
        R.plan_run_dir(_cfg(run))


def test_config_and_id_alone_are_not_a_run(tmp_path):
    """A start that failed before training leaves only these: the next fresh start proceeds, under a new id."""
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "config.yaml").write_text("")
    (run / "RUN_ID").write_text("old\n")
    plan = R.plan_run_dir(_cfg(run))
    assert plan.remove == [] and plan.run_id not in (None, "old")


def test_overwrite_deletes_the_previous_run_and_starts_a_new_id(tmp_path):
    run, outside = str(tmp_path / "run"), str(tmp_path / "ckpt")
    _used_run(run)
    external = _checkpoint(outside, 6, "aaa")  # this run's checkpoints may live outside output_dir
    plan = R.plan_run_dir(_cfg(run, "trainer.overwrite=true", f"checkpoint.save_dir={outside}"))
    R.apply_plan(plan, run)
    assert sorted(os.listdir(run)) == ["RUN_ID", "checkpoints", "config.yaml"]  # checkpoints/ is not this save_dir
    assert not os.path.exists(external)
    assert R.read_run_id(run) == plan.run_id != "aaa"


def test_overwrite_with_resume_is_refused():
    with pytest.raises(ConfigError, match="trainer.overwrite=true .* checkpoint.resume=auto"):
        load_config(None, ["trainer.overwrite=true", "checkpoint.resume=auto"]).validate()


def test_another_runs_checkpoints_in_the_save_dir_are_refused(tmp_path):
    """A shared checkpoint.save_dir: this run's step_000004 would replace the other run's (same name)."""
    shared = str(tmp_path / "shared")
    _checkpoint(shared, 4, "other")
    for extra in ([], ["checkpoint.resume=auto"], ["trainer.overwrite=true"]):
        with pytest.raises(ConfigError, match=f"checkpoint.save_dir={shared} holds checkpoints of another run "
                                              r"\(step_000004 of run other\)"):
            R.plan_run_dir(_cfg(tmp_path / "run", f"checkpoint.save_dir={shared}", *extra))


def test_resume_auto_takes_only_this_runs_checkpoints(tmp_path):
    save = str(tmp_path / "ckpt")
    _checkpoint(save, 2, "mine")
    _checkpoint(save, 4, "mine")
    _checkpoint(save, 6, "theirs")  # newer, of another run
    cfg = _cfg(tmp_path / "run", f"checkpoint.save_dir={save}", "checkpoint.resume=auto")
    assert resolve_resume(cfg, "mine") == os.path.join(save, "step_000004")
    assert [s for s, _ in R.owned_checkpoints(save, "mine")] == [2, 4]  # what keep-last may delete
    assert resolve_resume(cfg, "nobody") is None


def test_resume_auto_continues_its_run(tmp_path):
    run = str(tmp_path / "run")
    _used_run(run)
    before = _snapshot(run)
    plan = R.plan_run_dir(_cfg(run, "checkpoint.resume=auto"))
    assert (plan.run_id, plan.remove) == ("aaa", [])
    R.apply_plan(plan, run)
    assert _snapshot(run) == before


def test_requeue_without_a_checkpoint_starts_over_once(tmp_path):
    """Preempted (or crashed) before its first save: the requeued run (resume=auto) keeps its id and drops what its
    earlier attempt logged, so that step 0 is not logged twice."""
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "RUN_ID").write_text("aaa\n")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "PREEMPTED").write_text('{"step": 0, "signal": "SIGTERM"}')
    plan = R.plan_run_dir(_cfg(run, "checkpoint.resume=auto"))
    R.apply_plan(plan, str(run))
    assert plan.run_id == "aaa" and sorted(os.listdir(run)) == ["RUN_ID"]


def test_directory_from_before_run_ids_keeps_running(tmp_path):
    """No RUN_ID, checkpoints without a run id (written before run ids): resume=auto continues them as one run."""
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    for step in (2, 4):
        _checkpoint(str(run / "checkpoints"), step, "legacy")
    cfg = _cfg(run, "checkpoint.resume=auto")
    plan = R.plan_run_dir(cfg)
    assert (plan.run_id, plan.remove) == (None, [])
    assert resolve_resume(cfg, plan.run_id) == str(run / "checkpoints" / "step_000004")


# ------------------------------------------------------------------------------------------- real processes (slow)
def _train(assets, run, *extra, timeout=600):
    from trainer_assets import overrides

    args = overrides(assets, str(run), *extra)
    return subprocess.run([sys.executable, "-m", "mssr_megatron.cli", "train", "examples/configs/tiny_cpu.yaml", *args],
                          capture_output=True, text=True, timeout=timeout)


def _logged_steps(run) -> list[int]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.mark.slow
def test_used_directory_end_to_end(tmp_path):
    """mssr train into a directory holding a finished run (steps 0..4, its step-4 checkpoint): refused in seconds
    (exit 2, one line, nothing there changed); then with overwrite=true: one clean run (steps 0..2 once each, its
    checkpoint named by the new id, the old run's checkpoint gone, a summary of this run only)."""
    from trainer_assets import build_assets

    assets = build_assets(str(tmp_path / "assets"))
    run = tmp_path / "run"
    _used_run(str(run), run_id="old")
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}}}\n' for s in range(5)))
    before = _snapshot(run)

    started = time.time()
    refused = _train(assets, run)
    problems = [line for line in refused.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert problems == [f"mssr train: error: trainer.output_dir={run} holds a run (metrics.jsonl, summary.json, "
                        f"plots, tensorboard, 2 checkpoint(s) in {run}/checkpoints): continue it with "
                        "checkpoint.resume=auto, or start over with trainer.overwrite=true (deletes them)"]
    assert _snapshot(run) == before
    assert time.time() - started < 60  # before any model or data is loaded

    again = _train(assets, run, "trainer.overwrite=true")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "trainer.overwrite=true: deleted the previous run's" in again.stderr
    assert _logged_steps(run) == [0, 1, 2]
    new_id = R.read_run_id(str(run))
    assert new_id not in (None, "old")
    assert [(s, R.checkpoint_run_id(p)) for s, p in run_checkpoint.complete_checkpoints(str(run / "checkpoints"))] \
        == [(2, new_id)]
    with open(run / "summary.json") as f:
        assert json.load(f)["steps"] == 2
