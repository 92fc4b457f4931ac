"""The embedded HF rollout engine on a tiny random Qwen2.5-VL (CPU): batching with images, n samples, log-probs equal
to a teacher-forced forward, seeding, greedy, stop strings / lengths, blocked tokens, per-request errors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mssr_megatron.models.tiny_hf import synthetic_image  # noqa: E402
from mssr_megatron.rollout.protocol import GenerationRequest, SamplingParams  # noqa: E402
from mssr_megatron.rollout.sampling import BLOCKED_TOKENS, blocked_token_ids, sampling_scores  # noqa: E402

from hf_engine_fixtures import (  # noqa: E402,F401 - pytest finds the fixtures by name
    model_dir, untied_dir, engine, untied_engine, prompt, requests_, teacher_forced_logits, blocked,
)

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
