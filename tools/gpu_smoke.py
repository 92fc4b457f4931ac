#!/usr/bin/env python
"""GPU smoke kit: one command that shows, in at most 8 minutes on one H100/H200, that the project works on that node.

    python tools/gpu_smoke.py --make-wheels wheels/         # on a machine with internet: the wheel folder (~20 MB)
    python tools/gpu_smoke.py --wheels wheels/              # on the GPU node (no internet): install what is missing,
                                                            # then run every check on cuda:0
    python tools/gpu_smoke.py --cpu                         # the same checks at small shapes on the CPU (CI)

The node needs Python 3.12 with a CUDA build of torch and transformers 5; megatron-core, math-verify, tensorboard,
... come from the wheel folder (mssr_megatron/smoke/wheels.py; never torch). Checks (mssr_megatron/smoke), each in
its own process with its own time budget (the GPU budgets add up to 8 minutes):
  parity              Megatron vs transformers logits in fp32 and bf16, Qwen2.5-VL-3B shape (examples/model_configs)
  config_3b           the shipped 3B config.json builds the published parameter count
  logprob_op          the fused log-prob + entropy op vs log_softmax/gather/entropy, values and gradients
  rl_steps            3 RL steps of the tiny default (examples/configs/tiny_cpu.yaml) with trainer.device=cuda
  hf_engine           HF engine generation and a weight sync with verify=True
  bench               `mssr bench` at the 3B shape, prompt 1024 / response 1024: MFU
  transformer_engine, sglang, vllm   where importable (SKIPPED with the reason where not)
One line per check (PASS / FAIL / SKIPPED, seconds, the key figure), a JSON report (--report, default
<run dir>/gpu_smoke.json), exit status 1 if any check FAILs. Logs of each check: <run dir>/logs/<check>.log.
The GPU path is GPU-only: not run (no GPU was available); --cpu is what CI runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mssr_megatron.smoke import CHECKS  # noqa: E402  (no torch import: the wheels may not be installed yet)
from mssr_megatron.smoke import wheels  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="small shapes on the CPU (what CI runs)")
    p.add_argument("--wheels", metavar="DIR", help="install missing dependencies from this wheel folder first")
    p.add_argument("--make-wheels", metavar="DIR", help="download the wheel folder (needs internet) and exit")
    p.add_argument("--python-version", default="3.12", help="--make-wheels: the node's Python (default 3.12)")
    p.add_argument("--platform", action="append", default=None,
                   help="--make-wheels: the node's wheel platform tags, repeatable (default x86-64 manylinux; e.g. "
                        "manylinux_2_28_aarch64 for a GH200 node)")
    p.add_argument("--run-dir", default=None, help="assets, runs and logs (default runs/gpu_smoke/<time>)")
    p.add_argument("--report", default=None, help="JSON report (default <run dir>/gpu_smoke.json)")
    p.add_argument("--only", default=None, help="comma-separated check names (default: all)")
    return p.parse_args(argv)


def environment(cpu: bool) -> dict:
    """Versions and the device; an error message (str) when the node cannot run the kit."""
    import importlib.metadata as md

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "mode": "cpu" if cpu else "gpu"}
    for dist in ("transformers", "megatron-core", "transformer-engine", "sglang", "vllm"):
        try:
            env[dist] = md.version(dist)
        except md.PackageNotFoundError:
            env[dist] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if not cpu and not torch.cuda.is_available():
        env["error"] = ("torch finds no CUDA device (torch.cuda.is_available() is False): run on a GPU node with a "
                        "CUDA build of torch, or pass --cpu")
    elif int((env["transformers"] or "0").split(".")[0]) < 5:
        env["error"] = (f"transformers {env['transformers']} is installed; the project needs transformers 5 "
                        "(install it from the cluster wheelhouse, tools/make_wheelhouse.sh)")
    elif env["megatron-core"] is None:
        env["error"] = "megatron-core is not installed: pass --wheels DIR (made with --make-wheels)"
    return env


def run_check(check, args, run_dir: str) -> dict:
    """Run one check in a child process within its budget; its result dict (FAIL on timeout or crash)."""
    budget = check.cpu_budget_s if args.cpu else check.gpu_budget_s
    result_path = os.path.join(run_dir, "results", f"{check.name}.json")
    log_path = os.path.join(run_dir, "logs", f"{check.name}.log")
    cmd = [sys.executable, "-m", "mssr_megatron.smoke", check.name, "--run-dir", run_dir, "--result", result_path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # own session: on timeout the whole group goes (engines and reward workers start processes of their own)
        proc = subprocess.Popen(cmd + (["--cpu"] if args.cpu else []), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    seconds = time.perf_counter() - start
    if rc is None:
        result = {"status": "FAIL", "figure": f"over its {budget} s budget (killed); see {log_path}"}
    elif not os.path.isfile(result_path):
        with open(log_path) as fh:
            tail = fh.read()[-400:].strip().replace("\n", " | ")
        result = {"status": "FAIL", "figure": f"the check process exited with {rc} and no result: ... {tail}"}
    else:
        with open(result_path) as fh:
            result = json.load(fh)
    result.update(name=check.name, what=check.what, budget_s=budget, seconds=round(seconds, 1), log=log_path)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.make_wheels:
        platforms = (*args.platform, "any") if args.platform else wheels.PLATFORMS
        files = wheels.make_wheels(args.make_wheels, REPO, args.python_version, platforms)
        size = wheels.folder_bytes(args.make_wheels) / 2**20
        print(f"{len(files)} files, {size:.1f} MiB in {args.make_wheels}: copy it to the GPU node and run "
              f"python tools/gpu_smoke.py --wheels {args.make_wheels}")
        return 0
    if args.wheels:
        installed = wheels.install_missing(args.wheels)
        print("installed from the wheel folder: " + (", ".join(installed) or "nothing (all present)"))
    env = environment(args.cpu)
    if "error" in env:
        print(f"gpu_smoke: error: {env['error']}", file=sys.stderr)
        return 2
    run_dir = os.path.abspath(args.run_dir or os.path.join(REPO, "runs", "gpu_smoke", time.strftime("%Y%m%d-%H%M%S")))
    for sub in ("results", "logs"):
        os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    selected = [c for c in CHECKS if args.only is None or c.name in args.only.split(",")]
    print(f"GPU smoke kit ({env['mode']}: {env.get('gpu', 'CPU')}; torch {env['torch']}, transformers "
          f"{env['transformers']}, megatron-core {env['megatron-core']}); run dir {run_dir}", flush=True)
    start, results = time.perf_counter(), []
    for check in selected:
        result = run_check(check, args, run_dir)
        results.append(result)
        print(f"{result['status']:<7} {check.name:<18} {result['seconds']:6.1f} s  {result['figure']}", flush=True)
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIPPED")}
    report = {"schema": "mssr-gpu-smoke/1", "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "environment": env, "run_dir": run_dir, "total_seconds": round(time.perf_counter() - start, 1),
              "budget_seconds": sum(r["budget_s"] for r in results), "counts": counts, "checks": results}
    report_path = args.report or os.path.join(run_dir, "gpu_smoke.json")
    os.makedirs(os.path.dirname(os.path.abspath(report_path)), exist_ok=True)
    with open(report_path, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIPPED']} skipped in "
          f"{report['total_seconds']:.0f} s (budget {report['budget_seconds']} s); report: {report_path}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
