"""The GPU smoke kit (tools/gpu_smoke.py): `--cpu` end to end as CI runs it, plus its time budgets, result statuses,
the GPU-mode refusal without CUDA and the wheel folder's install list."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mssr_megatron.smoke import CHECKS, SkipCheck
from mssr_megatron.smoke import wheels

ROOT = Path(__file__).resolve().parents[1]


def _kit():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "tools" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_kit_passes_every_check_or_skips_with_a_reason(tmp_path):
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_smoke.py"), "--cpu", "--run-dir",
                           str(tmp_path / "run"), "--report", str(report_path)], capture_output=True, text=True,
                          timeout=2400)
    assert report_path.is_file(), proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    failed = {name: c["figure"] for name, c in checks.items() if c["status"] not in ("PASS", "SKIPPED")}
    assert not failed and proc.returncode == 0, (failed, proc.stdout[-3000:])
    assert list(checks) == [c.name for c in CHECKS]
    for check in checks.values():
        assert check["figure"], check
        if check["status"] == "SKIPPED":
            assert check["reason"], check
    # one printed line per check, starting with its status
    lines = [line for line in proc.stdout.splitlines() if line.split()[:1] in (["PASS"], ["SKIPPED"], ["FAIL"])]
    assert [line.split()[1] for line in lines] == list(checks)
    # the figures say what was checked
    for name in ("parity", "config_3b", "logprob_op", "rl_steps", "hf_engine", "bench"):
        assert checks[name]["status"] == "PASS", checks[name]
    parity = checks["parity"]["details"]
    assert parity["rel_l2_megatron_bf16"] <= parity["limit"] and parity["rel_l2_megatron_fp32"] <= 1e-4
    bench = checks["bench"]["details"]
    assert bench["mfu"] > 0
    assert bench["mean_response_tokens"] == 16  # the bench model never ends a response early
    assert all(90 <= n <= 96 for n in bench["prompt_lengths"])  # padded to about the bench prompt length (96)


def test_a_check_over_its_budget_is_killed_and_reported_as_a_failure(tmp_path):
    kit = _kit()
    slow = dataclasses.replace(CHECKS[0], cpu_budget_s=1)
    for sub in ("results", "logs"):
        (tmp_path / sub).mkdir()
    args = kit.parse_args(["--cpu"])
    result = kit.run_check(slow, args, str(tmp_path))
    assert result["status"] == "FAIL" and "over its 1 s budget" in result["figure"]
    assert result["seconds"] < 30


@pytest.mark.parametrize("raised,status", [(SkipCheck("no widget here"), "SKIPPED"),
                                           (AssertionError("logits differ"), "FAIL")])
def test_the_worker_reports_skips_and_failures(tmp_path, monkeypatch, raised, status):
    import mssr_megatron.smoke as smoke
    from mssr_megatron.smoke.__main__ import main

    def check(opts):
        raise raised

    monkeypatch.setattr(smoke, "check_function", lambda c: check)
    main(["logprob_op", "--cpu", "--run-dir", str(tmp_path), "--result", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["status"] == status and str(raised) in result["figure"] and result["name"] == "logprob_op"
    assert ("traceback" in result) == (status == "FAIL")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_without_cuda_refuses_with_a_clear_error(capsys):
    assert _kit().main(["--run-dir", "unused"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_the_wheel_folder_installs_only_what_is_missing_and_never_torch():
    assert wheels.missing(("torch==0.0", "no-such-distribution-here==1.0")) == ["no-such-distribution-here==1.0"]
    names = {r.split("==")[0] for r in wheels.WHEELS}
    assert "megatron-core" in names and not names & {"torch", "transformers", "triton"}
    assert sum(c.gpu_budget_s for c in CHECKS) <= 480  # the kit fits 8 minutes on a GPU
