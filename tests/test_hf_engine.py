"""The embedded HF rollout engine on a tiny random Qwen2.5-VL (CPU): batching with images, n samples, log-probs equal
to a teacher-forced forward, seeding, greedy, stop strings / lengths, blocked tokens, per-request errors, and weight
updates from buckets (exact logits, completeness, unknown names, checksums)."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mssr_megatron.models.processor import load_processor  # noqa: E402
from mssr_megatron.models.tiny_hf import (  # noqa: E402
    build_tiny_model_dir,
    chat_messages,
    init_tiny_model,
    published_state_dict,
    save_published,
    synthetic_image,
    tiny_qwen2_5_vl_config,
)
from mssr_megatron.rollout.buckets import pack, stream_buckets, tensor_checksum  # noqa: E402
from mssr_megatron.checkpoint.mapping import published_to_module_names  # noqa: E402
from mssr_megatron.rollout.hf_engine import HFEngine  # noqa: E402
from mssr_megatron.rollout.protocol import GenerationRequest, SamplingParams  # noqa: E402
from mssr_megatron.rollout.sampling import BLOCKED_TOKENS, blocked_token_ids, sampling_scores  # noqa: E402

BUCKET_BYTES = 64 * 1024  # the tiny model (~3.6 MB) streams as dozens of buckets


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_tiny_model_dir(tmp_path_factory.mktemp("hf_engine") / "tied", seed=0)
    # Qwen2.5-VL's published sampling defaults: the engine must not let generate() pick them up.
    with open(os.path.join(path, "generation_config.json")) as fh:
        gen = json.load(fh)
    gen.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)
    with open(os.path.join(path, "generation_config.json"), "w") as fh:
        json.dump(gen, fh)
    return path


@pytest.fixture(scope="module")
def untied_dir(model_dir, tmp_path_factory):
    """Untied embeddings (like 7B) and a 331-row embedding over the 320-token tokenizer (padded rows)."""
    path = str(tmp_path_factory.mktemp("hf_engine") / "untied")
    shutil.copytree(model_dir, path)
    config = tiny_qwen2_5_vl_config(331, False, tokenizer=load_processor(model_dir).tokenizer)
    save_published(init_tiny_model(config, seed=2), path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    return HFEngine(model_dir, max_batch_size=4)  # 6 rows -> batches of 4 and 2


@pytest.fixture(scope="module")
def untied_engine(untied_dir):
    return HFEngine(untied_dir)


def prompt(engine, text, images=1):
    messages = chat_messages(text, with_image=images > 0)
    if images > 1:
        messages[0]["content"] = [{"type": "image"}] * images + messages[0]["content"][1:]
    return engine.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def requests_(engine, tmp_path_factory):
    """Three requests: a PIL image, an image file path, PNG bytes; different image sizes -> different prompt lengths."""
    path = str(tmp_path_factory.mktemp("images") / "img.png")
    synthetic_image(1, size=56).save(path)
    return [
        GenerationRequest("a", prompt(engine, "How many shapes?"), [synthetic_image(0, size=84)]),
        GenerationRequest("b", prompt(engine, "How many red shapes are there in the image?"), [path]),
        GenerationRequest("c", prompt(engine, "How many blue circles?"), [png_bytes(synthetic_image(2, size=112))]),
    ]


def teacher_forced_logits(engine, request, rollout):
    """Raw logits [T, V] at the response positions of one unpadded forward over prompt + response."""
    images = [_decode(img) for img in request.images]
    enc = engine.processor(text=[request.prompt], images=images or None, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == rollout.prompt_ids
    n_prompt, n_resp = len(rollout.prompt_ids), len(rollout.response_ids)
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    mm = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, n_resp, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = engine.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=mm,
            pixel_values=enc.get("pixel_values"),
            image_grid_thw=enc.get("image_grid_thw"),
        )
    return out.logits[0, n_prompt - 1 : n_prompt + n_resp - 1].float()


def _decode(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    return Image.open(source).convert("RGB")


def blocked(engine):
    mask = torch.zeros(engine.model.config.get_text_config().vocab_size, dtype=torch.bool)
    mask[engine.blocked_ids] = True
    return mask


# ------------------------------------------------------------------------------------------------------ sampling


def test_sampling_scores_hand_worked():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    none = torch.zeros(4, dtype=torch.bool)

    def probs(*args):
        return sampling_scores(logits, *args).softmax(-1)

    torch.testing.assert_close(probs(none, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # top-p 0.8: mass before each token (sorted) is 0, .5, .8, .95 -> keep the first two
    torch.testing.assert_close(probs(none, 1.0, -1, 0.8), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(probs(none, 1.0, -1, 0.81), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    torch.testing.assert_close(probs(none, 1.0, 3), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    torch.testing.assert_close(probs(none, 0.5), torch.tensor([0.25, 0.09, 0.0225, 0.0025]) / 0.365)
    # blocking first, then top-p on the renormalised rest (.6, .3, .1): mass before .3 is .6 < .8, before .1 is .9
    first = torch.tensor([True, False, False, False])
    torch.testing.assert_close(probs(first, 1.0, -1, 0.8), torch.tensor([0.0, 2 / 3, 1 / 3, 0.0]))
    assert sampling_scores(logits, first, 0.0).argmax() == 1  # greedy: masked argmax
    # [B, T, V] works too (the trainer's shape)
    assert sampling_scores(logits.expand(2, 3, 4), first, 0.7, 2, 0.9).shape == (2, 3, 4)


def test_cut_response(engine):
    from mssr_megatron.rollout.sampling import cut_response

    tok, end = engine.tokenizer, engine.stop_token_ids[0]
    ids = tok.encode("The answer is 3. So") + [end] + tok.encode(" more text")
    eos_at = ids.index(end) + 1
    assert cut_response(tok, ids, [end], []) == (eos_at, True)  # the end token is kept
    length, stopped = cut_response(tok, ids, [end], ["3."])
    assert stopped and "3." in tok.decode(ids[:length]) and "3." not in tok.decode(ids[: length - 1])
    assert cut_response(tok, ids, [end], ["more"]) == (eos_at, True)  # the end token comes first
    assert cut_response(tok, ids, [], ["never"]) == (len(ids), False)


# ------------------------------------------------------------------------------------------------------ generation


def test_batched_generation_with_images_n_samples(engine, requests_):
    rollouts = engine.generate(requests_, SamplingParams(temperature=1.0, max_new_tokens=10, n=2, seed=0))
    assert [(r.request_id, r.sample_index) for r in rollouts] == [(q, k) for q in "abc" for k in (0, 1)]
    image_id = engine.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for r in rollouts:
        assert r.error is None and r.finish_reason in ("stop", "length")
        assert len(r.response_logprobs) == len(r.response_ids) > 0
        assert all(lp <= 0 for lp in r.response_logprobs)
        assert r.finish_reason == "stop" or len(r.response_ids) == 10
    # the prompt ids carry the expanded image placeholders: 84 px -> 9, 56 px -> 4, 112 px -> 16 merged tokens
    assert [rollouts[i].prompt_ids.count(image_id) for i in (0, 2, 4)] == [9, 4, 16]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_equal_teacher_forced_forward(engine, requests_, temperature):
    rollouts = engine.generate(requests_, SamplingParams(temperature=temperature, max_new_tokens=12, n=2, seed=1))
    mask, worst = blocked(engine), 0.0
    for r in rollouts:
        logits = teacher_forced_logits(engine, requests_["abc".index(r.request_id)], r)
        # independent of sampling.py: mask the blocked ids, divide by the temperature, log-softmax
        expected = torch.log_softmax(logits.masked_fill(mask, float("-inf")) / temperature, dim=-1)
        expected = expected.gather(1, torch.tensor(r.response_ids)[:, None]).squeeze(1)
        worst = max(worst, (torch.tensor(r.response_logprobs) - expected).abs().max().item())
    print(f"temperature {temperature}: max |rollout - teacher-forced| log-prob = {worst:.2e}")
    assert worst < 1e-5


def test_top_k_top_p_logprobs_are_of_the_filtered_distribution(engine, requests_):
    sampling = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=8, n=2, seed=3)
    for r in engine.generate(requests_, sampling):
        logits = teacher_forced_logits(engine, requests_["abc".index(r.request_id)], r)
        scores = sampling_scores(logits, blocked(engine), 0.8, 20, 0.9)
        assert ((scores > float("-inf")).sum(-1) <= 20).all()
        expected = torch.log_softmax(scores, -1).gather(1, torch.tensor(r.response_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(r.response_logprobs), expected, atol=1e-5, rtol=0)


def test_seed_reproducible_and_rng_untouched(engine, requests_):
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=123)
    state = torch.get_rng_state()
    first, second = engine.generate(requests_, sampling), engine.generate(requests_, sampling)
    assert torch.equal(state, torch.get_rng_state())
    def key(rollouts):
        return [(r.response_ids, r.response_logprobs) for r in rollouts]

    assert key(first) == key(second)
    sampling.seed = 124
    other = engine.generate(requests_, sampling)
    assert [r.response_ids for r in other] != [r.response_ids for r in first]


def test_greedy_is_deterministic_and_the_masked_argmax(engine, requests_):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=10, n=2)  # no seed: greedy needs none
    rollouts = engine.generate(requests_, sampling)
    assert [r.response_ids for r in rollouts] == [r.response_ids for r in engine.generate(requests_, sampling)]
    assert rollouts[0].response_ids == rollouts[1].response_ids  # both samples of a request are the argmax path
    for r in rollouts:
        logits = teacher_forced_logits(engine, requests_["abc".index(r.request_id)], r).masked_fill(
            blocked(engine), float("-inf")
        )
        assert logits.argmax(-1).tolist() == r.response_ids
        # greedy log-probs: the temperature-1 distribution with the blocked tokens masked
        expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.response_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(r.response_logprobs), expected, atol=1e-5, rtol=0)


def _sample(engine, request, **kwargs):
    """One seeded sample of one request: the same prefix whatever the stop settings (a batch of one row consumes the
    same random numbers per step), so a run without stops is the reference for runs with them."""
    return engine.generate([request], SamplingParams(temperature=1.0, seed=11, **kwargs))[0]


def test_stop_strings_and_max_new_tokens(engine, requests_):
    request, tok = requests_[0], engine.tokenizer
    ids = _sample(engine, request, max_new_tokens=12).response_ids
    assert len(ids) == 12 and not set(ids[:-1]) & set(engine.stop_token_ids), "expected a long sample for this test"
    short = _sample(engine, request, max_new_tokens=3)
    assert (short.response_ids, short.finish_reason) == (ids[:3], "length")
    # a stop string: the clean ASCII text of a token in the middle of the sample that did not occur before it
    j = next(
        j
        for j in range(2, len(ids) - 1)
        if tok.decode([ids[j]]).strip().isascii()
        and tok.decode([ids[j]]).strip()
        and tok.decode([ids[j]]).strip() not in tok.decode(ids[:j])
    )
    stop = tok.decode([ids[j]]).strip()
    keep = next(t for t in range(1, len(ids) + 1) if stop in tok.decode(ids[:t]))  # first prefix holding it
    assert keep == j + 1
    cut = _sample(engine, request, max_new_tokens=12, stop=["zzz-never", stop])
    assert (cut.response_ids, cut.finish_reason) == (ids[:keep], "stop")
    assert stop in cut.text and len(cut.response_logprobs) == keep
    assert cut.response_logprobs == _sample(engine, request, max_new_tokens=12).response_logprobs[:keep]


def test_end_token_stops_with_reason_stop(engine, requests_, monkeypatch):
    ids = _sample(engine, requests_[1], max_new_tokens=8).response_ids
    end = ids[3]  # pretend this token is the end-of-turn token
    monkeypatch.setattr(engine, "stop_token_ids", [end])
    r = _sample(engine, requests_[1], max_new_tokens=8)
    assert (r.response_ids, r.finish_reason) == (ids[: ids.index(end) + 1], "stop")
    assert r.response_ids[-1] == end  # the end token is kept (the trainer learns to stop)


def test_blocked_tokens_are_never_sampled(untied_engine, requests_):
    e = untied_engine
    names = set(e.tokenizer.convert_ids_to_tokens([i for i in e.blocked_ids if i < len(e.tokenizer)]))
    assert names == set(BLOCKED_TOKENS) and "<|im_end|>" not in names
    assert set(range(320, 331)) <= set(e.blocked_ids)  # embedding rows without a token
    assert e.blocked_ids == blocked_token_ids(e.tokenizer, 331)
    # make the raw logits favour the blocked ids overwhelmingly: masking must still exclude them
    hook = e.model.lm_head.register_forward_hook(lambda m, i, out: out.index_add(
        -1, torch.tensor(e.blocked_ids), torch.full((*out.shape[:-1], len(e.blocked_ids)), 100.0)))
    try:
        rollouts = e.generate(requests_, SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=0))
    finally:
        hook.remove()
    assert all(r.error is None for r in rollouts)
    assert not {t for r in rollouts for t in r.response_ids} & set(e.blocked_ids)


def test_bad_requests_fail_alone(engine, requests_, tmp_path):
    good = requests_[0]
    bad = [
        GenerationRequest("missing", prompt(engine, "How many?"), [str(tmp_path / "nope.png")]),
        GenerationRequest("garbage", prompt(engine, "How many?"), [b"definitely not a png"]),
        GenerationRequest("empty", "  ", []),
        GenerationRequest("two-images", prompt(engine, "How many?"), [synthetic_image(0), synthetic_image(1)]),
        GenerationRequest("no-image", prompt(engine, "How many?"), []),
    ]
    text_only = GenerationRequest("text-only", prompt(engine, "How many?", images=0))
    batch = [bad[0], good, *bad[1:3], text_only, *bad[3:]]
    out = engine.generate(batch, SamplingParams(max_new_tokens=4, n=2, seed=0))
    by_id = {}
    for r in out:
        by_id.setdefault(r.request_id, []).append(r)
    assert [r.request_id for r in out] == [q.request_id for q in batch for _ in range(2)]
    for r in by_id["a"] + by_id["text-only"]:  # the good requests are generated normally
        assert r.error is None and r.finish_reason in ("stop", "length") and 0 < len(r.response_ids) <= 4
    expected = {
        "missing": "no such file",
        "garbage": "does not decode",
        "empty": "empty prompt",
        "two-images": "2 image(s) given but the prompt has 1",
        "no-image": "0 image(s) given but the prompt has 1",
    }
    for rid, phrase in expected.items():
        for r in by_id[rid]:
            assert r.finish_reason == "error" and r.response_ids == [] and r.response_logprobs == []
            assert f"request {rid!r}" in r.error and phrase in r.error, r.error
    zero = engine.generate(requests_[:2], SamplingParams(max_new_tokens=0))
    assert [r.finish_reason for r in zero] == ["error", "error"]
    assert all("max_new_tokens must be positive, got 0" in r.error for r in zero)


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


def test_release_resume_are_noops_on_cpu_and_shutdown_frees(model_dir, requests_):
    e = HFEngine(model_dir)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=4)
    before = e.generate(requests_[:1], sampling)
    e.release_memory()
    assert e.generate(requests_[:1], sampling) == before  # CPU: nothing was freed
    e.resume_memory()
    e.shutdown()
    assert e.model is None
    with pytest.raises(RuntimeError, match="shut down"):
        e.generate(requests_[:1], sampling)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_release_resume_on_cuda(model_dir, requests_):
    e = HFEngine(model_dir, device="cuda")
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, n=2, seed=5)
    before = e.generate(requests_, sampling)
    held = torch.cuda.memory_allocated()
    e.release_memory()
    assert next(e.model.parameters()).device.type == "cpu" and torch.cuda.memory_allocated() < held
    with pytest.raises(RuntimeError, match="resume_memory"):
        e.generate(requests_, sampling)
    e.resume_memory()
    assert [r.response_ids for r in e.generate(requests_, sampling)] == [r.response_ids for r in before]
    e.shutdown()
