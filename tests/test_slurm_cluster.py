"""SLURM jobs on a real single-node cluster (tests/slurm_cluster.py): a job written by the launcher trains to the end;
a job from examples/slurm is preempted with SIGUSR1 to its batch shell, checkpoints, requeues itself and resumes
exactly where it stopped. Skipped without root or without Debian's slurmctld/slurmd/slurm-client/munge (CI installs
them, see .ci/run). The launcher's script rendering and its errors are checked without a cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from slurm_cluster import SlurmCluster, missing_reason
from trainer_assets import build_assets, overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "examples", "configs", "tiny_cpu.yaml")
RANKS = 2  # two training processes (torchrun, gloo): data parallel 2
# CI installs SLURM and sets MSSR_REQUIRE_SLURM=1 (.ci/run): there a missing cluster fails the tests instead of
# skipping them, so that CI cannot turn green without having run them.
REQUIRED = os.environ.get("MSSR_REQUIRE_SLURM") == "1"
needs_slurm = pytest.mark.skipif(missing_reason() is not None and not REQUIRED, reason=str(missing_reason()))


@pytest.fixture(scope="module")
def cluster():
    if missing_reason() is not None:  # only reached when REQUIRED
        pytest.fail(f"MSSR_REQUIRE_SLURM=1 but no cluster can start: {missing_reason()}")
    with SlurmCluster.start() as c:
        yield c


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(str(tmp_path_factory.mktemp("slurm_assets")))


def _steps(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def _complete_checkpoint(run_dir, step: int) -> bool:
    return os.path.exists(os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "COMPLETE"))


def _job_log(log_dir) -> str:
    (name,) = [n for n in os.listdir(log_dir) if n.endswith(".out")]
    with open(os.path.join(log_dir, name)) as f:
        return f.read()


def _cpus() -> int:
    return min(os.cpu_count() or RANKS, 4)


@pytest.mark.slow
@needs_slurm
def test_launched_job_trains_to_the_end(cluster, assets, tmp_path):
    run_dir = tmp_path / "run"
    launch = subprocess.run(
        [sys.executable, "tools/slurm_launch.py", CONFIG, "--gpus-per-node", "0", "--procs-per-node", str(RANKS),
         "--cpus-per-task", str(_cpus()), "--time", "20:00", "--signal-lead", "60",
         *overrides(assets, str(run_dir), "logging.tensorboard=false")],
        cwd=REPO, env=cluster.env, capture_output=True, text=True)
    assert launch.returncode == 0, launch.stderr
    job = re.search(r"submitted job (\d+)", launch.stdout).group(1)
    assert os.path.isfile(run_dir / "slurm" / "job.sbatch")

    info = cluster.wait(job, lambda i: i["JobState"] == "COMPLETED", timeout=240)
    log = _job_log(run_dir / "slurm")
    assert info["Restarts"] == "0" and info["ExitCode"] == "0:0", log[-3000:]
    assert f"1 node(s) x {RANKS} rank(s)" in log and "training step finished with exit status 0" in log
    assert _steps(run_dir) == [0, 1, 2]  # validation before training, then two RL steps
    assert _complete_checkpoint(run_dir, 2)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
@needs_slurm
def test_preempted_job_requeues_and_resumes(cluster, assets, tmp_path):
    run_dir, log_dir, total = tmp_path / "run", tmp_path / "logs", 20  # steps take ~1 s
    log_dir.mkdir()
    job = cluster.sbatch(
        [f"--cpus-per-task={_cpus()}", "--gpus-per-node=0", "--time=30", f"--output={log_dir}/%x-%j.out",
         "examples/slurm/train_single_node.sbatch", CONFIG,
         *overrides(assets, str(run_dir), f"trainer.total_steps={total}", "trainer.val_every=0",
                    "logging.tensorboard=false")],
        cwd=REPO, env={"NPROC_PER_NODE": str(RANKS), "PYTHON": sys.executable})

    deadline = time.time() + 240  # preempt once step 1 is logged: the trainer is then inside step 2
    while not (os.path.exists(run_dir / "metrics.jsonl") and 1 in _steps(run_dir)):
        assert time.time() < deadline, f"no step logged: {cluster.job(job)}"
        cluster.job(job)  # raises if the job record is gone
        time.sleep(0.5)
    # What `#SBATCH --signal=B:USR1@T` does before the time limit: SIGUSR1 to the batch shell only.
    cluster.run("scancel", "--batch", "--signal=USR1", job)

    requeued = time.time()
    cluster.wait(job, lambda i: i["Restarts"] == "1", timeout=240)
    info = cluster.wait(job, lambda i: i["JobState"] == "COMPLETED", timeout=300)
    print(f"requeue to completion: {time.time() - requeued:.0f}s")
    log = _job_log(log_dir)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", log[-3000:]

    assert "received SIGUSR1" in log and "SIGUSR1 sent to the training ranks" in log
    stopped = re.search(r'trainer stopped for preemption: \{"step": (\d+), "signal": "SIGUSR1"\}', log)
    assert stopped, log[-3000:]
    cut = int(stopped.group(1))
    assert 1 <= cut < total
    assert f"signal SIGUSR1: saving a checkpoint at step {cut}" in log
    assert "requeueing job" in log and "attempt 2:" in log
    assert re.search(rf"resumed from \S+step_{cut:06d} at step {cut}", log), log[-3000:]
    assert _steps(run_dir) == list(range(total + 1))  # every step exactly once across both attempts
    assert _complete_checkpoint(run_dir, total)
    assert not os.path.exists(run_dir / "PREEMPTED")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == total


# -- the launcher without a cluster ------------------------------------------------------------------------------


def _launch(*args: str):
    from mssr_megatron.launch import main

    return main([CONFIG, *args], prog="mssr launch")


def test_dry_run_prints_the_job(capsys, tmp_path):
    assert _launch("--nodes", "2", "--partition", "gpu", "--account", "proj", "--sbatch=--qos=high",
                   "--env", "NCCL_SOCKET_IFNAME=ib0", "--time", "2-00:00:00", "--dry-run",
                   "parallel.micro_batch_size=2", f"trainer.output_dir={tmp_path}/run") == 0  # DP 16 x 2 = 32
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --qos=high", "#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@600",
                 f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out", "export NPROC_PER_NODE=8",
                 "export NCCL_SOCKET_IFNAME=ib0", f"export MSSR_REPO={REPO}", 'source "$MSSR_REPO/examples/slurm/common.sh"',
                 f"mssr_main {CONFIG} parallel.micro_batch_size=2"):
        assert line in script, line
    assert not os.path.exists(tmp_path / "run")  # a dry run writes nothing


def test_bad_input_is_one_line(capsys, tmp_path):
    out = f"trainer.output_dir={tmp_path}/run"
    assert _launch("--gpus-per-node", "0", out, "--dry-run") == 2
    assert "needs --procs-per-node" in capsys.readouterr().err
    assert _launch("--gpus-per-node", "3", out, "--dry-run") == 2  # 64 rollouts, mini-batch 32: DP 3 cannot split it
    assert "data-parallel size 3" in capsys.readouterr().err
    assert _launch("--time", "5", out, "--dry-run") == 2  # 5 minutes < the 600 s preemption notice
    assert "--signal-lead" in capsys.readouterr().err


def test_without_sbatch_the_script_is_kept(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert _launch("--gpus-per-node", "0", "--procs-per-node", "2", f"trainer.output_dir={tmp_path}/run") == 2
    err = capsys.readouterr().err
    assert "sbatch is not on PATH" in err and f"{tmp_path}/run/slurm/job.sbatch" in err
    assert "mssr_main" in (tmp_path / "run" / "slurm" / "job.sbatch").read_text()
