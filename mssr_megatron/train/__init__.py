"""The training layer: the RL loop (`trainer`) and what it calls, one module per concern.

    trainer          the loop, top to bottom; preemption and the run summary
    rl_step          the pieces of one step (generate, grade, experience, log-probs, updates)
    run_context      everything a run holds, built once from the config
    run_checkpoint   save / resume of the whole run (model, optimizer, tracker, sampler, RNG)
    checkpoint_files the manifest of a checkpoint's files (sizes, CRC-32), verified before a resume
    run_dir          which run a run directory holds: refusal of a fresh run into a used one, overwrite, run ids
    actor            a Megatron model with its optimizer: log-probs and train steps over micro-batches
    experience       the step's rollouts as padded training tensors
    token_budget     micro-batches packed under a token budget (tokens + image patches), as many on every DP rank
    crossmodal       text-only copies of the rows beside them, and the cross-modal KL from the paired logits
    finite_check     NaN/Inf checks of the weights after each step and of a loaded or saved optimizer state
    resume_config    what a resumed run may change from the config stored in its checkpoint
    benchmark_eval   the benchmark suite every trainer.eval_every steps (eval/runner.py on the first engine)
"""


class RunStopped(RuntimeError):
    """The run stopped on purpose, for a reason told in one line (non-finite values, the log-prob mismatch alarm);
    `mssr train` prints it without a traceback and exits with 1."""
