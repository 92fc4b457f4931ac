"""The GPU smoke kit's checks (tools/gpu_smoke.py runs them): one process per check, so that a hung or crashed check
costs only its own time budget, and each starts with a clean CUDA context and no process group.

    python -m mssr_megatron.smoke CHECK --run-dir DIR --result FILE.json [--cpu]     (what tools/gpu_smoke.py runs)

A check is a function (SmokeOptions) -> dict with a one-line "figure" (the key number) and any details; it raises
SkipCheck(reason) when it cannot run here (a library not importable, no GPU), anything else means FAIL. GPU: the
Qwen2.5-VL-3B shape on cuda:0; --cpu: the same code at the tiny shape on the CPU (what CI runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class SkipCheck(Exception):
    """The check cannot run here; the message says why (reported as SKIPPED, never as a failure)."""


@dataclass
class SmokeOptions:
    cpu: bool
    """Run on the CPU at small shapes (CI) instead of cuda:0 at the 3B shape."""
    run_dir: str
    """Where the checks write their assets (model directories, data) and runs; reused by later checks."""
    repo: str
    """The project checkout (examples/ configs are read from it)."""

    @property
    def device(self):
        import torch

        return torch.device("cpu") if self.cpu else torch.device("cuda", 0)


@dataclass(frozen=True)
class Check:
    name: str
    function: str
    """module:function under mssr_megatron.smoke."""
    gpu_budget_s: int
    """Time limit of the check on a GPU node; the GPU budgets sum to 480 s (8 minutes)."""
    cpu_budget_s: int
    """Time limit with --cpu: a guard against hangs, several times what 2 free cores need (CI machines are shared)."""
    what: str


CHECKS = (
    Check("parity", "model_checks:check_parity", 90, 240,
          "Megatron vs transformers logits in fp32 and bf16 (3B shape of examples/model_configs, random)"),
    Check("config_3b", "model_checks:check_config_3b", 15, 120,
          "the shipped 3B config.json: published parameter count"),
    Check("logprob_op", "model_checks:check_logprob_op", 20, 120, "fused log-prob + entropy op vs the unfused one"),
    Check("rl_steps", "run_checks:check_rl_steps", 70, 360, "3 RL steps of the tiny default (trainer.train)"),
    Check("hf_engine", "run_checks:check_hf_engine", 35, 240, "HF engine generation + verified weight sync"),
    Check("bench", "bench_check:check_bench", 150, 360, "mssr bench: 3B shape, prompt 1024 / response 1024, MFU"),
    Check("transformer_engine", "optional_checks:check_transformer_engine", 30, 120,
          "Transformer Engine layer spec logits vs transformers"),
    Check("sglang", "optional_checks:check_sglang", 35, 120, "SGLang engine generation + verified weight sync"),
    Check("vllm", "optional_checks:check_vllm", 35, 120, "vLLM engine generation + verified weight sync"),
)


def check_function(check: Check):
    import importlib

    module, function = check.function.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
