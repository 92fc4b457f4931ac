"""Weight export from Megatron shards: at TP=2 and PP=2 the owner receives exactly the HF state dict that was
converted in (published names, bit for bit); sync into an engine is verified by checksums; the owner's peak extra
memory stays within one bucket plus a few full parameters while exporting a model 8x+ the bucket size."""

from __future__ import annotations

import pytest
import torch

from megatron_harness import spawn, tiny_case


class RecordingEngine:
    """Keeps copies of what update_weights receives (stream_buckets reuses its buffer) and reports checksums."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self.tensors: dict[str, torch.Tensor] = {}
        self.checksums: dict[str, str] = {}
        self.bucket_sizes: list[int] = []

    def update_weights(self, buckets):
        for bucket in buckets:
            self.bucket_sizes.append(bucket.nbytes)
            self.checksums.update(bucket.checksums())
            if self.keep:
                self.tensors.update((name, t.clone()) for name, t in bucket.named_tensors())

    def weight_checksums(self):
        return self.checksums


def _export_worker(rank: int, tp: int, pp: int, out_dir: str) -> None:
    from mssr_megatron.actor import MegatronActor
    from mssr_megatron.config import ModelConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.parallel import destroy_megatron, init_megatron
    from mssr_megatron.profiling import peak_allocated_bytes
    from mssr_megatron.rollout.weight_export import export_full_weights, is_weight_owner, sync_weights

    init_megatron(tp, pp, seed=0)
    try:
        for tied in (True, False):
            cfg, hf, _ = tiny_case(tied)
            actor = MegatronActor(cfg, ModelConfig(params_dtype="float32"))
            actor.load_hf_state(published_state_dict(hf))
            exported = {name: t.clone() for name, t in export_full_weights(actor.module, actor.dims)}
            bucket = 64 * 1024
            engine = RecordingEngine()
            metrics = sync_weights(actor.module, actor.dims, engine, bucket_bytes=bucket, verify=is_weight_owner())
            # Memory: an engine that keeps nothing, so the profiler sees only what the export itself holds.
            peak, _ = peak_allocated_bytes(
                lambda: sync_weights(actor.module, actor.dims, RecordingEngine(keep=False), bucket_bytes=bucket)
            )
            if is_weight_owner():
                torch.save({"exported": exported, "engine": engine.tensors, "peak": peak, "metrics": metrics,
                            "buckets": engine.bucket_sizes, "bucket": bucket}, f"{out_dir}/{tied}.pt")
            else:
                assert exported == {}
    finally:
        destroy_megatron()


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_export_reproduces_the_hf_state_dict(tmp_path, tp, pp):
    from mssr_megatron.models.tiny_hf import published_state_dict

    spawn(_export_worker, tp * pp, tp, pp, str(tmp_path))
    for tied in (True, False):
        _, hf, _ = tiny_case(tied)
        expected = published_state_dict(hf)
        result = torch.load(tmp_path / f"{tied}.pt")
        for key in ("exported", "engine"):
            got = result[key]
            assert list(got) == list(dict.fromkeys(got)) and set(got) == set(expected), key
            for name, tensor in expected.items():
                assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        model_bytes = sum(t.numel() * t.element_size() for t in expected.values())
        largest = max(t.numel() * t.element_size() for t in expected.values())
        bucket = result["bucket"]
        assert model_bytes >= 8 * bucket
        assert result["metrics"]["sync/bytes"] == model_bytes and result["metrics"]["sync/verified_tensors"] == len(
            expected)
        assert max(result["buckets"]) <= max(bucket, largest)
        # Owner's peak extra memory: one bucket + the parameter being gathered (its shards, the concatenation and
        # the HF slice), far below the model itself.
        assert result["peak"] <= bucket + 4 * largest + 256 * 1024, (result["peak"], bucket, largest, model_bytes)
        assert result["peak"] < model_bytes / 2
