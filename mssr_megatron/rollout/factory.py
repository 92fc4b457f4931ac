"""Engine construction from the config, and the one object that decides where memory lives on shared GPUs.

    engine = build_engine(cfg)                     # RunConfig (model dir from model.hf_path) or RolloutConfig + dir
    colocation = Colocation.from_config(cfg, engine)
    with colocation.training():                    # engine weights + KV cache released while the trainer runs
        actor.train_step(...)
    engine.update_weights(buckets)                 # memory is back; then generate

The loop never branches on offload flags (ARCHITECTURE.md, "Contracts"): with `rollout.colocate: false` the same
`training()` block simply does nothing. Engine modules are imported only when chosen, so neither SGLang nor vLLM is
needed unless the config names it.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

from mssr_megatron.config import ConfigError, RolloutConfig, RunConfig

#: rollout.engine -> (module, class). Imported lazily: each module imports its engine library only when built.
ENGINES = {
    "hf": ("mssr_megatron.rollout.hf_engine", "HFEngine"),
    "sglang": ("mssr_megatron.rollout.sglang_engine", "SGLangEngine"),
    "vllm": ("mssr_megatron.rollout.vllm_engine", "VLLMEngine"),
}


def _rollout_config(cfg: RunConfig | RolloutConfig) -> RolloutConfig:
    return cfg.rollout if isinstance(cfg, RunConfig) else cfg


def build_engine(cfg: RunConfig | RolloutConfig, model_dir=None, **engine_kwargs):
    """The rollout engine named by `rollout.engine`, serving the HF checkpoint in `model_dir` (default: the run's
    `model.hf_path`). HF: `HFEngine(model_dir, **engine_kwargs)` (dtype, device, ...); SGLang/vLLM:
    `Engine(model_dir, rollout_cfg, **engine_kwargs)` (their TP size, memory fraction and colocation come from the
    config)."""
    rollout = _rollout_config(cfg)
    if model_dir is None:
        model_dir = cfg.model.hf_path if isinstance(cfg, RunConfig) else None
    if model_dir is None:
        raise ConfigError("build_engine needs a model directory: set model.hf_path or pass model_dir")
    if rollout.engine not in ENGINES:
        raise ConfigError(f"rollout.engine must be one of {sorted(ENGINES)}, got {rollout.engine!r}")
    module_name, class_name = ENGINES[rollout.engine]
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    if rollout.engine == "hf":
        return engine_cls(model_dir, **engine_kwargs)
    return engine_cls(model_dir, rollout, **engine_kwargs)


class Colocation:
    """Where the engine's memory is while the trainer runs: released on entering `training()` and resumed on leaving
    it (also when the block raises, so that a caller handling the error finds a usable engine). Disabled (no-ops)
    when training and rollout do not share GPUs."""

    def __init__(self, engine, enabled: bool = True):
        self.engine = engine
        self.enabled = enabled
        self._training = False

    @classmethod
    def from_config(cls, cfg: RunConfig | RolloutConfig, engine) -> "Colocation":
        return cls(engine, enabled=_rollout_config(cfg).colocate)

    @property
    def in_training(self) -> bool:
        return self._training

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        if self._training:
            raise RuntimeError("Colocation.training() is not re-entrant: the engine's memory is already released")
        self._training = True
        try:
            if self.enabled:
                self.engine.release_memory()
            try:
                yield
            finally:
                if self.enabled:
                    self.engine.resume_memory()
        finally:
            self._training = False
