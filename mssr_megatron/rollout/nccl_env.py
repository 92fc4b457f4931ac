"""NCCL settings that a served rollout engine changes in its own process, set on EVERY rank before any communicator.

SGLang 0.5.23 (`srt/entrypoints/engine.py: _set_envs_and_config`, run when `sglang.Engine` starts) sets
NCCL_CUMEM_ENABLE and NCCL_NVLS_ENABLE in the process that starts it, unless already set; vLLM sets
NCCL_CUMEM_ENABLE=0 when `vllm` is imported (`vllm/env_override.py`), unless already set to a non-zero value. Only the
rank that owns an engine runs that code, so its NCCL communicators created afterwards (NCCL reads the variables per
communicator) would use another memory mode than the other ranks' (cuMem vs. legacy buffers, NVLink SHARP on or off):
a mismatch that hangs or fails collectives. `set_engine_nccl_env` gives every rank the values the engine would set,
before torch.distributed starts (`run_context.build_context`). A value the environment already holds is kept, as both
engines keep it (a job that exports it exports it to every rank).

The values are what those engines set for the arguments this project starts them with (`sglang_engine_kwargs`:
no symmetric memory, no NVLS, no KV-cache sharding); tests/test_nccl_env.py runs SGLang's own code to check them.
"""

from __future__ import annotations

import os
from typing import MutableMapping

#: Per engine: the NCCL variables it sets in its own process, with the value it sets for this project's arguments.
ENGINE_NCCL_ENV: dict[str, dict[str, str]] = {
    "sglang": {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"},
    "vllm": {"NCCL_CUMEM_ENABLE": "0"},
}


def set_engine_nccl_env(engine: str, environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the NCCL variables `engine` (rollout.engine) would set in its own rank, where not set already; return the
    values now in effect. Engines that change no NCCL setting (hf) set nothing. Call it on every rank before
    torch.distributed or any engine starts."""
    for name, value in ENGINE_NCCL_ENV.get(engine, {}).items():
        environ.setdefault(name, value)
    return {name: environ[name] for name in ENGINE_NCCL_ENV.get(engine, {})}
