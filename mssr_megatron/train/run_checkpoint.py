"""Run checkpoints: everything a resumed run needs, written atomically, the last N kept.

    <save_dir>/step_000010/
        model/            megatron distributed checkpoint: model + optimizer (resharding-capable; with the distributed
                          optimizer only the data-parallel size may change on resume, see DISTRIBUTED_OPTIMIZER_FORMAT)
        trainer_state.pt  step, LR schedule, Beta tracker + forgetting rule (the same on every rank: checked),
                          sampler position (rank 0), the run's resolved config (resume_config compares it on resume)
        rng/rank_<r>.pt   every RNG stream of rank r (torch, megatron's model-parallel tracker, python, numpy)
        MANIFEST.json     size and CRC-32 of every file above (checkpoint_files.py), hashed by all ranks
        COMPLETE          written last: a directory without it is not a checkpoint; names the run (run_dir.py)
A checkpoint is first written to `step_000010.tmp` and renamed when complete, so a crash or a preemption mid-write
leaves the previous checkpoint intact; a failed write (a full disk) removes the `.tmp` and stops in one line.
`checkpoint.resume: auto` continues from the newest complete checkpoint that verifies against its manifest.
No checkpoint or export is written from non-finite weights or optimizer state, and a loaded one is checked
(finite_check).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from mssr_megatron.config import to_dict
from mssr_megatron.train import checkpoint_files, finite_check
from mssr_megatron.train.actor import use_fused_torch_adam
from mssr_megatron.train.run_dir import owned_checkpoints

log = logging.getLogger("mssr")
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def complete_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in save_dir, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = _STEP_DIR.match(name)
        path = os.path.join(save_dir, name)
        if match and os.path.exists(os.path.join(path, "COMPLETE")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


DISTRIBUTED_OPTIMIZER_FORMAT = "dp_reshardable"
"""How megatron's DistributedOptimizer writes its sharded state (Megatron-LM's default): each rank writes its own
shard of the flat buffers, in parallel, without gathering; a resume may change the data-parallel size but not TP/PP.
('fully_reshardable' would gather every buffer on data-parallel rank 0 to allow any layout.)"""


def _sharded_state(actor, loading: bool = False):
    """Model and optimizer as megatron sharded tensors. When loading, the optimizer first creates its (Adam) state
    so that the checkpoint has somewhere to go."""
    model_state = actor.module.sharded_state_dict()
    metadata = ({"distrib_optim_sharding_type": DISTRIBUTED_OPTIMIZER_FORMAT} if actor.use_distributed_optimizer
                else None)
    return {"model": model_state,
            "optimizer": actor.optimizer.sharded_state_dict(model_state, is_loading=loading, metadata=metadata)}


def save_model_and_optimizer(actor, directory: str) -> None:
    """Write the actor's model and optimizer (every rank calls this) as a megatron distributed checkpoint."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded_state(actor), directory)


def _allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer its Adam state before a load. Its sharded_state_dict() reads the step count
    from the inner torch Adam's state, which torch creates at the first step: without Transformer Engine's or apex's
    fused Adam (CPU; GPU nodes without them) a resume before any step fails there (`assert len(steps) == 1`).
    megatron's own remedy in its FSDP load path, `_init_optimizer_states_with_dummy_values` (one step with zero
    gradients), creates the state; the checkpoint then overwrites it, and the model weights are loaded after it.
    With fused Adam (TE/apex) megatron reads the step from the param groups and nothing is done here."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def load_model_and_optimizer(actor, directory: str) -> None:
    """Restore what save_model_and_optimizer wrote into the actor's model and optimizer (every rank calls this).
    Tested on CPU (torch's Adam). With Transformer Engine's fused Adam (GPU) the two Adam-state fixes below do nothing
    and megatron's own load runs: GPU-only: not run (no GPU was available)."""
    from megatron.core import dist_checkpointing

    _allocate_distributed_optimizer_state(actor.optimizer)
    state = dist_checkpointing.load(_sharded_state(actor, loading=True), directory)
    actor.module.load_state_dict(state["model"])
    # no_grad: with float32 weights the distributed optimizer's main-parameter shards are views of the parameters,
    # which its load copies into in place (autograd refuses that on a view of a leaf that requires grad)
    with torch.no_grad():
        actor.optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(actor.optimizer)
    use_fused_torch_adam(actor.optimizer)  # the loaded param groups carry the checkpoint's kernel choice
    finite_check.check_loaded(actor, os.path.dirname(os.path.abspath(directory)))


def _restore_adam_steps(optimizer) -> None:
    """Set every parameter's Adam step counter to the checkpoint's after a DistributedOptimizer load, one tensor per
    parameter. Without Transformer Engine's or apex's fused Adam (torch's Adam keeps a step tensor per parameter),
    megatron-core 0.16.1's load gets two things wrong: DistributedOptimizer.load_state_dict puts ONE step tensor into
    every parameter's state (torch's Adam increments each counter in place, so a shared one advances once per
    parameter per step), and the 'dp_reshardable' parameter state then copies into it the step of the optimizer that
    received the load (a LocalNonpersistentObject: the fresh optimizer's, not the checkpoint's). The checkpoint's step
    is in the loaded param groups (megatron saves it there for this case). Nothing to do with fused Adam."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(inner, DistributedOptimizer):
            continue
        for group in inner.optimizer.param_groups:
            for param in group["params"]:
                param_state = inner.optimizer.state.get(param, {})
                if "step" in group and isinstance(param_state.get("step"), torch.Tensor):
                    param_state["step"] = torch.tensor(float(group["step"]), dtype=param_state["step"].dtype,
                                                       device=param_state["step"].device)


def check_algorithm_state_agrees(algo, step: int) -> None:
    """Raise, on every rank, when the algorithm state (Beta tracker, forgetting rule) differs between ranks: only
    rank 0's is saved, so a diverged state would silently become every rank's on resume. One all_gather of a digest
    (on NCCL through the current CUDA device: GPU-only: not run (no GPU was available))."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, algo.state_digest())
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, digest in enumerate(digests):
            groups.setdefault(digest, []).append(rank)
        listing = "; ".join(f"ranks {ranks}: {digest[:12]}" for digest, ranks in groups.items())
        raise RuntimeError(f"step {step}: the algorithm state (tracker, forgetting rule) differs between ranks "
                           f"({listing}); not saving a checkpoint that would resume every rank from rank 0's state. "
                           "Every input of the tracker must be a global-batch statistic (algorithms/pipeline.py)")


def save(ctx) -> str:
    """Write a checkpoint of the current step (every rank calls this); returns its path. Any failure (a full disk
    above all) raises CheckpointError on every rank, in one line naming the directory and its free space, after the
    partial step_N.tmp is removed; the previous checkpoints are untouched."""
    check_algorithm_state_agrees(ctx.algo, ctx.step)
    finite_check.require_finite(ctx.actor, f"the checkpoint of step {ctx.step}")
    save_dir = ctx.cfg.checkpoint_dir
    final = os.path.join(save_dir, f"step_{ctx.step:06d}")
    tmp = final + ".tmp"
    try:
        _write_checkpoint(ctx, tmp)
        checkpoint_files.write_manifest(tmp)
        checkpoint_files.call_on_every_rank(lambda: _publish(tmp, final, ctx.step, ctx.run_id), f"completing {final}")
    except checkpoint_files.FAILURES as exc:
        _abandon(tmp, save_dir, ctx.step, exc)
    if _rank() == 0:
        # after the rename: a crash before it leaves every older checkpoint in place
        keep = ctx.cfg.checkpoint.keep_last
        for _, old in owned_checkpoints(save_dir, ctx.run_id)[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
    _barrier()
    return final


def _write_checkpoint(ctx, tmp: str) -> None:
    """Model, optimizer, RNG and trainer state into `tmp`. Every phase reports its failure on every rank (megatron's
    own writer reports a failed shard write on every rank itself)."""
    def make_dirs() -> None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, "model"))
            os.makedirs(os.path.join(tmp, "rng"))

    checkpoint_files.call_on_every_rank(make_dirs, f"creating {tmp}")
    save_model_and_optimizer(ctx.actor, os.path.join(tmp, "model"))

    def write_states() -> None:
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{_rank()}.pt"))
        if _rank() == 0:
            _write_conversion_metadata(ctx, os.path.join(tmp, "model"))
            torch.save({"step": ctx.step, "scheduler": ctx.actor.scheduler.state_dict(),
                        "algorithm": ctx.algo.state_dict(), "sampler": ctx.sampler.state_dict(),
                        "world_size": dist.get_world_size(), "config": to_dict(ctx.cfg)},
                       os.path.join(tmp, "trainer_state.pt"))

    checkpoint_files.call_on_every_rank(write_states, f"writing the trainer and RNG states into {tmp}")


def _publish(tmp: str, final: str, step: int, run_id: str | None) -> None:
    """Rank 0: COMPLETE (written after the manifest), then the rename that makes the checkpoint visible."""
    if _rank() != 0:
        return
    with open(os.path.join(tmp, checkpoint_files.COMPLETE), "w") as f:
        json.dump({"step": step, "time": time.time(), "run_id": run_id}, f)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _abandon(tmp: str, save_dir: str, step: int, exc: BaseException) -> None:
    """After a failed save: remove the partial directory and raise the one-line CheckpointError (every rank)."""
    space = checkpoint_files.free_space(save_dir)  # before the removal: what the write ran into
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    full = checkpoint_files.is_disk_full(exc)
    newest = complete_checkpoints(save_dir)
    previous = f"the newest checkpoint is still {newest[-1][1]}" if newest else "no earlier checkpoint exists"
    raise checkpoint_files.CheckpointError(
        f"saving the checkpoint of step {step} failed: "
        f"{'no space left on device' if full else checkpoint_files.one_line(exc)} (in {save_dir}: {space}); the "
        f"partial {tmp} was removed and {previous}"
        + ("; free space there or set checkpoint.save_dir to a larger disk" if full else "")) from exc


def _write_conversion_metadata(ctx, model_dir: str) -> None:
    """So that `mssr convert --to hf --input <save_dir>/step_N` exports this checkpoint (the model part); records the
    layer implementation and FP8 settings the run's model was built with."""
    from megatron.core import parallel_state as ps

    from mssr_megatron.checkpoint.metadata import layer_metadata, write_metadata

    dims, text = ctx.actor.dims, ctx.hf_config.text_config
    write_metadata(model_dir, ctx.cfg.model.hf_path, tp=ps.get_tensor_model_parallel_world_size(),
                   pp=ps.get_pipeline_model_parallel_world_size(), dtype=ctx.cfg.model.params_dtype,
                   vocab_size=dims.vocab_size, padded_vocab_size=dims.padded_vocab_size,
                   num_layers=text.num_hidden_layers, tie_word_embeddings=bool(ctx.hf_config.tie_word_embeddings),
                   state_key="model", **layer_metadata(ctx.cfg.model))


def resolve_resume(cfg, run_id: str | None) -> str | None:
    """The checkpoint to resume from, VERIFIED (checkpoint_files.verify): None (a fresh run), the newest complete
    checkpoint of run `run_id` that verifies ('auto'; one warning line per newer one rejected), or the given path.
    COLLECTIVE once torch.distributed is initialised (the files are hashed by every rank): call it once, on every
    rank, before any model is built (build_context), and pass the answer on (RunContext.resume_path).
    Raises CheckpointError in one line: an explicit path that fails verification (naming the file), or 'auto' when
    checkpoints exist but none verifies (a fresh start would silently throw the run away)."""
    resume = cfg.checkpoint.resume
    if not resume:
        return None
    if resume != "auto":
        if not os.path.exists(os.path.join(resume, "COMPLETE")):
            raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no COMPLETE marker); "
                                    f"use checkpoint.resume=auto to take the newest complete one")
        problems = _verified(resume)
        if problems:
            raise checkpoint_files.CheckpointError(
                f"checkpoint.resume={resume!r} is damaged: {checkpoint_files.describe(problems)}; resume from another "
                f"checkpoint (checkpoint.resume=auto takes the newest one that verifies)")
        return resume
    found = owned_checkpoints(cfg.checkpoint_dir, run_id)
    for _, path in reversed(found):
        problems = _verified(path)
        if not problems:
            return path
        if _rank() == 0:
            log.warning("checkpoint %s is damaged, skipped: %s", path, checkpoint_files.describe(problems))
    if found:
        raise checkpoint_files.CheckpointError(
            f"checkpoint.resume=auto: none of the {len(found)} checkpoints in {cfg.checkpoint_dir} verifies (each "
            "listed above); move them away to start afresh, or resume one explicitly with checkpoint.resume=PATH")
    return None


def _verified(path: str) -> list:
    """checkpoint_files.verify's problems for a resume on this world size (collective), with a one-line warning for a
    checkpoint that has no manifest to check its contents against."""
    problems, has_manifest = checkpoint_files.verify(path)
    if not problems and not has_manifest and _rank() == 0:
        log.warning("checkpoint %s has no %s (written before checksums): its contents cannot be verified", path,
                    checkpoint_files.MANIFEST)
    return problems


def maybe_resume(ctx) -> bool:
    """Restore model, optimizer, schedule, algorithm state, sampler, RNG and step from ctx.resume_path (picked and
    verified by resolve_resume); push the weights to the engine. A load that still fails (a checkpoint of an
    incompatible layout or version) raises CheckpointError on every rank, in one line."""
    from mssr_megatron.rollout.weight_export import sync_weights

    path = ctx.resume_path
    if path is None:
        return False
    # megatron's load reports a failed read on every rank itself (torch.distributed.checkpoint gathers the errors)
    try:
        load_model_and_optimizer(ctx.actor, os.path.join(path, "model"))
    except checkpoint_files.FAILURES as exc:
        raise checkpoint_files.CheckpointError(f"loading the model and optimizer of {path} failed: "
                                               f"{checkpoint_files.one_line(exc)}") from exc
    checkpoint_files.call_on_every_rank(lambda: _load_trainer_state(ctx, path), f"loading the trainer state of {path}")
    ctx.logger.resume(ctx.step)
    sync_weights(ctx.actor.module, ctx.actor.dims, ctx.engine, ctx.cfg.rollout.weight_bucket_bytes,
                 hosts=ctx.engine_hosts)
    newer = ([p for step, p in owned_checkpoints(ctx.cfg.checkpoint_dir, ctx.run_id) if step > ctx.step]
             if ctx.cfg.checkpoint.resume == "auto" else [])  # resolve_resume rejected them
    log.info("resumed from %s at step %d%s", path, ctx.step,
             f" (skipped {len(newer)} newer damaged checkpoint(s): {', '.join(newer)})" if newer else "")
    return True


def _load_trainer_state(ctx, path: str) -> None:
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    ctx.actor.load_scheduler_state(trainer_state["scheduler"])
    ctx.algo.load_state_dict(trainer_state["algorithm"])
    ctx.sampler.load_state_dict(trainer_state["sampler"])
    ctx.step = trainer_state["step"]
    rng_path = os.path.join(path, "rng", f"rank_{_rank()}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=False))
    else:
        log.warning("no RNG state for rank %d in %s (world size changed); RNG streams restart", _rank(), path)


def export_hf(ctx) -> str | None:
    """Write the trained policy as a Hugging Face directory <output_dir>/hf (published names, tokenizer and processor
    files copied from the initial model), atomically. Returns its path on rank 0."""
    from mssr_megatron.checkpoint.dist_io import copy_non_weight_files, staged_output
    from mssr_megatron.rollout.weight_export import export_full_weights

    out = os.path.join(ctx.run_dir, "hf")
    finite_check.require_finite(ctx.actor, f"the HF export {out}")
    # a host copy of each tensor as it is exported (on GPU the full model is never held twice in device memory)
    tensors = {name: t.to("cpu", copy=True) for name, t in export_full_weights(ctx.actor.module, ctx.actor.dims)}
    if _rank() != 0:
        return None
    from safetensors.torch import save_file

    with staged_output(out) as tmp:
        copy_non_weight_files(ctx.cfg.model.hf_path, tmp)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    return out
