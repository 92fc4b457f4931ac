"""`mssr launch`: a SLURM batch script from a run config, submitted with sbatch.

    mssr launch examples/configs/qwen2_5_vl_7b_mssr.yaml --nodes 2 --gpus-per-node 8 --time 48:00:00 \\
        --partition gpu --account proj [key=value ...] [--dry-run]

The config (with its overrides) is loaded and validated for the job's world size first, and the rollout engines are
placed for its shape (`rollout.engines`, rollout/placement.py: rollout.colocate=false needs --procs-per-node below
--gpus-per-node, with room for the engines), so batch-size or layout mistakes are reported here and not an hour
later in a queue; a GPU job's memory plan (`mssr plan`) must fit
--gpu-memory-gb, or the launch is refused with settings that would fit. The script has the `#SBATCH` lines (nodes,
GPUs, CPUs per task (at least one core per rank, reward worker and engine process: `node_processes`), time,
partition, log file, requeue, an early SIGUSR1 before the time limit), the few variables of
examples/slurm/common.sh, and one call of its `mssr_main`: the same code as the hand-written scripts in
examples/slurm, so preemption, requeue and resume behave identically. It is written to
<output_dir>/slurm/job.sbatch (or printed with --dry-run) and submitted; the job id is printed.

`python -m mssr_megatron.launch resolve --world-size N [--ranks-per-node R --gpus-per-node G] CONFIG [key=value ...]`
is what the batch scripts call to find the run and checkpoint directories (two lines, absolute paths) of a config,
after validating it and placing its engines for the job; `python -m mssr_megatron.launch`
otherwise is the launcher (as tools/slurm_launch.py).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import subprocess
import sys

COMMON_SH = os.path.join("examples", "slurm", "common.sh")


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config, e.g. examples/configs/qwen2_5_vl_7b_mssr.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.total_steps=300")
    job = parser.add_argument_group("job shape")
    job.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    job.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8; 0 = a CPU job)")
    job.add_argument("--procs-per-node", type=int, default=None,
                     help="training ranks per node (default: --gpus-per-node; required for CPU jobs)")
    job.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per node (one task per node), "
                     "passed to sbatch and srun (default: one per training rank, reward worker and rollout-engine "
                     "process of the busiest node; fewer is refused)")
    job.add_argument("--time", default="24:00:00", help="time limit, SLURM syntax (default 24:00:00)")
    job.add_argument("--partition", default=None, help="SLURM partition")
    job.add_argument("--account", default=None, help="SLURM account")
    job.add_argument("--job-name", default=None, help="job name (default: logging.run_name, else the name of "
                     "trainer.output_dir)")
    job.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                     help="extra #SBATCH option, repeatable, e.g. --sbatch=--qos=high --sbatch=--exclusive")
    job.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment variable exported in the job, repeatable, e.g. --env NCCL_SOCKET_IFNAME=ib0")
    preempt = parser.add_argument_group("preemption")
    preempt.add_argument("--signal-lead", type=int, default=600, help="seconds before the time limit at which the "
                         "trainer is asked to checkpoint and stop; the job then requeues itself (default 600: "
                         "longer than one RL step plus a checkpoint)")
    preempt.add_argument("--max-requeues", type=int, default=20, help="stop requeueing after this many restarts")
    where = parser.add_argument_group("files")
    where.add_argument("--script", default=None, help="where to write the batch script "
                       "(default <output_dir>/slurm/job.sbatch)")
    where.add_argument("--repo", default=None, help="checkout holding examples/slurm/common.sh, visible on every "
                       "node (default: the one this package was imported from, else the working directory)")
    where.add_argument("--python", default=sys.executable,
                       help="Python interpreter of the job, visible on every node (default: this one)")
    memory = parser.add_argument_group("memory plan")
    memory.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory per GPU in GB (10^9 bytes) that the layout "
                        "must fit (`mssr plan`; default 80)")
    memory.add_argument("--skip-memory-plan", action="store_true", help="submit even if the plan does not fit")
    parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")


def find_repo(explicit: str | None) -> str:
    """The checkout whose examples/slurm/common.sh the job sources."""
    candidates = [explicit] if explicit else [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()]
    for repo in candidates:
        if os.path.isfile(os.path.join(repo, COMMON_SH)):
            return os.path.abspath(repo)
    raise FileNotFoundError(f"no {COMMON_SH} under {' or '.join(candidates)}: launch from a source checkout of "
                            "mssr-megatron or pass --repo")


def run_dirs(config: str | None, overrides: list[str], world_size: int | None = None) -> tuple[str, str, object]:
    """(absolute run dir, absolute checkpoint dir, RunConfig) of a config, validated for world_size when given."""
    from mssr_megatron.config import load_config

    cfg = load_config(config, overrides)
    if world_size is not None:
        cfg.validate(world_size=world_size)
    return os.path.abspath(cfg.trainer.output_dir), os.path.abspath(cfg.checkpoint_dir), cfg


def time_limit_seconds(text: str) -> int | None:
    """SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds; None for unlimited."""
    if text.lower() in ("infinite", "unlimited"):
        return None
    days, _, rest = text.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        if days:
            units = (3600, 60, 1)[: len(parts)]
            return int(days) * 86400 + sum(p * u for p, u in zip(parts, units))
        units = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
    except (ValueError, KeyError):
        raise ValueError(f"--time {text!r} is not a SLURM time limit (e.g. 90, 4:00:00, 2-00:00:00)") from None
    return sum(p * u for p, u in zip(parts, units))


def engine_placement(cfg, nodes: int, procs: int, gpus_per_node: int) -> list:
    """The job's rollout engines (rollout/placement.py) for this shape: a ConfigError, naming the fix, when they
    cannot be placed (e.g. rollout.colocate=false without enough GPUs beyond --procs-per-node)."""
    from mssr_megatron.rollout.placement import engine_slots

    p, r = cfg.parallel, cfg.rollout
    return engine_slots(r.engines, world_size=nodes * procs, ranks_per_node=procs, gpus_per_node=gpus_per_node,
                        tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                        engine_tp_size=r.engine_tp_size, colocate=r.colocate)


def node_processes(cfg, procs: int, slots: list) -> dict[str, int]:
    """The CPU-bound processes of the busiest node (the one with the most engines): each needs a core of its own.
    Each engine host grades with its share of the node's data.reward_workers; SGLang runs a scheduler per engine TP
    rank plus a detokenizer, vLLM a worker per engine TP rank plus its engine core; an HF engine runs inside its
    host rank."""
    from mssr_megatron.rollout.placement import node_reward_workers

    busiest = max(sorted({s.node for s in slots}), key=lambda n: sum(s.node == n for s in slots))
    engines = sum(s.node == busiest for s in slots)
    per_engine = 0 if cfg.rollout.engine == "hf" else cfg.rollout.engine_tp_size + 1
    return {"training ranks": procs, "reward workers": node_reward_workers(cfg.data.reward_workers, slots, busiest),
            "rollout-engine processes": engines * per_engine}


def cpus_per_task(args: argparse.Namespace, cfg, procs: int, slots: list) -> int:
    """--cpus-per-task, or the node's process count by default; a ValueError when it is fewer than that."""
    need = node_processes(cfg, procs, slots)
    total = sum(need.values())
    if args.cpus_per_task is None:
        return total
    if args.cpus_per_task < total:
        parts = " + ".join(f"{n} {what}" for what, n in need.items() if n)
        raise ValueError(f"--cpus-per-task {args.cpus_per_task} is fewer than the node's {total} processes ({parts}): "
                         f"they would share cores; pass --cpus-per-task {total} or more (or lower "
                         "data.reward_workers)")
    return args.cpus_per_task


def _check_shape(args: argparse.Namespace) -> int:
    """Training ranks per node; a ValueError names the bad flag."""
    if args.nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node must be >= 0, got {args.gpus_per_node}")
    procs = args.procs_per_node if args.procs_per_node is not None else args.gpus_per_node
    if procs < 1:
        raise ValueError("a CPU job (--gpus-per-node 0) needs --procs-per-node N (training ranks per node)")
    if args.signal_lead < 0 or args.max_requeues < 0:
        raise ValueError("--signal-lead and --max-requeues must be >= 0")
    limit = time_limit_seconds(args.time)
    if limit is not None and args.signal_lead >= limit:
        raise ValueError(f"--signal-lead {args.signal_lead}s is not shorter than --time {args.time} ({limit}s): the "
                         "job would be asked to stop as soon as it starts; lower --signal-lead")
    for item in args.env:
        if "=" not in item or not item.split("=", 1)[0].isidentifier():
            raise ValueError(f"--env expects KEY=VALUE, got {item!r}")
    return procs


def render_script(args: argparse.Namespace, *, procs: int, cpus: int, job_name: str, log_dir: str, repo: str,
                  config: str) -> str:
    """The batch script: #SBATCH header, exported variables, `mssr_main CONFIG overrides`. common.sh hands the job's
    --cpus-per-task (`cpus`) on to srun."""
    sbatch = [f"--job-name={job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1"]
    if args.gpus_per_node:
        sbatch.append(f"--gpus-per-node={args.gpus_per_node}")
    sbatch.append(f"--cpus-per-task={cpus}")
    sbatch.append(f"--time={args.time}")
    sbatch += [f"--partition={args.partition}"] if args.partition else []
    sbatch += [f"--account={args.account}"] if args.account else []
    sbatch += [f"--output={log_dir}/%x-%j.out", "--open-mode=append", "--requeue",
               f"--signal=B:USR1@{args.signal_lead}"]
    sbatch += args.sbatch
    variables = {"MSSR_REPO": repo, "PYTHON": args.python, "NPROC_PER_NODE": str(procs),
                 "MAX_REQUEUES": str(args.max_requeues)}
    variables.update(item.split("=", 1) for item in args.env)
    command = " ".join(shlex.quote(a) for a in ["mssr_main", config, *args.overrides])
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {line}" for line in sbatch),
        f"# Written by `mssr launch` on {datetime.datetime.now():%Y-%m-%d %H:%M}; run it again rather than editing.",
        "# One torchrun per node starts the ranks. A requeued attempt appends to the same log. SIGUSR1 goes to the",
        "# batch shell only (B:), which asks the trainer to checkpoint and then requeues: examples/slurm/common.sh.",
        *(f"export {key}={shlex.quote(value)}" for key, value in variables.items()),
        'source "$MSSR_REPO/examples/slurm/common.sh"',
        command,
        "",
    ])


def run_launch(args: argparse.Namespace) -> int:
    procs = _check_shape(args)
    config = os.path.abspath(args.config)
    if not os.path.isfile(config):
        raise FileNotFoundError(f"config {args.config!r} not found")
    run_dir, _, cfg = run_dirs(config, args.overrides, world_size=args.nodes * procs)
    slots = engine_placement(cfg, args.nodes, procs, args.gpus_per_node)  # before the memory plan: more basic
    if args.gpus_per_node and not args.skip_memory_plan:
        from mssr_megatron.plan import check_launch

        check_launch(cfg, args.nodes * procs, args.gpu_memory_gb)
    cpus = cpus_per_task(args, cfg, procs, slots)
    repo = find_repo(args.repo)
    job_name = args.job_name or cfg.logging.run_name or os.path.basename(run_dir.rstrip(os.sep)) or "mssr"
    log_dir = os.path.join(run_dir, "slurm")
    text = render_script(args, procs=procs, cpus=cpus, job_name=job_name, log_dir=log_dir, repo=repo, config=config)
    if args.dry_run:
        print(text, end="")
        return 0
    script = os.path.abspath(args.script or os.path.join(log_dir, "job.sbatch"))
    os.makedirs(log_dir, exist_ok=True)  # Slurm does not create the log directory; a missing one fails the job
    os.makedirs(os.path.dirname(script), exist_ok=True)
    with open(script, "w") as f:
        f.write(text)
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print(f"mssr launch: error: sbatch is not on PATH (not a SLURM login node?); the script was written to "
              f"{script}: submit it with `sbatch {script}` where SLURM is available", file=sys.stderr)
        return 2
    done = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"mssr launch: error: sbatch {script} failed: {done.stderr.strip() or done.stdout.strip()}",
              file=sys.stderr)
        return 2
    job_id = done.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {job_name}, {args.nodes} node(s) x {procs} rank(s)")
    print(f"script: {script}")
    print(f"log: {log_dir}/{job_name}-{job_id}.out; run dir: {run_dir}")
    return 0


def _resolve_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m mssr_megatron.launch resolve",
                                     description="print the run and checkpoint directory of a config")
    parser.add_argument("--world-size", type=int, default=None, help="validate the config for this many ranks")
    parser.add_argument("--ranks-per-node", type=int, default=None,
                        help="with --world-size: also place the rollout engines for this many ranks per node")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node for the placement (0: CPU)")
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from mssr_megatron.config import ConfigError

    try:
        run_dir, ckpt_dir, cfg = run_dirs(args.config, args.overrides, args.world_size)
        if args.world_size and args.ranks_per_node:
            engine_placement(cfg, args.world_size // args.ranks_per_node, args.ranks_per_node, args.gpus_per_node)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"mssr: config error: {exc}", file=sys.stderr)
        return 2
    print(run_dir)
    print(ckpt_dir)
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The launcher as a program (tools/slurm_launch.py); bad input is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog=prog, description="write a SLURM batch script for a run config and submit it")
    add_launch_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # options may also follow the key=value overrides
    from mssr_megatron.config import ConfigError

    try:
        return run_launch(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if sys.argv[1:2] == ["resolve"]:
        sys.exit(_resolve_main(sys.argv[2:]))
    sys.exit(main(prog="python -m mssr_megatron.launch"))
