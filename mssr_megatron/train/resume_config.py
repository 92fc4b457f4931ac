"""What a resumed run may change from the run that wrote its checkpoint.

Every checkpoint's trainer_state.pt holds the resolved config of the run that wrote it (`config`, a plain dict:
config.to_dict). On resume, `check_resume_config` compares it with the new config, key by key, BEFORE the new config
is written to <output_dir>/config.yaml and before any model is built:
- keys in RESUMABLE (grouped, one reason per group) change freely: each change is logged in one line;
- keys in SCHEDULE (the learning-rate and weight-decay schedule) are applied explicitly: the actor's scheduler keeps
  only the checkpoint's step count and recomputes the rates from the new config (MegatronActor.load_scheduler_state);
  each change is logged, and so is a new decay length when trainer.total_steps moves it;
- any other change (estimator, algorithm, model, data, seeds, sampling, batch sizes, Adam's betas...) is refused in
  one ConfigError naming every changed key with old -> new, and the fix.
A checkpoint without a stored config (written before this check existed) is accepted with a one-line warning.
"""

from __future__ import annotations

import logging
import os

from mssr_megatron.config import ConfigError, RunConfig, to_dict

log = logging.getLogger("mssr")

RESUMABLE: dict[str, tuple[tuple[str, ...], str]] = {
    # group: (keys, or prefixes ending in '.'; why they may change on resume)
    "loop": (("trainer.total_steps", "trainer.val_every", "trainer.val_before_train", "trainer.output_dir"),
             "when the loop stops and validates, and where it writes: no saved state depends on it"),
    "checkpoints": (("checkpoint.",),
                    "when and where checkpoints and the export are written, and which checkpoint is read"),
    "logging": (("logging.",), "what is logged and how"),
    "alarms": (("trainer.max_nonfinite_steps", "trainer.max_logprob_mismatch", "trainer.on_logprob_mismatch"),
               "stopping rules read at each step: no saved state depends on them"),
    "reward workers": (("data.reward_workers", "data.reward_timeout_s"),
                       "processes and time granted to the answer checks, not what they check"),
    "device and collectives": (("trainer.device", "parallel.backend", "parallel.timeout_minutes"),
                               "where the same tensors live and how long a collective may wait"),
    "memory": (("parallel.micro_batch_size", "parallel.sequence_parallel", "model.logprob_chunk_tokens",
                "parallel.max_tokens_per_microbatch",
                "model.recompute_granularity", "model.recompute_method", "model.recompute_num_layers",
                "model.vision_balance"),
               "how the same mini-batch is split, chunked or recomputed: memory and speed, not the update"),
    "rollout engines": (("rollout.engine", "rollout.engine_tp_size", "rollout.engines", "rollout.colocate",
                         "rollout.mem_fraction", "rollout.weight_bucket_mb", "rollout.hf_batch_size"),
                        "where and how engines serve the policy, whose weights come from the trainer at every sync"),
    "gradient clipping": (("optimizer.grad_clip",), "read by the optimizer at each step, not part of its state"),
    "benchmark evaluation": (("trainer.eval_every", "eval."),
                             "what the policy is measured on and when; the evaluation changes no training state"),
}
"""Settings that may change on resume. Not here, so refused: the parallel layout (TP, PP, the distributed optimizer:
the checkpoint's optimizer shards are 'dp_reshardable', run_checkpoint.DISTRIBUTED_OPTIMIZER_FORMAT, and its RNG
streams are per rank; the data-parallel size is the world size, no setting, and may change); Adam's betas and eps
(the optimizer's checkpoint restores its param groups, so a change would be silently ignored); everything that
defines the task or the algorithm."""

SCHEDULE = ("optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps", "optimizer.lr_schedule",
            "optimizer.lr_decay_steps", "optimizer.weight_decay")
"""The learning-rate and weight-decay schedule: applied explicitly on resume (the checkpoint gives the step count)."""


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}: every setting under its dotted key (lists are values)."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resumable_group(key: str) -> str | None:
    """The RESUMABLE group of a dotted key, or None."""
    for group, (keys, _) in RESUMABLE.items():
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys):
            return group
    return None


def stored_config(checkpoint_path: str) -> dict | None:
    """The resolved config saved with a checkpoint (trainer_state.pt), None for a checkpoint written without one."""
    import torch

    state = torch.load(os.path.join(checkpoint_path, "trainer_state.pt"), map_location="cpu", weights_only=False)
    return state.get("config")


def _decay_steps(settings: dict, optimizer_steps_per_step: int) -> int:
    """The decay length the actor gives the scheduler for these (flattened) settings."""
    from mssr_megatron.train.actor import lr_decay_steps

    return lr_decay_steps(settings.get("optimizer.lr_decay_steps"), settings.get("optimizer.warmup_steps", 0),
                          settings.get("trainer.total_steps", 0) * optimizer_steps_per_step)


def check_resume_config(cfg: RunConfig, checkpoint_path: str | None) -> list[str]:
    """Compare cfg with the config stored in the checkpoint to be resumed; log and return one line per change that
    applies; raise ConfigError naming every change that may not. Nothing to do for a fresh run (None)."""
    if checkpoint_path is None:
        return []
    stored = stored_config(checkpoint_path)
    if stored is None:
        log.warning("checkpoint %s stores no config (written by an older version): the settings were not compared "
                    "with the run that wrote it; this config applies as given", checkpoint_path)
        return []
    old, new = flatten(stored), flatten(to_dict(cfg))
    changed = [key for key in new if key in old and old[key] != new[key]]
    refused = [key for key in changed if key not in SCHEDULE and resumable_group(key) is None]
    if refused:
        listing = ", ".join(f"{key} {old[key]!r} -> {new[key]!r}" for key in refused)
        raise ConfigError(f"resuming {checkpoint_path}: these settings cannot change on resume: {listing}; set them "
                          "back to the checkpoint's values, or start a new run (a new trainer.output_dir, without "
                          "checkpoint.resume)")
    applied = []
    for key in changed:
        group = resumable_group(key)
        why = (f"{group}: {RESUMABLE[group][1]}" if group else
               "applied: the learning-rate schedule of this config replaces the checkpoint's from its step count")
        applied.append(f"resume: {key} {old[key]!r} -> {new[key]!r} ({why})")
    if new["optimizer.lr_schedule"] != "constant":
        before = _decay_steps(old, cfg.optimizer_steps_per_step)  # the batch arithmetic cannot change (refused)
        after = _decay_steps(new, cfg.optimizer_steps_per_step)
        if before != after:
            applied.append(f"resume: the learning rate now decays over {after} optimizer steps (was {before})")
    unknown = sorted(set(new) ^ set(old))
    if unknown:  # a setting added or removed by another version of this code: nothing to compare it with
        applied.append(f"resume: settings not in both configs, not compared: {', '.join(unknown)}")
    for line in applied:
        log.info("%s", line)
    return applied
