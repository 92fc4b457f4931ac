"""A tiny model directory and synthetic data for end-to-end trainer tests, plus a base config pointing at them."""

from __future__ import annotations

import os


def build_assets(root: str) -> dict:
    """Random tiny Qwen2.5-VL (no warm start: tests check plumbing, not learning) and 24/16 synthetic prompts."""
    from mssr_megatron.data.synthetic import generate_dataset
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir

    model = build_tiny_model_dir(os.path.join(root, "model"), seed=0, num_layers=4)  # 4 layers: PP=2 divides them
    train, val = generate_dataset(os.path.join(root, "data"), 24, 16, seed=0)
    return {"model": model, "train": train, "val": val}


def overrides(assets: dict, run_dir: str, *extra: str) -> list[str]:
    """Config overrides for a few fast steps on the assets (8 prompts x 1 rollout, 4 validation prompts)."""
    return [
        f"model.hf_path={assets['model']}", f"data.train_path={assets['train']}", f"data.val_path={assets['val']}",
        f"trainer.output_dir={run_dir}", "trainer.total_steps=2", "trainer.val_every=2", "data.val_size=4",
        "data.prompts_per_step=8", "optimizer.mini_batch_size=4", "parallel.micro_batch_size=2",
        "rollout.max_new_tokens=6", "logging.progress_bar=false", "checkpoint.save_every=0",
        "checkpoint.export_hf_at_end=false", "data.reward_workers=0", *extra,
    ]


# --------------------------------------------------------------------------- preemption and resume (two test files)
VOLATILE = ("time", "time/", "sync/seconds", "sync/gb_per_s")  # wall-clock figures differ between any two runs


def logged_metrics(run_dir) -> dict[int, dict]:
    """metrics.jsonl of a run by step, without the wall-clock figures."""
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows}


def wait_until_logged(run_dir, step: int, timeout_s: float, poll_s: float) -> None:
    """Return once `step` is in the run's metrics.jsonl (the run is then inside step + 1)."""
    import json
    import time

    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if os.path.exists(path) and any(json.loads(line)["step"] == step for line in open(path).read().splitlines()):
            return
        time.sleep(poll_s)
    raise AssertionError(f"step {step} was not logged in {run_dir} within {timeout_s} s")


def saved_step(run_dir, total_steps: int) -> int:
    """The step of the newest checkpoint a signalled run left (complete ones only, before the last step)."""
    saved = sorted(p for p in os.listdir(os.path.join(run_dir, "checkpoints")))
    assert saved and all(not name.endswith(".tmp") for name in saved), saved
    cut_at = int(saved[-1].split("_")[1])
    assert 1 <= cut_at < total_steps
    return cut_at


def assert_resumed_as_uninterrupted(full_dir, cut_dir, cut_at: int, total_steps: int) -> None:
    """The resumed run logged every step once and, after the cut, exactly the uninterrupted run's metrics."""
    full, resumed = logged_metrics(full_dir), logged_metrics(cut_dir)
    assert sorted(resumed) == sorted(full)  # no duplicated or missing steps after the resume
    for step in range(cut_at + 1, total_steps + 1):
        assert resumed[step] == full[step], step
