"""Engine choice from the config, the colocation object, the served engines' shared request handling, and the vLLM
conversions (vLLM itself is never imported here: it is CUDA-only)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from mssr_megatron.config import ConfigError, RolloutConfig, RunConfig
from mssr_megatron.rollout.buckets import pack
from mssr_megatron.rollout.engine_common import BLOCK_BIAS, TokenPolicy, generate_isolated, request_error
from mssr_megatron.rollout.factory import ENGINES, Colocation, build_engine
from mssr_megatron.rollout.protocol import GenerationRequest, Rollout, SamplingParams
from mssr_megatron.rollout.vllm_engine import (
    WORKER_EXTENSION,
    bucket_rpc_args,
    from_vllm_completion,
    rebuild_bucket,
    to_vllm_sampling_kwargs,
    vllm_engine_kwargs,
)


class RecordingEngine:
    """Records the protocol calls it receives (and the arguments the factory built it with)."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.calls = args, kwargs, []

    def release_memory(self):
        self.calls.append("release")

    def resume_memory(self, tags=None):
        self.calls.append(f"resume {','.join(tags or ['all'])}")


@pytest.fixture
def fake_engine_modules(monkeypatch):
    """Point every engine name at a module holding RecordingEngine under the expected class name."""
    for key, (module_name, class_name) in ENGINES.items():
        module = types.ModuleType(module_name)
        setattr(module, class_name, type(class_name, (RecordingEngine,), {}))
        monkeypatch.setitem(sys.modules, module_name, module)


@pytest.mark.parametrize("engine", ["hf", "sglang", "vllm"])
def test_build_engine_picks_the_configured_class(fake_engine_modules, engine):
    cfg = RunConfig()
    cfg.rollout.engine = engine
    cfg.model.hf_path = "/models/tiny"
    built = build_engine(cfg, dtype="float32", device="cpu")
    assert type(built).__name__ == ENGINES[engine][1]
    if engine == "hf":
        assert built.args == ("/models/tiny",) and built.kwargs == {"dtype": "float32", "device": "cpu"}
    else:
        assert built.args == ("/models/tiny", cfg.rollout)


def test_build_engine_from_rollout_config_needs_a_model_dir(fake_engine_modules):
    with pytest.raises(ConfigError, match="model directory"):
        build_engine(RolloutConfig(engine="sglang"))
    assert build_engine(RolloutConfig(engine="sglang"), "/m").args[0] == "/m"
    bad = RolloutConfig()
    bad.engine = "trt"
    with pytest.raises(ConfigError, match="rollout.engine"):
        build_engine(bad, "/m")


def test_served_engines_fail_with_install_hint_without_their_library():
    """SGLang / vLLM cannot run here: building one says what to install (SGLang's source may be installed for the
    payload tests, but it does not import without its CUDA packages)."""
    import importlib.util

    from mssr_megatron.rollout.sglang_engine import SGLangEngine
    from mssr_megatron.rollout.vllm_engine import VLLMEngine

    if torch.cuda.is_available() or importlib.util.find_spec("vllm") is not None:
        pytest.skip("a serving library may be complete here: building an engine would start it")
    for cls, engine in ((SGLangEngine, "sglang"), (VLLMEngine, "vllm")):
        hint = rf"rollout.engine={engine} needs .* pip install 'mssr-megatron\[{engine}\]'"
        with pytest.raises(ImportError, match=hint):
            cls("/m", RolloutConfig(engine=engine), policy=TokenPolicy((), ()))


def test_colocation_releases_for_training_and_resumes_weights_then_kv_cache_around_the_sync():
    engine = RecordingEngine()
    colocation = Colocation.from_config(RolloutConfig(colocate=True), engine)
    colocation.release()  # start-up: the engine sized itself, the trainer's models come next
    colocation.release()  # already released: nothing to do
    assert engine.calls == ["release"]
    with colocation.weight_update():
        assert engine.calls[-1] == "resume weights"  # the sync fills resumed weights...
    assert engine.calls[-1] == "resume kv_cache"  # ...and the KV cache comes back after it
    with colocation.training():
        assert engine.calls[-1] == "release"
        with pytest.raises(RuntimeError, match="re-entrant"):
            with colocation.training():
                pass
    assert engine.calls[-1] == "release"  # still released after training: the sync resumes
    with pytest.raises(KeyError):
        with colocation.training():
            raise KeyError("boom")
    with pytest.raises(ValueError):
        with colocation.weight_update():
            raise ValueError("sync failed")  # weights incomplete: the KV cache is not resumed
    with colocation.weight_update():  # weights held already: only the KV cache is missing
        pass
    assert engine.calls == ["release", "resume weights", "resume kv_cache", "release", "resume weights",
                            "resume kv_cache"]
    with colocation.weight_update():  # serving: nothing to resume
        pass
    assert len(engine.calls) == 6


@pytest.mark.parametrize("how", ["colocate=false", "no engine on this rank"])
def test_colocation_disabled_or_without_engine_does_nothing(how):
    engine = RecordingEngine()
    cfg = RunConfig()
    cfg.rollout.colocate = how != "colocate=false"
    colocation = Colocation.from_config(cfg, engine if how == "colocate=false" else None)
    colocation.release()
    with colocation.training():
        pass
    with colocation.weight_update():
        pass
    assert engine.calls == []


# ------------------------------------------------------------------------------------ shared request handling


@pytest.mark.slow
def test_token_policy_matches_the_hf_engine(tmp_path):
    """SGLang and vLLM block and stop on exactly the ids the embedded engine does."""
    from mssr_megatron.models.tiny_hf import build_tiny_model_dir
    from mssr_megatron.rollout.hf_engine import HFEngine

    model_dir = build_tiny_model_dir(tmp_path / "tiny", seed=0)
    policy = TokenPolicy.from_model_dir(model_dir)
    engine = HFEngine(model_dir)
    assert list(policy.blocked_ids) == list(engine.blocked_ids) and list(policy.stop_ids) == engine.stop_token_ids
    assert policy.blocked_ids and policy.stop_ids


def _ok(request, k):
    return Rollout(request.request_id, k, [1], [2], [-0.1], "stop", "ok")


def test_generate_isolated_catches_bad_requests_before_the_batch(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    requests = [
        GenerationRequest("good", "<|image_pad|> q", [str(image)]),
        GenerationRequest("empty", "   "),
        GenerationRequest("missing", "<|image_pad|> q", [str(tmp_path / "nope.png")]),
        GenerationRequest("count", "<|image_pad|> q", []),
    ]
    batches = []

    def run(batch, positions):
        batches.append(positions)
        return [[_ok(r, k) for k in range(2)] for r in batch]

    out = generate_isolated(requests, SamplingParams(n=2), run)
    assert batches == [[0]]
    assert [(r.request_id, r.sample_index, r.finish_reason) for r in out] == [
        ("good", 0, "stop"), ("good", 1, "stop"), ("empty", 0, "error"), ("empty", 1, "error"),
        ("missing", 0, "error"), ("missing", 1, "error"), ("count", 0, "error"), ("count", 1, "error")]
    assert "empty prompt" in out[2].error and "not a file" in out[4].error and "placeholders" in out[6].error
    assert request_error(requests[0], SamplingParams(max_new_tokens=0)).startswith("max_new_tokens")


def test_generate_isolated_retries_a_failed_batch_request_by_request():
    requests = [GenerationRequest(name, "p") for name in ("a", "poison", "c")]
    calls = []

    def run(batch, positions):
        calls.append(positions)
        if any(r.request_id == "poison" for r in batch):
            raise RuntimeError("image could not be decoded")
        return [[_ok(r, 0)] for r in batch]

    out = generate_isolated(requests, SamplingParams(), run)
    assert calls == [[0, 1, 2], [0], [1], [2]]
    assert [r.finish_reason for r in out] == ["stop", "error", "stop"]
    assert "RuntimeError: image could not be decoded" in out[1].error and "'poison'" in out[1].error


# ------------------------------------------------------------------------------------------------- vLLM (CPU)


def test_vllm_sampling_kwargs():
    policy = TokenPolicy(blocked_ids=(3, 300), stop_ids=(2,))
    kw = to_vllm_sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.9, top_k=-1, max_new_tokens=64,
                                                stop=["</a>"], n=4, seed=9), policy=policy)
    assert kw == {"n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_tokens": 64, "logprobs": 0,
                  "include_stop_str_in_output": True, "stop": ["</a>"], "seed": 9, "stop_token_ids": [2],
                  "logit_bias": {3: BLOCK_BIAS, 300: BLOCK_BIAS}}
    assert to_vllm_sampling_kwargs(SamplingParams(top_k=5), seed=3)["top_k"] == 5
    assert to_vllm_sampling_kwargs(SamplingParams(top_k=5), seed=3)["seed"] == 3
    assert "seed" not in to_vllm_sampling_kwargs(SamplingParams())
    engine = vllm_engine_kwargs("/m", RolloutConfig(engine="vllm", engine_tp_size=4))
    assert engine["tensor_parallel_size"] == 4 and engine["enable_sleep_mode"] is True
    assert engine["logprobs_mode"] == "processed_logprobs" and engine["worker_extension_cls"] == WORKER_EXTENSION


def test_vllm_bucket_rpc_round_trip():
    tensors = [("a", torch.randn(3, dtype=torch.float32).to(torch.bfloat16)), ("b", torch.randn(2, 1, 2)),
               ("c", torch.tensor(7, dtype=torch.int64))]
    flat, metadata = bucket_rpc_args(pack(tensors))
    assert all(isinstance(x, (str, int, list)) for row in metadata for x in row)  # msgpack-able without pickle
    for (name, got), (_, want) in zip(rebuild_bucket(flat, metadata), tensors, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name


def test_vllm_completion_conversion():
    logprob = types.SimpleNamespace
    completion = types.SimpleNamespace(  # the attributes of vllm.outputs.CompletionOutput used
        token_ids=[11, 2], text="x", finish_reason="stop",
        logprobs=[{11: logprob(logprob=-0.5)}, {2: logprob(logprob=-0.25)}])
    r = from_vllm_completion(GenerationRequest("q", "p"), 1, completion, [5, 6])
    assert (r.prompt_ids, r.response_ids, r.response_logprobs, r.finish_reason) == ([5, 6], [11, 2], [-0.5, -0.25],
                                                                                    "stop")
    completion.finish_reason = "abort"
    r = from_vllm_completion(GenerationRequest("q", "p"), 1, completion, [5, 6])
    assert r.finish_reason == "error" and r.sample_index == 1
