# Shared by every batch script in examples/slurm (and by the scripts `mssr launch` writes). Sourcing it only defines
# functions; a batch script ends with `mssr_main CONFIG [key=value ...]`.
#
# One job attempt:
#   1. resolve the run directory and checkpoint directory from the config (this also validates it for the job's
#      world size, so a bad config fails here, in seconds, not after the model has loaded);
#   2. `srun` starts one torchrun per node, with all of the node's CPUs (--cpus-per-task; see mssr_setup_env);
#      torchrun starts NPROC_PER_NODE training ranks, always with checkpoint.resume=auto, so a requeued job
#      continues from its newest complete checkpoint;
#   3. a preemption notice to the batch shell (SIGUSR1 from `#SBATCH --signal=B:USR1@T` or from
#      `scancel --batch --signal=USR1 JOBID`) is passed on as SIGUSR1 to the training ranks on this node, by PID.
#      One rank is enough: the trainer all-reduces the stop flag, every rank saves at the same step and exits 0;
#   4. the trainer leaves <run_dir>/PREEMPTED when it stopped for a signal (its last completed step saved, or stopped
#      before the first step, e.g. during the tracker initialisation): then the job requeues itself
#      (`scontrol requeue`) and the next attempt resumes, or starts the run over when it had no checkpoint yet.
#      Otherwise the job ends with the exit status of the training step.
#
# Why not let Slurm deliver the signal to the step (`--signal=USR1@T` without `B:`, or `scancel --signal=USR1` without
# `--batch`)? Slurm signals every process of a step: torchrun (which ignores SIGUSR1 here, see mssr_start_node) and
# also helper processes the trainer spawned, such as the reward-grading pool, whose default action for SIGUSR1 is to
# die. Targeted delivery leaves them alone. (It works, minus those helpers: the ranks save and the job requeues.)
#
# SIGTERM: `scancel --signal=TERM JOBID` (the step only) works too: torchrun passes it to the ranks, which save
# within torchrun's shutdown timeout (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default). But when Slurm ends a job
# (time limit, plain scancel, preemption with GraceTime, `scancel --full --signal=TERM`) srun receives SIGTERM as well
# and ends the step at once, leaving the trainer no time to save: that is what the early SIGUSR1 (keep its lead
# longer than one step plus a checkpoint) and periodic checkpoints (checkpoint.save_every) are for.
#
# Variables (all optional; set them in the batch script, in the environment of `sbatch`, or with --export):
#   MSSR_REPO        checkout holding examples/slurm/common.sh      (default: $SLURM_SUBMIT_DIR)
#   VENV             virtual environment to activate               (default: $MSSR_REPO/.venv when it exists)
#   PYTHON           interpreter                                   (default: python3 from PATH after activation)
#   NPROC_PER_NODE   training ranks per node                       (default: GPUs allotted on the node, else 1)
#   OUTPUT_DIR       -> trainer.output_dir  (run dir: metrics, summary, HF export; put it on shared storage)
#   CKPT_DIR         -> checkpoint.save_dir (default <run dir>/checkpoints; must be on shared storage)
#   MASTER_PORT      rendezvous port of multi-node jobs            (default: 20000 + job id % 20000)
#   MAX_REQUEUES     stop requeueing after this many restarts      (default 20)
#   EXTRA_OVERRIDES  space-separated key=value overrides added after the command-line ones

mssr_log() {
    echo "[mssr-slurm $(date +%H:%M:%S)] $*"
}

mssr_setup_env() {
    MSSR_REPO=${MSSR_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    VENV=${VENV:-$MSSR_REPO/.venv}
    if [ -f "$VENV/bin/activate" ]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
    PYTHON=${PYTHON:-python3}
    MSSR_GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
    [ "${MSSR_GPUS_PER_NODE:-0}" -gt 0 ] 2>/dev/null || MSSR_GPUS_PER_NODE=0
    if [ -z "${NPROC_PER_NODE:-}" ]; then
        NPROC_PER_NODE=$MSSR_GPUS_PER_NODE
        [ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1
    fi
    NNODES=${SLURM_JOB_NUM_NODES:-1}
    HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    MAX_REQUEUES=${MAX_REQUEUES:-20}
    # CPUs of the node's task (one task per node): the job's --cpus-per-task, else every CPU allotted on the node.
    # srun gets it explicitly: since Slurm 22.05 a step does not inherit the batch job's --cpus-per-task, and the
    # default of one CPU per task would pin every rank, engine process and reward worker of the node to one core.
    MSSR_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$NPROC_PER_NODE}}
    # CPU threads per rank: the task's CPUs shared by its ranks (torch would otherwise start one thread per core
    # in every rank and oversubscribe the node).
    local threads=$(( MSSR_CPUS_PER_TASK / NPROC_PER_NODE ))
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}
    export PYTHONUNBUFFERED=1                                    # log lines appear in the job log as they happen
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead rank fails the job
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Node-local: the PID of this node's torchrun, read by the signal forwarding (same node, other job step).
    MSSR_PID_DIR=${TMPDIR:-/tmp}/mssr-slurm-${SLURM_JOB_ID:-0}
    mkdir -p "$MSSR_PID_DIR"
    export MSSR_PID_DIR PYTHON NPROC_PER_NODE
}

# Prints the absolute run directory and checkpoint directory (two lines), validating the config for the job's world
# and placing its rollout engines (rollout.engines) on the node's GPUs, so a placement error stops the job here.
mssr_resolve_dirs() {
    "$PYTHON" -m mssr_megatron.launch resolve --world-size $((NNODES * NPROC_PER_NODE)) \
        --ranks-per-node "$NPROC_PER_NODE" --gpus-per-node "$MSSR_GPUS_PER_NODE" "$@"
}

# The torchrun arguments of this job: a standalone rendezvous on one node (a free port, so several jobs can share a
# node), else c10d at the head node. c10d numbers the nodes by sorted host name, so global rank 0 (which writes the
# logs; its engine is one of many with rollout.engines=per_node) is usually, not necessarily, on the head node.
mssr_torchrun_args() {
    if [ "$NNODES" -eq 1 ]; then
        echo "--standalone --nnodes 1 --nproc_per_node $NPROC_PER_NODE"
    else
        echo "--nnodes $NNODES --nproc_per_node $NPROC_PER_NODE --rdzv_backend c10d" \
             "--rdzv_endpoint $HEAD_NODE:$MASTER_PORT --rdzv_id ${SLURM_JOB_ID:-0}"
    fi
}

# Runs as the task of the training step, once per node: record this shell's PID (exec keeps it for torchrun) and
# start torchrun with SIGUSR1 ignored. An ignored signal stays ignored across exec, so torchrun (which would die of
# SIGUSR1) survives a step-wide SIGUSR1; the training ranks install their own handler at start-up.
mssr_start_node() {
    echo $$ > "$MSSR_PID_DIR/torchrun.pid"
    trap '' USR1
    exec "$PYTHON" -m torch.distributed.run "$@"
}

# SIGUSR1 to the training ranks on this node: the children of torchrun that run mssr_megatron (not the reward
# workers or engine processes they spawn). Only ranks that already handle SIGUSR1 (SigCgt in /proc) are signalled:
# until the trainer installs its handler the signal is ignored (inherited from torchrun) and would be lost, so it
# is sent at a later poll instead. One rank is enough (the trainer all-reduces the stop flag). Returns 1 when no
# rank could be told yet.
mssr_signal_local_ranks() {
    local agent pid caught told=1
    agent=$(cat "$MSSR_PID_DIR/torchrun.pid" 2>/dev/null) || return 1
    for pid in $(pgrep -P "$agent" -f mssr_megatron); do
        caught=$(awk '/^SigCgt:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
        if [ -n "$caught" ] && (( 0x$caught >> ($(kill -l USR1) - 1) & 1 )); then
            kill -USR1 "$pid" 2>/dev/null && told=0
        fi
    done
    return $told
}

# Trap handler of the batch shell. The notice is remembered and passed on now or, while the ranks are still being
# started, at the next poll of mssr_run_step.
mssr_on_signal() {
    mssr_log "received SIG$1: asking the trainer to save a checkpoint and stop after the current step"
    MSSR_PREEMPT=requested
    mssr_forward_preemption
}

mssr_forward_preemption() {
    if [ "${MSSR_PREEMPT:-}" = requested ] && mssr_signal_local_ranks; then
        MSSR_PREEMPT=delivered
        mssr_log "SIGUSR1 sent to the training ranks on $(hostname)"
    fi
}

# Runs "$@" (the srun command) in the background and waits for it. A trapped signal interrupts the short `wait` on
# the sleep at once, so the notice is handled while the step runs; the batch shell itself never dies of it.
mssr_run_step() {
    "$@" &
    local step=$!
    while kill -0 "$step" 2>/dev/null; do
        mssr_forward_preemption
        sleep 2 &
        wait $! 2>/dev/null
    done
    wait "$step"
}

mssr_main() {
    local config=${1:?usage: mssr_main CONFIG [key=value ...]}
    shift
    mssr_setup_env
    trap 'mssr_on_signal USR1' USR1
    trap 'mssr_on_signal TERM' TERM
    local overrides=("$@")
    # shellcheck disable=SC2206
    overrides+=(${EXTRA_OVERRIDES:-})
    [ -n "${OUTPUT_DIR:-}" ] && overrides+=("trainer.output_dir=$OUTPUT_DIR")
    [ -n "${CKPT_DIR:-}" ] && overrides+=("checkpoint.save_dir=$CKPT_DIR")
    overrides+=("checkpoint.resume=auto")

    local dirs run_dir ckpt_dir
    dirs=$(mssr_resolve_dirs "$config" "${overrides[@]}") || exit 2
    run_dir=$(sed -n 1p <<< "$dirs")
    ckpt_dir=$(sed -n 2p <<< "$dirs")
    mssr_log "job ${SLURM_JOB_ID:-?} attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )): $NNODES node(s) x" \
             "$NPROC_PER_NODE rank(s), head $HEAD_NODE; config $config"
    mssr_log "run dir $run_dir, checkpoints $ckpt_dir (resume=auto)"
    rm -f "$run_dir/PREEMPTED"  # only this attempt's trainer may ask for a requeue

    # shellcheck disable=SC2046
    mssr_run_step srun --ntasks-per-node=1 --nodes="$NNODES" --cpus-per-task="$MSSR_CPUS_PER_TASK" \
        --kill-on-bad-exit=1 \
        bash -c "source '$MSSR_REPO/examples/slurm/common.sh' && mssr_start_node \"\$@\"" mssr-node \
        $(mssr_torchrun_args) -m mssr_megatron.cli train "$config" "${overrides[@]}"
    local rc=$?
    rm -rf "$MSSR_PID_DIR"

    if [ -f "$run_dir/PREEMPTED" ]; then
        mssr_log "trainer stopped for preemption: $(cat "$run_dir/PREEMPTED")"
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
            mssr_log "not requeueing: $MAX_REQUEUES restarts already (MAX_REQUEUES)"
            exit 1
        fi
        mssr_log "requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint in $ckpt_dir"
        scontrol requeue "$SLURM_JOB_ID" || { mssr_log "scontrol requeue failed: resubmit this script"; exit 1; }
        exit 0  # not reached: the requeue ends this attempt
    fi
    mssr_log "training step finished with exit status $rc"
    exit "$rc"
}
