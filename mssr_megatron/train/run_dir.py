"""Which run a run directory holds, decided before anything in it is written.

A run is identified by a random id kept in `<output_dir>/RUN_ID` and written into the COMPLETE marker of each of its
checkpoints, so that `checkpoint.save_dir` (which may lie outside output_dir) tells this run's checkpoints from any
other's: keep-last cleanup deletes only this run's, and `checkpoint.resume: auto` resumes only this run's.

What a start does with the directory (`plan_run_dir` on every rank, read-only, first thing in build_context, so that
a refusal comes in seconds; `apply_on_rank0` once the process groups exist):
- fresh run (checkpoint.resume null) into a directory that holds a run (metrics, summary, PREEMPTED, plots,
  TensorBoard, HF export, or checkpoints of its run): refused in one line naming both fixes, unless
  `trainer.overwrite: true`, which deletes that run's files and checkpoints first (logged) and starts a new run id;
- `resume: auto` with a checkpoint of this run: continues it (same id), nothing deleted;
- `resume: auto` without one (a requeue after a preemption or a crash before the first save): the run starts over
  from step 0 under its id, and what its earlier attempt logged is deleted (logged), so no step is logged twice;
- an explicit checkpoint path: continues into this directory (its id, or a new one for an empty directory);
- any start with checkpoints of another run in checkpoint.save_dir: refused (the step names would collide: this
  run's step_000010 would replace the other run's).
A directory from before run ids (no RUN_ID, checkpoints without one) keeps running as one: its id is None.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field

from mssr_megatron.config import ConfigError

log = logging.getLogger("mssr")
RUN_ID_FILE = "RUN_ID"
RUN_FILES = ("metrics.jsonl", "summary.json", "PREEMPTED", "plots", "tensorboard", "hf")
"""What a run leaves in its output_dir besides config.yaml and RUN_ID (both rewritten by every start)."""


def read_run_id(run_dir: str) -> str | None:
    """The id in <run_dir>/RUN_ID, or None (no run started here, or one from before run ids)."""
    path = os.path.join(run_dir, RUN_ID_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def checkpoint_run_id(path: str) -> str | None:
    """The run id a checkpoint's COMPLETE marker names (None: written before run ids, or unreadable)."""
    try:
        with open(os.path.join(path, "COMPLETE"), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker.get("run_id") if isinstance(marker, dict) else None


def owned_checkpoints(save_dir: str, run_id: str | None) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints of run `run_id` in save_dir, oldest first."""
    from mssr_megatron.train.run_checkpoint import complete_checkpoints

    return [(step, path) for step, path in complete_checkpoints(save_dir) if checkpoint_run_id(path) == run_id]


@dataclass
class RunDirPlan:
    run_id: str | None
    """The id this start runs under (None: a directory from before run ids)."""
    remove: list[str] = field(default_factory=list)
    """Files and checkpoints of the previous run (or attempt) to delete before the start."""
    why: str = ""
    """The log line's start: why they are deleted."""


def plan_run_dir(cfg) -> RunDirPlan:
    """What this start does with trainer.output_dir and checkpoint.save_dir (module docstring); raises ConfigError,
    one line, when it must not start. Reads only."""
    run_dir, save_dir, resume = cfg.trainer.output_dir, cfg.checkpoint_dir, cfg.checkpoint.resume
    previous = read_run_id(run_dir)
    files = [os.path.join(run_dir, name) for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    from mssr_megatron.train.run_checkpoint import complete_checkpoints

    checkpoints = complete_checkpoints(save_dir)
    own = [path for _, path in checkpoints if checkpoint_run_id(path) == previous]
    foreign = [path for _, path in checkpoints if checkpoint_run_id(path) != previous]
    if not resume and (files or own) and not cfg.trainer.overwrite:
        names = [os.path.basename(p) for p in files] + ([f"{len(own)} checkpoint(s) in {save_dir}"] if own else [])
        raise ConfigError(f"trainer.output_dir={run_dir} holds a run ({', '.join(names)}): continue it with "
                          "checkpoint.resume=auto, or start over with trainer.overwrite=true (deletes them)")
    if foreign:
        raise ConfigError(f"checkpoint.save_dir={save_dir} holds checkpoints of another run "
                          f"({os.path.basename(foreign[-1])} of run {checkpoint_run_id(foreign[-1])}): this run's "
                          "would replace them; give it a checkpoint.save_dir of its own")
    if not resume:
        return RunDirPlan(uuid.uuid4().hex, files + own, "trainer.overwrite=true: deleted the previous run's")
    if resume == "auto" and not own:
        return RunDirPlan(previous or uuid.uuid4().hex, files,
                          f"checkpoint.resume=auto: no checkpoint of this run in {save_dir}, so it starts over from "
                          "step 0; deleted its earlier attempt's")
    # an explicit checkpoint path: continues this directory's run (a new one in an empty directory)
    return RunDirPlan(previous if previous is not None or files or own else uuid.uuid4().hex)


def apply_plan(plan: RunDirPlan, run_dir: str) -> None:
    """Delete what the plan names (logged), then record the run id (rank 0, before anything else is written)."""
    if plan.remove:
        for path in plan.remove:
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        log.warning("%s %s", plan.why, ", ".join(plan.remove))
    os.makedirs(run_dir, exist_ok=True)
    if plan.run_id is not None and read_run_id(run_dir) != plan.run_id:
        with open(os.path.join(run_dir, RUN_ID_FILE), "w", encoding="utf-8") as f:
            f.write(plan.run_id + "\n")


def apply_on_rank0(plan: RunDirPlan, cfg) -> str | None:
    """Apply rank 0's plan there (after the process groups exist); every rank gets the run id, or raises the same
    one-line error. Every rank planned before (read-only, before the rendezvous, so before rank 0 changed anything);
    rank 0's plan holds the id."""
    import torch.distributed as dist

    from mssr_megatron.train.run_context import broadcast_object

    verdict = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            apply_plan(plan, cfg.trainer.output_dir)
            verdict = ("ok", plan.run_id)
        except OSError as exc:  # one line on every rank, not a hang of the others in the broadcast
            verdict = ("failed", f"preparing trainer.output_dir={cfg.trainer.output_dir}: {exc}")
    kind, value = broadcast_object(verdict)
    if kind == "failed":
        raise ConfigError(value)
    return value
