"""A real single-node SLURM cluster for a test: munged, slurmctld and slurmd from Debian's packages, all private.

    with SlurmCluster.start(cpus=2) as cluster:
        job = cluster.sbatch(["job.sbatch", "arg"], cwd=repo)
        cluster.wait(job, lambda info: info["JobState"] == "COMPLETED", timeout=120)

Nothing outside one temporary directory is touched: the config is passed through SLURM_CONF (`cluster.env`), munged
gets its own key and socket, the daemons their own ports, spool and state directories. They are stopped by PID.
Settings that make the test fast: MinJobAge keeps finished jobs visible to `scontrol show job` (there is no
accounting database for sacct), cred_expire=5 shortens the wait of a requeued job (Slurm's default is 120 s),
sched_interval/bf_interval=1 start an eligible job within a second instead of at the next minute's pass.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo")
SBIN = ("/usr/sbin", "/sbin")

CONF = """\
ClusterName=mssrtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=86400
MailProg=/bin/true
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmdSpoolDir={root}/spool/slurmd
StateSaveLocation={root}/spool/slurmctld
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_reason() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    if os.geteuid() != 0:
        return "starting SLURM daemons needs root"
    absent = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if absent:
        return (f"SLURM/munge not installed ({', '.join(absent)} missing): "
                "apt-get install slurmctld slurmd slurm-client munge")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (installed by Debian's munge package)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class SlurmCluster:
    def __init__(self, root: str, host: str):
        self.root, self.host = root, host
        self.env = {**os.environ, "SLURM_CONF": os.path.join(root, "slurm.conf")}
        for key in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k != "SLURM_CONF"]:
            del self.env[key]  # a test run inside a SLURM job must not leak that job's settings

    # -- lifecycle ------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, cpus: int | None = None, timeout: float = 30.0) -> SlurmCluster:
        root = tempfile.mkdtemp(prefix="mssr-slurm-")
        os.chmod(root, 0o755)  # munged runs as the munge user and must reach its socket directory
        cluster = cls(root, socket.gethostname().split(".")[0])
        try:
            cluster._write_files(cpus or os.cpu_count() or 1)
            cluster._start_daemons(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _write_files(self, cpus: int) -> None:
        for sub in ("spool/slurmd", "spool/slurmctld", "log"):
            os.makedirs(os.path.join(self.root, sub))
        munge_dir = os.path.join(self.root, "munge")
        os.makedirs(munge_dir)
        key = os.path.join(munge_dir, "munge.key")
        with open(key, "wb") as f:
            f.write(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        user = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chmod(munge_dir, 0o711)  # munged insists that every client can traverse to the socket
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write(CONF.format(root=self.root, host=self.host, cpus=cpus, ctld_port=_free_port(),
                                slurmd_port=_free_port()))

    def _start_daemons(self, timeout: float) -> None:
        m = os.path.join(self.root, "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged"), f"--socket={m}/munge.socket",
                        f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                        f"--seed-file={m}/munged.seed"], check=True, env=self.env, capture_output=True)
        conf = self.env["SLURM_CONF"]
        subprocess.run([_which("slurmctld"), "-f", conf], check=True, env=self.env, capture_output=True)
        subprocess.run([_which("slurmd"), "-f", conf], check=True, env=self.env, capture_output=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not come up in {timeout:.0f}s (sinfo: {state!r}); "
                           f"logs: {self.root}/log, {m}/munged.log")

    def stop(self) -> None:
        """Cancel every job, stop the daemons by their PIDs, remove the directory."""
        if os.path.exists(os.path.join(self.root, "slurmctld.pid")):
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for pid_file in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = os.path.join(self.root, pid_file)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                pid = int(f.read().strip() or 0)
            if pid > 0 and _alive(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.time() + 15
                while _alive(pid) and time.time() < deadline:
                    time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, cwd: str | None = None, env: dict | None = None):
        done = subprocess.run([_which(cmd[0]), *cmd[1:]], capture_output=True, text=True, cwd=cwd,
                              env={**self.env, **(env or {})})
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def sbatch(self, args: list[str], cwd: str, env: dict | None = None) -> str:
        return self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, Reason, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: str, until, timeout: float, every: float = 1.0) -> dict[str, str]:
        """Poll the job until `until(info)` holds; a job that ended otherwise raises with its state."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if info["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                raise AssertionError(f"job {job_id} ended {info['JobState']} (exit {info.get('ExitCode')})")
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info['JobState']} ({info.get('Reason')}) after {timeout}s")
            time.sleep(every)
