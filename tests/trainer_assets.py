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
