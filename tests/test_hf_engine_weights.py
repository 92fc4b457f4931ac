"""The HF rollout engine's weight updates from buckets (exact logits, completeness, unknown names, checksums) and its
memory release / resume."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mssr_megatron.checkpoint.mapping import published_to_module_names  # noqa: E402
from mssr_megatron.models.tiny_hf import init_tiny_model, published_state_dict  # noqa: E402
from mssr_megatron.rollout.buckets import pack, stream_buckets, tensor_checksum  # noqa: E402
from mssr_megatron.rollout.hf_engine import HFEngine  # noqa: E402
from mssr_megatron.rollout.protocol import SamplingParams  # noqa: E402

from hf_engine_fixtures import (  # noqa: E402,F401 - pytest finds the fixtures by name
    model_dir, untied_dir, engine, untied_engine, requests_, teacher_forced_logits, BUCKET_BYTES,
)

# ------------------------------------------------------------------------------------------------------ weights


def test_name_map_agrees_with_transformers_loader(engine):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(engine.model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = engine.model.state_dict()
    names = published_to_module_names(engine.model)
    assert set(names) == set(published_state_dict(engine.model))
    for published, module_name in names.items():  # what from_pretrained would load a published tensor into
        loaded, _ = rename_source_key(published, renamings, converters, engine.model.base_model_prefix, state)
        assert loaded == module_name


@pytest.fixture
def restore(request):
    """Give an engine back its own weights after a test that overwrites them."""
    engines = []
    yield engines.append
    for e, saved in engines:
        e.update_weights([pack(list(saved.items()))], expect_all=True)


def _sync_from_other(e, seed, restore):
    restore((e, {k: v.clone() for k, v in published_state_dict(e.model).items()}))
    other = init_tiny_model(e.model.config, seed=seed)
    sent = {}

    def buckets():  # stream_buckets reuses its buffer: record checksums while each bucket is current
        for bucket in stream_buckets(published_state_dict(other).items(), bucket_bytes=BUCKET_BYTES):
            sent.update(bucket.checksums())
            yield bucket

    updated = e.update_weights(buckets(), expect_all=True)
    return other, sent, updated


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_update_weights_makes_logits_equal_the_other_model(which, engine, untied_engine, requests_, restore):
    e = engine if which == "tied" else untied_engine
    other, sent, updated = _sync_from_other(e, seed=7, restore=restore)
    assert sorted(updated) == sorted(published_state_dict(other))
    assert ("lm_head.weight" in updated) == (which == "untied")
    assert e.weight_checksums() == sent
    rollout = e.generate([requests_[0]], SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    ours = teacher_forced_logits(e, requests_[0], rollout)
    e_model = e.model
    try:
        e.model = other  # the same forward through the other model
        theirs = teacher_forced_logits(e, requests_[0], rollout)
    finally:
        e.model = e_model
    assert torch.equal(ours, theirs)


def test_update_weights_completeness_unknown_names_and_shapes(engine, restore):
    restore((engine, {k: v.clone() for k, v in published_state_dict(engine.model).items()}))
    state = {k: v.clone() + 1 for k, v in published_state_dict(engine.model).items()}
    partial = [(k, v) for k, v in state.items() if k != "model.norm.weight"]
    with pytest.raises(ValueError, match=r"1 weight\(s\) never updated: \['model.norm.weight'\]"):
        engine.update_weights(stream_buckets(partial, BUCKET_BYTES), expect_all=True)
    assert len(engine.update_weights(stream_buckets(partial, BUCKET_BYTES))) == len(partial)  # fine without it

    before = engine.weight_checksums()
    unknown = torch.zeros(4)
    with pytest.raises(KeyError, match="model.layers.99.mlp.up_proj.weight"):
        engine.update_weights([pack([("model.norm.weight", state["model.norm.weight"]),
                                     ("model.layers.99.mlp.up_proj.weight", unknown)])])
    with pytest.raises(KeyError, match="lm_head.weight.*ties"):
        engine.update_weights([pack([("lm_head.weight", state["model.embed_tokens.weight"])])])
    with pytest.raises(ValueError, match=r"'model.norm.weight' is \(3,\)"):
        engine.update_weights([pack([("model.norm.weight", torch.ones(3))])])
    with pytest.raises(ValueError, match="torch.float64"):
        engine.update_weights([pack([("model.norm.weight", state["model.norm.weight"].double())])])
    assert engine.weight_checksums() == before  # a rejected bucket changes nothing
    # the partial update was applied; the weight left out of it was not touched
    assert before["model.layers.0.mlp.up_proj.weight"] == tensor_checksum(state["model.layers.0.mlp.up_proj.weight"])
    assert before["model.norm.weight"] != tensor_checksum(state["model.norm.weight"])


# ------------------------------------------------------------------------------------------------------ memory


def _release_resume_sync(e, requests_, sampling):
    """Release, resume and sync `e` back to its own weights, checking what it holds and refuses on the way; returns
    (bytes held before, bytes held while released, bytes of the synced weights)."""
    saved = {k: v.clone() for k, v in published_state_dict(e.model).items()}
    held = e.memory_bytes()
    e.release_memory()
    released = e.memory_bytes()
    with pytest.raises(RuntimeError, match=r"released \(\['kv_cache', 'weights'\]\)"):
        e.generate(requests_, sampling)
    with pytest.raises(RuntimeError, match=r"resume_memory\(\['weights'\]\) before update_weights"):
        e.update_weights([pack(list(saved.items())[:1])])
    e.resume_memory(["weights"])
    assert e.memory_bytes() == held
    e.resume_memory(["kv_cache"])
    with pytest.raises(RuntimeError, match=f"{len(saved)} were not filled since"):  # uninitialised weights
        e.generate(requests_, sampling)
    e.update_weights(stream_buckets(saved.items(), BUCKET_BYTES), expect_all=True)
    return held, released, sum(v.numel() * v.element_size() for v in saved.values())


def test_release_frees_the_weights_and_resume_serves_after_a_sync(model_dir, requests_):
    e = HFEngine(model_dir)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=4)
    before = e.generate(requests_[:1], sampling)
    parameters = sum(p.numel() * p.element_size() for p in e.model.parameters())  # tied weights counted once
    buffers = sum(b.numel() * b.element_size() for b in e.model.buffers())
    held, released, synced = _release_resume_sync(e, requests_[:1], sampling)
    assert held == parameters + buffers and synced == parameters
    assert released == buffers  # only the rotary frequencies (not in the checkpoint, not synced) stay
    assert e.generate(requests_[:1], sampling) == before
    with pytest.raises(ValueError, match="unknown memory tags \\['cuda_graph'\\]"):
        e.resume_memory(["cuda_graph"])
    e.shutdown()
    assert e.model is None
    with pytest.raises(RuntimeError, match="shut down"):
        e.generate(requests_[:1], sampling)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_release_resume_on_cuda(model_dir, requests_):
    """GPU-only: not run (no GPU was available)."""
    e = HFEngine(model_dir, device="cuda")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=5)
    before = e.generate(requests_, sampling)
    held, released, synced = _release_resume_sync(e, requests_, sampling)
    assert released + synced == held and released < synced
    assert [r.response_ids for r in e.generate(requests_, sampling)] == [r.response_ids for r in before]
    e.shutdown()
