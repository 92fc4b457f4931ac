"""The RL loop, top to bottom. Each arrow of a step is one call into the module that owns it:

    sample -> rollout -> reward -> advantage -> Megatron log-probs (old, reference) -> shaping
      -> mini-batched PPO updates -> tracker update -> weight sync -> metrics / validation / benchmarks / checkpoint

The engine's memory on a shared GPU follows the phases (ctx.colocation, the same calls with or without colocation):
released for log-probs and updates (`training()`), weights resumed for the sync and the KV cache after it
(`weight_update()`). build_context hands over an engine already serving the policy's weights.
"""

from __future__ import annotations

import json
import logging
import os
import signal

import torch

from mssr_megatron.train import RunStopped, benchmark_eval, rl_step
from mssr_megatron.config import RunConfig
from mssr_megatron.metrics import StepTimer
from mssr_megatron.rollout.weight_export import sync_weights
from mssr_megatron.train.finite_check import NonFiniteError
from mssr_megatron.train.run_context import RunContext, broadcast_object, build_context

log = logging.getLogger("mssr")
PREEMPTED_MARKER = "PREEMPTED"
MISMATCH_METRIC = "mismatch/mean_abs_diff"  # what trainer.max_logprob_mismatch bounds


def train(cfg: RunConfig) -> dict:
    """Run RL training as configured; returns the run summary (on every rank), or {"preempted_at_step": ...} when
    a signal stopped it (see _stop_for_signal)."""
    stop = _PreemptionFlag()  # before the (minutes-long) set-up, so that an early preemption notice is not lost
    try:
        ctx = build_context(cfg)
        try:
            return _run(ctx, stop)
        finally:
            ctx.close()
    finally:
        stop.restore()


def _run(ctx: RunContext, stop: "_PreemptionFlag") -> dict:
    """The run. The stop flag is agreed (every rank, the same boundaries) after the set-up, between chunks of the
    tracker initialisation, before the step-0 validation, after each step's rollouts and after each step."""
    from mssr_megatron.train import run_checkpoint

    cfg = ctx.cfg
    _mark_preempted(ctx, None)
    # the step whose checkpoint is on disk; at step 0 there is nothing to save (and no optimizer state)
    on_disk = ctx.step if run_checkpoint.maybe_resume(ctx) else None
    if on_disk is None and not stop.agreed() and initialize_tracker(ctx, stop):
        before = {}
        if cfg.trainer.val_before_train and ctx.val is not None and not stop.agreed():
            before.update(validate(ctx))
        if cfg.trainer.eval_every and not stop.agreed():  # the initial policy's scores: the curve's first point
            before.update(benchmark_eval.evaluate(ctx))
        if before:
            ctx.logger.log(0, before)
    nonfinite_steps = 0
    while ctx.step < cfg.trainer.total_steps and not stop.agreed():
        try:
            metrics = train_step(ctx, stop)
        except NonFiniteError as exc:  # raised on every rank, before anything saved or exported these weights
            raise NonFiniteError(f"step {ctx.step + 1}: {exc}; the run stops without saving or exporting them; "
                                 f"{_last_good_checkpoint(ctx)}") from None
        if metrics is None:
            log.warning("signal %s: step %d dropped after its rollouts (nothing of it applied)", stop.signal_name,
                        ctx.step + 1)
            break
        ctx.step += 1
        if ctx.actor.nonfinite is not None:
            nonfinite_steps += 1
            log.error("step %d: non-finite %s; the update was skipped (%d/%d allowed)", ctx.step,
                      ctx.actor.nonfinite, nonfinite_steps, cfg.trainer.max_nonfinite_steps)
        if ctx.val is not None and cfg.trainer.val_every and ctx.step % cfg.trainer.val_every == 0:
            metrics.update(validate(ctx))
        if cfg.trainer.eval_every and ctx.step % cfg.trainer.eval_every == 0:
            metrics.update(benchmark_eval.evaluate(ctx))
        ctx.logger.log(ctx.step, metrics)
        if nonfinite_steps > cfg.trainer.max_nonfinite_steps:
            run_checkpoint.save(ctx)
            raise RunStopped(f"stopping at step {ctx.step}: {nonfinite_steps} steps had non-finite values "
                               f"(last: {ctx.actor.nonfinite}); checkpoint saved")
        check_logprob_mismatch(ctx, metrics)
        if cfg.checkpoint.save_every and ctx.step % cfg.checkpoint.save_every == 0:
            run_checkpoint.save(ctx)
            on_disk = ctx.step
    # agreed again: a signal to one rank during the last step would otherwise send the ranks down different branches
    if stop.agreed():
        return _stop_for_signal(ctx, stop, on_disk)
    if on_disk != ctx.step:
        run_checkpoint.save(ctx)
    return finish(ctx)


def _last_good_checkpoint(ctx: RunContext) -> str:
    """Where to resume after a non-finite stop: the newest complete checkpoint (every one was checked finite when
    written, and is checked again when loaded)."""
    from mssr_megatron.train.run_dir import owned_checkpoints

    found = owned_checkpoints(ctx.cfg.checkpoint_dir, ctx.run_id)
    if not found:
        return f"no checkpoint in {ctx.cfg.checkpoint_dir} to resume from: start again (e.g. with a lower optimizer.lr)"
    return f"the last good checkpoint is {found[-1][1]} (checkpoint.resume=auto, e.g. with a lower optimizer.lr)"


def _stop_for_signal(ctx: RunContext, stop: "_PreemptionFlag", on_disk: int | None) -> dict:
    """Save the current step unless its checkpoint is on disk or nothing was trained yet, and leave the PREEMPTED
    marker. Returns {"preempted_at_step", "signal", "checkpoint_saved": the path written now, or None}."""
    from mssr_megatron.train import run_checkpoint

    path = None
    if ctx.step == 0:
        log.warning("signal %s: exiting before the first step (nothing trained yet, nothing to save)",
                    stop.signal_name)
    elif on_disk == ctx.step:
        log.warning("signal %s: exiting at step %d (its checkpoint is on disk)", stop.signal_name, ctx.step)
    else:
        log.warning("signal %s: saving a checkpoint at step %d and exiting", stop.signal_name, ctx.step)
        path = run_checkpoint.save(ctx)
    _mark_preempted(ctx, stop.signal_name)
    return {"preempted_at_step": ctx.step, "signal": stop.signal_name, "checkpoint_saved": path}


def train_step(ctx: RunContext, stop: "_PreemptionFlag | None" = None) -> dict[str, float] | None:
    """One RL step; returns its metrics. With `stop`: None when the flag is agreed after the rollouts and rewards
    (the update is the step's other long phase): the step is dropped and the sampler put back, so that ctx.step's
    state is what a checkpoint of it holds (generation draws from seeded, forked RNG streams: nothing else moved)."""
    cfg, timer = ctx.cfg, StepTimer(cuda_sync=ctx.device.type == "cuda")  # CUDA: phases end when their kernels do
    sampler_state = ctx.sampler.state_dict()
    with timer("step"):
        records = [ctx.train[i] for i in ctx.sampler.next_step()]
        with timer("rollout"):
            rollouts = rl_step.generate(ctx, records, rl_step.sampling_params(ctx, seed=cfg.rollout.seed + ctx.step))
        with timer("reward"):
            rewards, metrics = rl_step.grade(ctx, records, rollouts)
        if stop is not None and stop.agreed():
            ctx.sampler.load_state_dict(sampler_state)
            return None
        exp = rl_step.make_experience(ctx, records, rollouts, rewards)
        rows = rl_step.data_parallel_rows(ctx, len(exp))
        with ctx.colocation.training():
            metrics.update(_train_on(ctx, exp, rows, timer))
        with timer("weight_sync"), ctx.colocation.weight_update():
            metrics.update(sync_weights(ctx.actor.module, ctx.actor.dims, ctx.engine, cfg.rollout.weight_bucket_bytes,
                                        hosts=ctx.engine_hosts))
    metrics.update(timer.pop())
    return rl_step.from_last_stage(metrics)


def _train_on(ctx: RunContext, exp, rows, timer: StepTimer) -> dict[str, float]:
    """Log-probs, advantages, shaping, PPO updates and the tracker update of one step (the training phase).
    The algorithm pipeline (ctx.algo) gets the whole step plus this replica's log-probs and rows, and does every
    data-parallel reduction of the algorithm state itself (algorithms/pipeline.py)."""
    temperature = ctx.cfg.rollout.temperature
    metrics: dict[str, float] = {}
    with timer("logprobs"):
        old, entropy = rl_step.token_logprobs(ctx, ctx.actor, exp, rows, temperature)
        ref = None if ctx.reference is None else rl_step.token_logprobs(ctx, ctx.reference, exp, rows, temperature)[0]
    mask = exp.response_mask[rows]
    out = ctx.algo.advantages(exp.prompt_keys, exp.rewards, exp.response_mask, exp.group_index, rows=rows,
                              old_logprobs=old, ref_logprobs=ref)
    metrics.update(out.metrics)
    advantages = out.advantages
    if old is not None:
        advantages, shaping_metrics = ctx.algo.shape(advantages, mask, entropy=entropy, logprobs=old)
        metrics.update(shaping_metrics)
        metrics.update(rl_step.mismatch_metrics(old, exp.rollout_logprobs[rows], mask))
    with timer("update"):
        metrics.update(rl_step.update_policy(ctx, exp, rows, advantages, old, ref))
    metrics.update(after_update(ctx, exp, rows))
    return metrics


def after_update(ctx: RunContext, exp, rows) -> dict[str, float]:
    """Fold the step's rewards into the tracker with the forgetting rule's rho (the pipeline keeps it the same on
    every rank). The spo rule reads the policy after the update on this step's responses and on each prompt's
    response of its previous visit: every pipeline stage runs those two forward passes."""
    if not ctx.algo.needs_new_logprobs:
        return ctx.algo.after_update(exp.prompt_keys, exp.rewards, exp.response_mask, rows=rows)
    temperature = ctx.cfg.rollout.temperature
    new, _ = rl_step.token_logprobs(ctx, ctx.actor, exp, rows, temperature)
    earlier = rl_step.with_responses(ctx, exp, ctx.algo.previous_responses(exp.prompt_keys))
    previous, _ = rl_step.token_logprobs(ctx, ctx.actor, earlier, rows, temperature)
    return ctx.algo.after_update(exp.prompt_keys, exp.rewards, exp.response_mask, rows=rows,
                                 response_ids=exp.input_ids[:, 1:], new_logprobs=new, previous_logprobs=previous,
                                 previous_mask=earlier.response_mask)


def check_logprob_mismatch(ctx: RunContext, metrics: dict[str, float]) -> None:
    """The mismatch alarm (trainer.max_logprob_mismatch): warn, or save a checkpoint and stop, when the step's
    mismatch/mean_abs_diff exceeds it (NaN does too). That value is a token mean over the global batch, the same on
    every rank (rl_step.mismatch_metrics), so every rank takes the same branch."""
    from mssr_megatron.train import run_checkpoint

    threshold, value = ctx.cfg.trainer.max_logprob_mismatch, metrics.get(MISMATCH_METRIC)
    if threshold is None or value is None or value <= threshold:
        return
    what = f"step {ctx.step}: {MISMATCH_METRIC}={value:.4g} nats exceeds trainer.max_logprob_mismatch={threshold:g}"
    hint = ("check that the engine received this step's weights (a failed or stale weight sync), the engine's dtype "
            "against model.params_dtype, and the engine's kernels (attention, sampling) against the trainer's")
    if ctx.cfg.trainer.on_logprob_mismatch == "warn":
        log.warning("%s; %s", what, hint)
        return
    path = run_checkpoint.save(ctx)
    raise RunStopped(f"stopping at {what} (trainer.on_logprob_mismatch=stop); checkpoint saved: {path}; {hint}")


def initialize_tracker(ctx: RunContext, stop: "_PreemptionFlag") -> bool:
    """Before step 0: init_rollouts rollouts per training prompt from the initial policy seed the Beta baseline.
    Generated and graded in chunks of data.prompts_per_step prompts (a step's worth), the stop flag agreed before
    each: on a 7B job the whole pass takes minutes, a signal is honoured within one chunk. Returns False when stopped
    (the tracker is then left as it was). Chunk seeds: rollout.seed - 1 + start * n, what one call over all prompts
    gives each request with SGLang and vLLM (per-request seeds): the same rollouts there. The HF engine seeds each
    call once, so its rollouts differ from an unchunked pass's (drawn from the same policy). Cost: one all_reduce
    per chunk, and engine batches that end at chunk edges."""
    n = ctx.cfg.algorithm.baseline.init_rollouts
    if ctx.algo.tracker is None or n == 0:
        return True
    records, chunk = list(ctx.train), ctx.cfg.data.prompts_per_step
    log.info("tracker initialisation: %d rollout(s) on each of %d prompts, in %d chunk(s)", n, len(records),
             -(-len(records) // chunk))
    prompt_ids, rewards, correct = [], [], 0.0
    for start in range(0, len(records), chunk):
        if stop.agreed():
            log.warning("signal %s: tracker initialisation stopped after %d of %d prompts", stop.signal_name, start,
                        len(records))
            return False
        part = records[start:start + chunk]
        sampling = rl_step.sampling_params(ctx, seed=ctx.cfg.rollout.seed - 1 + start * n)
        sampling.n = n
        rollouts = rl_step.generate(ctx, part, sampling)
        part_rewards, metrics = rl_step.grade(ctx, part, rollouts)
        prompt_ids += [part[int(r.request_id)].prompt_id for r in rollouts]
        rewards += part_rewards
        correct += metrics.get("reward/accuracy", float("nan")) * len(rollouts)
    ctx.algo.initialize(prompt_ids, torch.tensor(rewards))
    log.info("tracker initialised on %d prompts: initial mean reward %.3f", len(records),
             correct / max(len(rewards), 1))
    return True


def validate(ctx: RunContext) -> dict[str, float]:
    """Accuracy on the held-out prompts (val_temperature; 0 = greedy)."""
    records = list(ctx.val)[: ctx.cfg.data.val_size or None]
    rollouts = rl_step.generate(ctx, records, rl_step.sampling_params(ctx, validation=True, seed=12345))
    _, metrics = rl_step.grade(ctx, records, rollouts)
    return {"val/accuracy": metrics["reward/accuracy"], "val/response_length": metrics["rollout/response_length"]}


def finish(ctx: RunContext) -> dict:
    """Final validation, summary and (optionally) the HF export of the trained policy."""
    from mssr_megatron.metrics import read_metrics

    history = read_metrics(ctx.run_dir) if ctx.is_driver else []
    val = [m["val/accuracy"] for m in history if m.get("val/accuracy") is not None]
    summary = {"steps": ctx.step, "initial_val_accuracy": val[0] if val else None,
               "final_val_accuracy": val[-1] if val else None, "best_val_accuracy": max(val) if val else None,
               "run_dir": ctx.run_dir}
    if ctx.cfg.checkpoint.export_hf_at_end:
        from mssr_megatron.train import run_checkpoint

        summary["hf_export"] = run_checkpoint.export_hf(ctx)
    ctx.logger.log_summary(summary)
    return broadcast_object(summary)


def _mark_preempted(ctx: RunContext, signal_name: str | None) -> None:
    """<run_dir>/PREEMPTED exists exactly when the last run in this directory stopped for a signal (its step saved, or
    nothing trained yet): batch scripts (examples/slurm) requeue the job on it. Cleared when a run starts."""
    if not ctx.is_driver:
        return
    path = os.path.join(ctx.run_dir, PREEMPTED_MARKER)
    if signal_name is None:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(path, "w") as f:
        json.dump({"step": ctx.step, "signal": signal_name}, f)


class _PreemptionFlag:
    """SIGTERM / SIGUSR1 (SLURM preemption) and SIGINT (Ctrl-C) ask the run to stop at the next boundary where the
    flag is agreed (_run), saving the last completed step. A second SIGINT exits at once without saving
    (KeyboardInterrupt; the CLI prints one line): for a run stuck inside a long phase. `restore` puts back the
    handlers that were installed before."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._interrupts = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
            # a signal handler may not take the logging lock that the interrupted code may hold: a plain write
            os.write(2, b"SIGINT: stopping at the next phase boundary, saving the last completed step; "
                        b"press Ctrl-C again to exit at once without saving\n")
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def agreed(self) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step)."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_world_size() > 1:
            from mssr_megatron.parallel import collective_device

            flag = torch.tensor([float(self.requested)], device=collective_device())  # NCCL: a CUDA tensor
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            # the collective's answer is returned, and never written over `requested`: a signal handled while this
            # rank waited in the all_reduce (the usual place for a rank that is not the driver) set it after `flag`
            # was read, and is then agreed at the next call instead of being lost
            if flag.item() == 0.0:
                return False
            if not self.requested:
                self.requested, self.signal_name = True, "(to another rank)"
        return self.requested

