"""SLURM CPU binding and the model path of the published configs, without a cluster:
  * srun gets the job's CPUs (--cpus-per-task) in common.sh, which every batch script and every `mssr launch` script
    runs: a step that does not ask gets one CPU per task, and every rank, engine process and reward worker of the
    node would share one core;
  * `mssr launch` always asks sbatch for at least one core per training rank, reward worker and engine process;
  * the 7B/3B configs name a local placeholder path; the trainer refuses a hub id and a missing path, saying how."""

from __future__ import annotations

import os
import subprocess

import pytest

from mssr_megatron.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "examples", "configs")
TINY = os.path.join(CONFIGS, "tiny_cpu.yaml")


def srun_arguments(tmp_path, env: dict) -> list[str]:
    """The srun command line mssr_main (examples/slurm/common.sh) runs, with Slurm's commands replaced by stubs."""
    record = tmp_path / "srun.args"
    script = f"""
source {REPO}/examples/slurm/common.sh
scontrol() {{ echo node1; }}
mssr_resolve_dirs() {{ echo {tmp_path}/run; echo {tmp_path}/ckpt; }}
srun() {{ printf '%s\\n' "$@" > {record}; }}
mssr_main config.yaml
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", "-c", script], env={**clean, "NPROC_PER_NODE": "2", "TMPDIR": str(tmp_path),
                                                        "VENV": str(tmp_path / "none"), **env},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return record.read_text().splitlines()


@pytest.mark.parametrize("env, cpus", [
    ({"SLURM_CPUS_PER_TASK": "12", "SLURM_CPUS_ON_NODE": "96"}, "12"),  # the job's --cpus-per-task
    ({"SLURM_CPUS_ON_NODE": "20"}, "20"),  # no --cpus-per-task: every CPU allotted on the node
])
def test_srun_gets_the_node_cpus(tmp_path, env, cpus):
    args = srun_arguments(tmp_path, env)
    assert f"--cpus-per-task={cpus}" in args and args.index(f"--cpus-per-task={cpus}") < args.index("bash")


def _launch_script(capsys, *args: str, config: str = TINY) -> str:
    from mssr_megatron.launch import main

    assert main([config, "--dry-run", *args], prog="mssr launch") == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_launch_asks_for_a_core_per_rank_worker_and_engine_process(capsys, tmp_path):
    out = f"trainer.output_dir={tmp_path}/run"
    # tiny CPU job: 2 ranks + 3 reward workers, HF engine inside rank 0
    script = _launch_script(capsys, "--gpus-per-node", "0", "--procs-per-node", "2", "data.reward_workers=3", out)
    assert "#SBATCH --cpus-per-task=5" in script.splitlines()
    # the published 7B config: 8 ranks + 16 reward workers (shared by the node's engine hosts) + 8 SGLang engines
    # (engines: per_node, engine TP 1: one per GPU), each 1 scheduler + 1 detokenizer
    cfg = load_config(os.path.join(CONFIGS, "qwen2_5_vl_7b_mssr.yaml"))
    assert (cfg.data.reward_workers, cfg.rollout.engine, cfg.rollout.engine_tp_size) == (16, "sglang", 1)
    assert cfg.rollout.engines == "per_node"
    script = _launch_script(capsys, out, config=os.path.join(CONFIGS, "qwen2_5_vl_7b_mssr.yaml"))
    assert "#SBATCH --cpus-per-task=40" in script.splitlines()
    # one engine for the job: 8 + 16 + 2, as before engines were placed per node
    script = _launch_script(capsys, out, "rollout.engines=single",
                            config=os.path.join(CONFIGS, "qwen2_5_vl_7b_mssr.yaml"))
    assert "#SBATCH --cpus-per-task=26" in script.splitlines()
    # engines on the GPUs the trainer leaves: 4 ranks (TP 2 x DP 2) + 16 workers + 4 engines on GPUs 4..7
    script = _launch_script(capsys, out, "--procs-per-node", "4", "--skip-memory-plan",
                            "rollout.colocate=false", config=os.path.join(CONFIGS, "qwen2_5_vl_7b_mssr.yaml"))
    assert "#SBATCH --cpus-per-task=28" in script.splitlines()
    script = _launch_script(capsys, "--cpus-per-task", "96", out, config=os.path.join(CONFIGS, "qwen2_5_vl_7b_mssr.yaml"))
    assert "#SBATCH --cpus-per-task=96" in script.splitlines()


def test_launch_refuses_fewer_cpus_than_processes(capsys, tmp_path):
    from mssr_megatron.launch import main

    assert main([os.path.join(CONFIGS, "qwen2_5_vl_7b_mssr.yaml"), "--cpus-per-task", "8", "--dry-run",
                 f"trainer.output_dir={tmp_path}/run"], prog="mssr launch") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("mssr launch: error: --cpus-per-task 8 is fewer than the node's 40 processes (8 training ranks + "
                   "16 reward workers + 16 rollout-engine processes): they would share cores; pass --cpus-per-task 40 "
                   "or more (or lower data.reward_workers)")


def test_launch_refuses_engines_that_cannot_be_placed(capsys, tmp_path):
    from mssr_megatron.launch import main

    seven_b = os.path.join(CONFIGS, "qwen2_5_vl_7b_mssr.yaml")
    assert main([seven_b, "--dry-run", "rollout.colocate=false", f"trainer.output_dir={tmp_path}/run"],
                prog="mssr launch") == 2  # 8 ranks on 8 GPUs: no GPU left for an engine
    err = capsys.readouterr().err.strip()
    assert err.startswith("mssr launch: error: rollout.colocate=false puts the engines on GPUs the trainer does not "
                          "use, but 8 trainer ranks per node leave 0 of the node's 8 GPUs") and "--procs-per-node" in err
    assert main([seven_b, "--dry-run", "--procs-per-node", "4", "--skip-memory-plan", "rollout.colocate=false",
                 "rollout.engine_tp_size=8",
                 f"trainer.output_dir={tmp_path}/run"], prog="mssr launch") == 2
    assert "leave 4 of the node's 8 GPUs and an engine needs rollout.engine_tp_size=8" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b_mssr.yaml", "qwen2_5_vl_3b_mssr.yaml"])
def test_published_configs_name_a_local_placeholder(name):
    path = load_config(os.path.join(CONFIGS, name)).model.hf_path
    assert path.startswith("/path/to/Qwen2.5-VL-") and path.endswith("-Instruct")


@pytest.mark.parametrize("hf_path, expected", [
    ("Qwen/Qwen2.5-VL-7B-Instruct", "model.hf_path='Qwen/Qwen2.5-VL-7B-Instruct' looks like a Hugging Face hub id; "
     "download it on a machine with internet access (`huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct "
     "--local-dir DIR`, DIR on storage every node sees) and point model.hf_path at the local directory DIR"),
    ("/path/to/Qwen2.5-VL-7B-Instruct", "model.hf_path='/path/to/Qwen2.5-VL-7B-Instruct' has no config.json: point "
     "it at a local Hugging Face Qwen2.5-VL directory (the published configs hold a placeholder path to replace"),
])
def test_trainer_refuses_a_hub_id_or_missing_path(hf_path, expected):
    from mssr_megatron.train.run_context import load_hf_config

    with pytest.raises(FileNotFoundError) as info:
        load_hf_config(hf_path)
    assert str(info.value).startswith(expected)


def test_a_local_directory_named_like_a_hub_id_is_used(tmp_path, monkeypatch):
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir
    from mssr_megatron.train.run_context import load_hf_config

    build_tiny_model_dir(str(tmp_path / "Qwen" / "tiny"), seed=0)
    monkeypatch.chdir(tmp_path)
    assert load_hf_config("Qwen/tiny").model_type == "qwen2_5_vl"


def test_batch_scripts_place_the_engines_before_the_job_starts(capsys, tmp_path):
    """common.sh's mssr_resolve_dirs passes the node's ranks and GPUs: an impossible placement stops the job there."""
    from mssr_megatron.launch import _resolve_main

    seven_b = os.path.join(CONFIGS, "qwen2_5_vl_7b_mssr.yaml")
    out = f"trainer.output_dir={tmp_path}/run"
    shape = ["--world-size", "8", "--ranks-per-node", "8", "--gpus-per-node", "8"]
    assert _resolve_main([*shape, seven_b, out]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"{tmp_path}/run"
    assert _resolve_main([*shape, seven_b, out, "rollout.colocate=false"]) == 2
    assert "rollout.colocate=false puts the engines on GPUs the trainer does not use" in capsys.readouterr().err
    common = open(os.path.join(REPO, "examples", "slurm", "common.sh")).read()
    assert '--ranks-per-node "$NPROC_PER_NODE" --gpus-per-node "$MSSR_GPUS_PER_NODE"' in common
