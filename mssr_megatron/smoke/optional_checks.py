"""Smoke checks of the optional GPU libraries, each SKIPPED (with the reason) where the library is not importable or
there is no CUDA device: Transformer Engine (the TE layer spec's logits against transformers), SGLang and vLLM
(the project's engine wrapper: generation, a weight sync, generation again). GPU-only: not run (no GPU was available);
on this project's CPU machines every one of them is skipped."""

from __future__ import annotations

import importlib
import importlib.util

from mssr_megatron.smoke import SkipCheck, SmokeOptions

TE_LAYERS = 4  # enough to compare the spec, short enough for the time budget


def _require(module: str, opts: SmokeOptions):
    """Import `module` or raise SkipCheck saying why it cannot be used here."""
    if importlib.util.find_spec(module) is None:
        raise SkipCheck(f"{module} is not installed")
    import torch

    if opts.cpu or not torch.cuda.is_available():
        raise SkipCheck(f"{module} needs a CUDA GPU" + (" (--cpu run)" if opts.cpu else ""))
    try:
        return importlib.import_module(module)
    except Exception as exc:  # an installed library that cannot load here (driver, ABI, torch version)
        raise SkipCheck(f"{module} is installed but does not import: {type(exc).__name__}: {exc}") from None


def check_transformer_engine(opts: SmokeOptions) -> dict:
    """model_checks.logit_parity with model.transformer_impl=transformer_engine (fp32 and bf16 against transformers
    in fp32), on the smoke shape cut to TE_LAYERS layers."""
    te = _require("transformer_engine", opts)
    from mssr_megatron.smoke.model_checks import logit_parity, smoke_hf_config

    out = logit_parity(opts, smoke_hf_config(opts, num_layers=TE_LAYERS), transformer_impl="transformer_engine")
    out["figure"] = f"TE {getattr(te, '__version__', '?')}: {out['figure']}"
    return out


def _check_engine(opts: SmokeOptions, name: str) -> dict:
    """The project's `name` engine on the tiny model: seeded generation, then a weight sync from a Megatron model
    (unverified: these engines report no checksums), then generation again."""
    lib = _require(name, opts)
    from mssr_megatron.config import RolloutConfig
    from mssr_megatron.rollout.factory import build_engine
    from mssr_megatron.rollout.protocol import SamplingParams
    from mssr_megatron.smoke.run_checks import _requests, sync_changed_weights, tiny_assets

    paths = tiny_assets(opts)
    engine = build_engine(RolloutConfig(engine=name, mem_fraction=0.3), paths["model"])
    try:
        from mssr_megatron.models.processor import load_processor

        requests = _requests(paths, load_processor(paths["model"]), 4)
        sampling = SamplingParams(temperature=1.0, max_new_tokens=12, seed=1)
        first = engine.generate(requests, sampling)
        if any(r.finish_reason == "error" for r in first):
            raise AssertionError(f"{name} generation failed: {[r.error for r in first]}")
        # SGLang and vLLM report no per-weight checksums (sync_weights refuses verify=True for them): the check is
        # that generation still works after the sync
        sync = sync_changed_weights(opts, paths, engine, verify=False)
        after = engine.generate(requests, sampling)
        if any(r.finish_reason == "error" for r in after):
            raise AssertionError(f"{name} generation after the weight sync failed: {[r.error for r in after]}")
    finally:
        engine.shutdown()
    tokens = sum(len(r.response_ids) for r in first)
    return dict(figure=f"{name} {getattr(lib, '__version__', '?')}: {len(first)} rollouts ({tokens} tokens); sync "
                       f"{sync['sync/bytes'] / 1e6:.1f} MB ({sync['sync/gb_per_s']:.2f} GB/s)", sync=sync)


def check_sglang(opts: SmokeOptions) -> dict:
    return _check_engine(opts, "sglang")


def check_vllm(opts: SmokeOptions) -> dict:
    return _check_engine(opts, "vllm")
