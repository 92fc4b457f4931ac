"""Engine construction from the config, and the one object that decides where memory lives on shared GPUs.

    engine = build_engine(cfg)                     # RunConfig (model dir from model.hf_path) or RolloutConfig + dir
    colocation = Colocation.from_config(cfg, engine)
    colocation.release()                           # at start-up, once the engine has sized itself on an empty GPU
    with colocation.training():                    # engine weights + KV cache released while the trainer runs
        actor.token_logprobs(...); actor.train_step(...)
    with colocation.weight_update():               # engine weights resumed; KV cache resumed when the sync is done
        sync_weights(..., engine, ...)
    engine.generate(...)

The loop never branches on offload flags (ARCHITECTURE.md, "Contracts"): with `rollout.colocate: false`, or on a
rank without an engine, the same blocks simply do nothing. Engine modules are imported only when chosen, so neither
SGLang nor vLLM is needed unless the config names it.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch

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
    """What the engine holds on the device while training and rollout share it (`protocol.RolloutEngine` memory calls).

    States: serving (weights + KV cache) -> `training()` releases both -> `weight_update()` resumes the weights (the
    sync then fills them: released weights are not kept) and, when its block ends, the KV cache, so that the sync's
    buckets find room. Each call acts only when the engine is in the state it expects, so the engine never gets a
    resume for memory it holds (SGLang raises on that). Disabled (no calls at all) when training and rollout do not
    share GPUs or when this rank has no engine.
    """

    def __init__(self, engine, enabled: bool = True):
        self.engine = engine
        self.enabled = enabled and engine is not None
        self.state = "serving"  # what the engine holds: "serving" (all), "weights" (no KV cache) or "released"
        self._training = False

    @classmethod
    def from_config(cls, cfg: RunConfig | RolloutConfig, engine) -> "Colocation":
        return cls(engine, enabled=_rollout_config(cfg).colocate)

    def release(self) -> None:
        """Free the engine's weights and KV cache (a no-op when already released)."""
        if self.enabled and self.state != "released":
            self.engine.release_memory()
            self.state = "released"

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """The trainer's phase (log-probs, updates): the engine's memory is released on entering. It stays released
        after the block (also when it raises) until `weight_update()`."""
        if self._training:
            raise RuntimeError("Colocation.training() is not re-entrant: the engine's memory is already released")
        self.release()
        self._training = True
        try:
            yield
        finally:
            self._training = False

    @contextlib.contextmanager
    def weight_update(self) -> Iterator[None]:
        """The weight sync: the engine's weights are resumed on entering (empty: the block must fill them) and its
        KV cache when the block ends (not when it raises: the engine's weights are incomplete then). With the engine
        serving already, nothing is resumed."""
        if self.enabled and self.state == "released":
            if torch.cuda.is_available():  # GPU-only: not run (no GPU was available)
                torch.cuda.empty_cache()  # the trainer's cached free blocks back to the driver, for the engine
            self.engine.resume_memory(["weights"])
            self.state = "weights"
        yield
        if self.enabled and self.state == "weights":
            self.engine.resume_memory(["kv_cache"])
            self.state = "serving"
