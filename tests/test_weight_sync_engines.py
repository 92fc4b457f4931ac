"""Weight sync against each engine's way of taking buckets: an engine that still reads a bucket after its update call
returned (SGLang copies from a CUDA-IPC view on its own, unsynchronised stream) must see every bucket as it was sent;
sync_weights(verify=True) refuses engines that report no checksums, naming the engine and the alternative."""

from __future__ import annotations

import types

import pytest
import torch

from mssr_megatron.rollout import weight_export
from mssr_megatron.rollout.buckets import stream_buckets
from mssr_megatron.rollout.sglang_engine import SGLangEngine
from mssr_megatron.rollout.vllm_engine import VLLMEngine


def weights() -> list[tuple[str, torch.Tensor]]:
    """Distinct values per tensor, several buckets at 64 bytes, one tensor larger than a bucket."""
    g = torch.Generator().manual_seed(0)
    return [(f"model.layers.{i}.w", torch.randn(5, generator=g)) for i in range(6)] + [
        ("lm_head.weight", torch.randn(40, generator=g)),  # 160 bytes: a bucket of its own
        ("model.norm.weight", torch.randn(3, generator=g).to(torch.bfloat16)),
    ]


def assert_views_hold_what_was_sent(views: list[tuple[str, torch.Tensor]]) -> None:
    want = dict(weights())
    assert sorted(name for name, _ in views) == sorted(want)
    for name, view in views:
        assert torch.equal(view, want[name]), name


@pytest.fixture
def exported(monkeypatch):
    """sync_weights' export replaced by the fixed tensors above (a single-process owner, no model)."""
    monkeypatch.setattr(weight_export, "export_full_weights", lambda model, dims, dtype=None, hosts=None: iter(weights()))


def test_fresh_buffers_keep_every_streamed_bucket_intact():
    views = [pair for bucket in stream_buckets(iter(weights()), 64, fresh_buffers=True)
             for pair in bucket.named_tensors()]  # views kept past the next bucket, no copies
    assert_views_hold_what_was_sent(views)


class FakeSGLang:
    """The offline sglang.Engine calls SGLangEngine.update_weights makes, all succeeding."""

    def begin_weight_update(self):
        return True, "ok"

    def end_weight_update(self):
        return True, "ok"

    def update_weights_from_tensor(self, named_tensors, load_format, flush_cache):
        return True, "Success"

    def flush_cache(self):
        return types.SimpleNamespace(success=True)


def test_sglang_engine_sees_each_bucket_as_sent_after_the_whole_sync(monkeypatch, exported):
    """The real SGLangEngine.update_weights under sync_weights; the payload step is replaced by one that keeps views of
    the bucket, as SGLang's CUDA-IPC tensors do while its copy is still queued."""
    from mssr_megatron.rollout import sglang_engine

    held: list[tuple[str, torch.Tensor]] = []

    def keep_views(bucket, tp_size):
        held.extend(bucket.named_tensors())
        return [b"payload"] * tp_size

    monkeypatch.setattr(sglang_engine, "flattened_bucket_payload", keep_views)
    engine = SGLangEngine.__new__(SGLangEngine)  # no sglang.Engine on CPU: its calls are the fake's
    engine.tp_size, engine._engine = 1, FakeSGLang()
    metrics = weight_export.sync_weights(None, None, engine, bucket_bytes=64)
    assert metrics["sync/buckets"] >= 4
    assert_views_hold_what_was_sent(held)


class ChecksumEngine:
    """An engine that reports checksums of what it holds (as the HF engine does)."""

    def __init__(self):
        self.held: dict[str, str] = {}

    def update_weights(self, buckets):
        for bucket in buckets:
            self.held.update(bucket.checksums())

    def weight_checksums(self):
        return self.held


def test_verify_works_with_an_engine_that_reports_checksums(exported):
    metrics = weight_export.sync_weights(None, None, ChecksumEngine(), bucket_bytes=64, verify=True)
    assert metrics["sync/verified_tensors"] == len(weights())


@pytest.mark.parametrize("engine_cls", [SGLangEngine, VLLMEngine])
def test_verify_refuses_engines_without_checksums_before_sending(exported, engine_cls):
    engine = engine_cls.__new__(engine_cls)
    sent = []
    engine.update_weights = sent.append  # must never be reached
    with pytest.raises(ValueError) as info:
        weight_export.sync_weights(None, None, engine, bucket_bytes=64, verify=True)
    message = str(info.value)
    assert engine_cls.__name__ in message and "rollout.engine=hf" in message and "verify=False" in message
    assert sent == []
