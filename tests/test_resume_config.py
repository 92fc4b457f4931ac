"""Resume with a changed config (resume_config.check_resume_config): every whitelisted group applies and is logged in
one line per change, the learning-rate schedule is applied explicitly, any other change is refused in one line naming
every key with old -> new and the fix, and a checkpoint without a stored config is accepted with a warning."""

from __future__ import annotations

import logging

import pytest
import torch

from mssr_megatron.config import ConfigError, RunConfig, load_config, to_dict
from mssr_megatron.train.resume_config import RESUMABLE, SCHEDULE, check_resume_config

BASE = ["trainer.total_steps=10", "optimizer.lr=2e-4", "checkpoint.save_every=5"]


def _checkpoint(tmp_path, cfg: RunConfig | None, drop: str | None = None) -> str:
    """A checkpoint directory whose trainer_state.pt stores `cfg` (None: none stored, as older versions wrote);
    `drop`: a dotted key left out of the stored config (a setting that older code did not have)."""
    state = {"step": 5}
    if cfg is not None:
        state["config"] = to_dict(cfg)
        if drop:
            section, key = drop.split(".")
            del state["config"][section][key]
    torch.save(state, tmp_path / "trainer_state.pt")
    return str(tmp_path)


# one changed setting per whitelisted group, with the value the new config gives it
GROUP_CHANGES = {
    "loop": ("trainer.total_steps", 20),
    "checkpoints": ("checkpoint.keep_last", 7),
    "logging": ("logging.tensorboard", False),
    "alarms": ("trainer.max_logprob_mismatch", 0.5),
    "reward workers": ("data.reward_workers", 8),
    "device and collectives": ("parallel.timeout_minutes", 5.0),
    "memory": ("parallel.micro_batch_size", 2),
    "rollout engines": ("rollout.mem_fraction", 0.4),
    "gradient clipping": ("optimizer.grad_clip", 1.0),
    "benchmark evaluation": ("eval.max_new_tokens", 64),
}


def test_every_whitelisted_group_has_a_case():
    assert set(GROUP_CHANGES) == set(RESUMABLE)


@pytest.mark.parametrize("group", sorted(GROUP_CHANGES))
def test_a_whitelisted_change_is_applied_and_logged_in_one_line(tmp_path, caplog, group):
    key, value = GROUP_CHANGES[group]
    old = load_config(None, BASE)
    path = _checkpoint(tmp_path, old)
    with caplog.at_level(logging.INFO, logger="mssr"):
        applied = check_resume_config(load_config(None, [*BASE, f"{key}={value}"]), path)
    section, name = key.split(".")
    before = getattr(getattr(old, section), name)
    assert applied == [f"resume: {key} {before!r} -> {value!r} ({group}: {RESUMABLE[group][1]})"]
    assert [r.getMessage() for r in caplog.records] == applied


@pytest.mark.parametrize("key,value", [("optimizer.lr", 1e-3), ("optimizer.min_lr", 1e-5),
                                       ("optimizer.warmup_steps", 3), ("optimizer.lr_schedule", "linear"),
                                       ("optimizer.lr_decay_steps", 40), ("optimizer.weight_decay", 0.1)])
def test_a_schedule_change_is_applied_explicitly(tmp_path, key, value):
    path = _checkpoint(tmp_path, load_config(None, BASE))
    applied = check_resume_config(load_config(None, [*BASE, f"{key}={value}"]), path)
    assert key in SCHEDULE
    assert applied[0].startswith(f"resume: {key} ")
    assert "applied: the learning-rate schedule of this config" in applied[0]


def test_a_longer_run_with_a_decaying_schedule_logs_the_new_decay_length(tmp_path):
    """No optimizer.lr_decay_steps: the decay spans the whole run, so trainer.total_steps moves it. Default batch:
    2048 prompts x 1 rollout / 128 per mini-batch = 16 optimizer steps per RL step."""
    cosine = [*BASE, "optimizer.lr_schedule=cosine"]
    path = _checkpoint(tmp_path, load_config(None, cosine))
    applied = check_resume_config(load_config(None, [*cosine, "trainer.total_steps=20"]), path)
    assert applied[-1] == "resume: the learning rate now decays over 320 optimizer steps (was 160)"


def test_refused_changes_are_named_in_one_line_with_old_and_new_values_and_the_fix(tmp_path):
    path = _checkpoint(tmp_path, load_config(None, BASE))
    new = load_config(None, [*BASE, "algorithm.estimator=grpo", "rollout.n=4", "data.seed=3",
                             "trainer.total_steps=20", "optimizer.lr=1e-3"])
    with pytest.raises(ConfigError) as info:
        check_resume_config(new, path)
    message = str(info.value)
    assert "\n" not in message
    assert message == (f"resuming {path}: these settings cannot change on resume: rollout.n 1 -> 4, "
                       "algorithm.estimator 'mssr' -> 'grpo', data.seed 0 -> 3; set them back to the checkpoint's "
                       "values, or start a new run (a new trainer.output_dir, without checkpoint.resume)")


@pytest.mark.parametrize("key,value", [("model.params_dtype", "float32"), ("data.train_path", "other.jsonl"),
                                       ("trainer.seed", 1), ("parallel.tensor_model_parallel_size", 2),
                                       ("parallel.use_distributed_optimizer", True), ("optimizer.adam_beta2", 0.99),
                                       ("optimizer.mini_batch_size", 64), ("algorithm.baseline.rho_min", 0.9),
                                       ("rollout.temperature", 0.7)])
def test_settings_outside_the_whitelist_are_refused(tmp_path, key, value):
    path = _checkpoint(tmp_path, load_config(None, BASE))
    with pytest.raises(ConfigError, match=f"cannot change on resume: {key} "):
        check_resume_config(load_config(None, [*BASE, f"{key}={value}"]), path)


def test_an_unchanged_config_and_a_fresh_run_change_nothing(tmp_path):
    cfg = load_config(None, BASE)
    assert check_resume_config(cfg, _checkpoint(tmp_path, cfg)) == []
    assert check_resume_config(cfg, None) == []


def test_a_checkpoint_without_a_stored_config_is_accepted_with_one_warning(tmp_path, caplog):
    path = _checkpoint(tmp_path, None)
    with caplog.at_level(logging.INFO, logger="mssr"):
        assert check_resume_config(load_config(None, [*BASE, "algorithm.estimator=mvsr"]), path) == []
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, f"checkpoint {path} stores no config (written by an older version): the settings were not "
                          "compared with the run that wrote it; this config applies as given")]


def test_a_setting_unknown_to_the_stored_config_is_listed_not_refused(tmp_path):
    path = _checkpoint(tmp_path, load_config(None, BASE), drop="data.reward_timeout_s")
    applied = check_resume_config(load_config(None, BASE), path)
    assert applied == ["resume: settings not in both configs, not compared: data.reward_timeout_s"]
