"""What this project sends to SGLang is what SGLang's own code accepts and rebuilds, checked on CPU against the
installed sglang source (see sglang_source.py for how it is reached without CUDA packages):
  (a) buckets from `pack` / `stream_buckets` (float32, bfloat16, float16, int64; 0-d, 1-d, 3-d; odd byte sizes) are
      rebuilt bit for bit by SGLang's FlattenedTensorBucket, and unpadded buckets have exactly the layout of its
      `FlattenedTensorBucket.empty` (the update_weights_from_distributed receive buffer);
  (b) the flattened_bucket payload survives SGLang's serializer, per-rank payload handling, SafeUnpickler and its
      `_update_weights_from_flattened_bucket`; the trainer-side broadcast meets SGLang's own receive code (gloo);
  (c) sampling dicts are accepted by SGLang's SamplingParams (construct, normalize, verify); engine and request
      arguments are fields of ServerArgs / GenerateReqInput; the Engine methods called take those parameters;
  (d) output dicts shaped by SGLang's own finish-reason and log-prob code convert into Rollouts.
The serving calls themselves (SGLangEngine) need CUDA and are not run here.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

import sglang_source as src
from mssr_megatron.rollout.buckets import TensorMeta, WeightBucket, pack, stream_buckets
from mssr_megatron.rollout.engine_common import BLOCK_BIAS, TokenPolicy
from mssr_megatron.rollout.protocol import GenerationRequest, SamplingParams
from mssr_megatron.rollout.sglang_engine import (
    flattened_bucket_payload,
    from_sglang_output,
    sglang_engine_kwargs,
    sglang_generate_input,
    to_sglang_sampling_params,
)
from mssr_megatron.rollout.weight_broadcast import DistributedWeightSender, distributed_update_args

pytestmark = pytest.mark.skipif(src.SPEC is None, reason=src.SKIP_REASON)


def odd_tensors() -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes and shapes whose byte sizes force misaligned offsets when packed end to end."""
    g = torch.Generator().manual_seed(0)
    return [
        ("model.norm.weight", torch.randn(7, generator=g).to(torch.bfloat16)),  # 14 bytes
        ("visual.merger.scale", torch.randn((), generator=g)),  # 0-d float32
        ("model.layers.0.mlp.up_proj.weight", torch.randn(3, 1, 5, generator=g).to(torch.float16)),  # 30 bytes
        ("model.step", torch.tensor(-(2**40) - 3, dtype=torch.int64)),  # 0-d int64
        ("lm_head.weight", torch.randn(2, 3, 5, generator=g)),
        ("model.half_scalar", torch.tensor(1.5, dtype=torch.float16)),  # 0-d float16: 2 bytes
        ("model.ids", torch.arange(-3, 4, dtype=torch.int64).reshape(7, 1, 1)),  # 3-d int64
        ("model.bias", torch.tensor([float("nan"), -0.0, float("inf")], dtype=torch.bfloat16)),  # special values
    ]


def assert_bit_equal(got: list[tuple[str, torch.Tensor]], want: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name


def sglang_rebuild(tb, bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    metadata = [tb.FlattenedTensorMetadata(m.name, m.shape, m.dtype, m.start_idx, m.end_idx, m.numel)
                for m in bucket.metadata]
    return tb.FlattenedTensorBucket(flattened_tensor=bucket.flat, metadata=metadata).reconstruct_tensors()


# ------------------------------------------------------------------------------------ (a) SGLang's reconstruction


def test_sglang_rebuilds_packed_bucket_bit_for_bit():
    tb = src.load_tensor_bucket()
    tensors = odd_tensors()
    assert_bit_equal(sglang_rebuild(tb, pack(tensors)), tensors)


@pytest.mark.parametrize("bucket_bytes", [16, 40, 64, 4096])
def test_sglang_rebuilds_streamed_buckets_bit_for_bit(bucket_bytes):
    tb = src.load_tensor_bucket()
    tensors = odd_tensors()
    rebuilt = []
    for bucket in stream_buckets(iter(tensors), bucket_bytes):  # a bucket is valid until the next is requested
        rebuilt += [(n, t.clone()) for n, t in sglang_rebuild(tb, bucket)]
    assert_bit_equal(rebuilt, tensors)


def test_unpadded_buckets_have_sglang_receive_layout():
    tb = src.load_tensor_bucket()
    same_dtype = [(n, t.float()) for n, t in odd_tensors() if t.is_floating_point()]
    for bucket in [pack(same_dtype), *stream_buckets(iter(odd_tensors()), 8)]:
        args = distributed_update_args(bucket)
        if args["load_format"] != "flattened_bucket":
            continue
        empty = tb.FlattenedTensorBucket.empty(args["names"], args["dtypes"], args["shapes"], "cpu")
        ours = [(m.name, m.shape, m.dtype, m.start_idx, m.end_idx, m.numel) for m in bucket.metadata]
        assert [(m.name, m.shape, m.dtype, m.start_idx, m.end_idx, m.numel) for m in empty.metadata] == ours
        assert empty.flattened_tensor.numel() == bucket.flat.numel()
    mixed = distributed_update_args(pack(odd_tensors()))
    assert mixed["load_format"] is None  # alignment padding: SGLang's `empty` would refuse this layout
    with pytest.raises(ValueError, match="Unaligned"):
        tb.FlattenedTensorBucket.empty(mixed["names"], mixed["dtypes"], mixed["shapes"], "cpu")


# --------------------------------------------------------------------- (b) the payload through SGLang's own code


def test_flattened_bucket_payload_is_what_sglang_loads():
    tensors = odd_tensors()
    bucket = pack(tensors)
    with src.light_sglang() as tb:
        ser = src.sglang_serializer()
        loader = src.sglang_defs(
            "srt/model_executor/model_runner_components/weight_updater.py", ["_update_weights_from_flattened_bucket"],
            {"FlattenedTensorBucket": tb.FlattenedTensorBucket, "FlattenedTensorMetadata": tb.FlattenedTensorMetadata},
            class_name="WeightUpdater")["_update_weights_from_flattened_bucket"]
        payloads = flattened_bucket_payload(bucket, tp_size=2, serialize=ser["MultiprocessingSerializer"].serialize)
        assert len(payloads) == 2 and all(isinstance(p, bytes) for p in payloads)  # List[bytes], one per TP rank
        # Engine._serialize_tensors_per_rank for flattened_bucket: normalisation only, raw pickle bytes unchanged
        assert ser["normalize_serialized_named_tensor_payloads"](payloads) == payloads
        for rank in range(2):  # each TP worker deserializes payloads[tp_rank] with SafeUnpickler
            data = ser["MultiprocessingSerializer"].deserialize(payloads[rank])
            loaded = []
            model = types.SimpleNamespace(load_weights=lambda named: loaded.extend((n, t.clone()) for n, t in named))
            worker = types.SimpleNamespace(get_model=lambda: model)
            assert loader(worker, flattened_tensor_bucket_dict=data) == (True, "Success")
            assert_bit_equal(loaded, tensors)


def test_sglang_refuses_a_payload_with_our_own_metadata_class():
    """Why flattened_bucket_payload converts TensorMeta: SGLang's SafeUnpickler admits its own class only."""
    bucket = pack(odd_tensors()[:2])
    with src.light_sglang():
        ser = src.sglang_serializer()
        raw = ser["MultiprocessingSerializer"].serialize({"flattened_tensor": bucket.flat, "metadata": bucket.metadata})
        with pytest.raises(RuntimeError, match="Blocked unsafe global.*TensorMeta"):
            ser["MultiprocessingSerializer"].deserialize(raw)
    assert TensorMeta.__module__ == "mssr_megatron.rollout.buckets"


def _broadcast_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank 0: this project's sender. Ranks 1, 2: SGLang's init_custom_process_group and its receive code."""
    import sglang_source as s

    buckets = [pack([(n, t.float()) for n, t in odd_tensors() if t.is_floating_point()]), pack(odd_tensors())]
    name = "mssr_test_group"
    if rank == 0:
        sender = DistributedWeightSender("127.0.0.1", port, engine_tp_size=2, group_name=name, backend="gloo",
                                         timeout_s=60)
        sender.init_group()
        for bucket in buckets:
            sender.send(bucket, distributed_update_args(bucket)["load_format"])
        # Rank 0 hosts the group's TCP store: it must outlive the receivers (as the trainer does), otherwise a
        # receiver can abort at exit ("terminate called without an active exception", seen in CI).
        import time

        deadline = time.time() + 120
        while time.time() < deadline and not all(os.path.exists(os.path.join(out_dir, f"rank{r}.pt")) for r in (1, 2)):
            time.sleep(0.05)
        sender.close()
        return
    tb = s.load_tensor_bucket()
    release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    ns = s.sglang_defs("srt/utils/common.py", ["init_custom_process_group"], {"torch": torch, "torch_release": release})
    pg = ns["init_custom_process_group"](backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=3,
                                         rank=rank, group_name=name)
    receive = s.sglang_defs(
        "srt/model_executor/model_runner_components/weight_updater.py",
        ["receive_weights_from_distributed", "_receive_bucketed_weights_from_distributed"],
        {"torch": torch, "FlattenedTensorBucket": tb.FlattenedTensorBucket}, class_name="WeightUpdater")
    worker = types.SimpleNamespace(_model_update_group={name: pg}, device="cpu")
    worker._receive_bucketed_weights_from_distributed = (
        lambda **kw: receive["_receive_bucketed_weights_from_distributed"](worker, **kw))
    received = []
    for bucket in buckets:
        args = distributed_update_args(bucket)
        got = receive["receive_weights_from_distributed"](worker, group_name=name, **args)
        received.append([(n, t.clone()) for n, t in got])
    torch.save(received, os.path.join(out_dir, f"rank{rank}.pt"))
    # A gloo group made by SGLang's init_custom_process_group, still alive when the interpreter tears down, can abort
    # the process ("terminate called without an active exception"; a worker thread is destroyed while joinable).
    # The results are on disk: leave without running C++ static destructors. (A serving engine never exits here.)
    os._exit(0)


def test_distributed_sender_meets_sglang_receiver(tmp_path):
    import torch.multiprocessing as mp

    from mssr_megatron.parallel import free_port

    mp.spawn(_broadcast_worker, args=(free_port(), str(tmp_path)), nprocs=3, join=True)
    want = [[(n, t.float()) for n, t in odd_tensors() if t.is_floating_point()], odd_tensors()]
    for rank in (1, 2):
        received = torch.load(tmp_path / f"rank{rank}.pt")
        for got, expected in zip(received, want, strict=True):
            assert_bit_equal(got, expected)


# ------------------------------------------------------------------------------- (c) sampling and call arguments


class CharTokenizer:
    """Stands in for the model's tokenizer in SamplingParams.normalize, which only measures stop strings."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())


POLICY = TokenPolicy(blocked_ids=(3, 4, *range(300, 320)), stop_ids=(2, 7))
SAMPLINGS = [
    SamplingParams(),
    SamplingParams(temperature=0.0, max_new_tokens=12),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, stop=["</answer>", "\n\n"], n=8, seed=123),
    SamplingParams(top_k=0, seed=0),
]


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_sampling_dict_is_valid_for_sglang(sampling):
    pytest.importorskip("msgspec", reason="SGLang's SamplingParams is a msgspec Struct (CI installs msgspec)")
    d = to_sglang_sampling_params(sampling, policy=POLICY, seed=sampling.seed)
    with src.light_sglang():
        from sglang.srt.sampling.sampling_params import TOP_K_ALL
        from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams

        params = SGLangSamplingParams(**d)  # what TokenizerManager does with a request's dict
        params.normalize(CharTokenizer())
        params.verify(vocab_size=320)
    assert params.max_new_tokens == sampling.max_new_tokens and params.n == sampling.n
    assert params.no_stop_trim is True
    assert params.stop_strs == list(sampling.stop)
    assert params.stop_token_ids == set(POLICY.stop_ids)
    assert params.logit_bias == {str(i): BLOCK_BIAS for i in POLICY.blocked_ids}
    assert params.sampling_seed == sampling.seed
    if sampling.temperature == 0:
        assert params.top_k == 1  # SGLang's greedy
    else:
        assert params.temperature == sampling.temperature and params.top_p == sampling.top_p
        assert params.top_k == (sampling.top_k if sampling.top_k > 0 else TOP_K_ALL)


def test_generate_input_and_engine_kwargs_are_sglang_fields():
    request_fields = src.class_fields("srt/managers/io_struct.py", "GenerateReqInput")
    reqs = [GenerationRequest("a", "<|image_pad|> one", [b"png-bytes"]), GenerationRequest("b", "two")]
    for sampling in (SamplingParams(n=3), SamplingParams(n=3, seed=5)):
        kwargs, _ = sglang_generate_input(reqs, sampling, POLICY)
        assert set(kwargs) <= request_fields, set(kwargs) - request_fields
    fields_dir = "srt/arg_groups/fields"  # ServerArgs is assembled from the field classes of these files
    server_fields = set().union(*(src.class_fields(f"{fields_dir}/{f}")
                                  for f in os.listdir(src.sglang_file(fields_dir)) if f.endswith(".py")))
    from mssr_megatron.config import RolloutConfig

    kwargs = sglang_engine_kwargs("/models/qwen", RolloutConfig(engine="sglang", engine_tp_size=2), deterministic=True)
    assert set(kwargs) <= server_fields, set(kwargs) - server_fields
    assert kwargs["enable_memory_saver"] is True and kwargs["tp_size"] == 2 and kwargs["mem_fraction_static"] == 0.6


@pytest.mark.parametrize("method, params", [
    ("update_weights_from_tensor", ["named_tensors", "load_format", "flush_cache"]),
    ("update_weights_from_distributed", ["names", "dtypes", "shapes", "group_name", "flush_cache", "load_format"]),
    ("init_weights_update_group", ["master_address", "master_port", "rank_offset", "world_size", "group_name",
                                   "backend"]),
    ("release_memory_occupation", ["tags"]),
    ("resume_memory_occupation", ["tags"]),
    ("begin_weight_update", []),
    ("end_weight_update", []),
    ("flush_cache", []),
    ("shutdown", []),
])
def test_engine_methods_take_what_sglang_engine_calls_pass(method, params):
    assert set(params) <= set(src.method_params("srt/entrypoints/engine.py", "Engine", method))


def test_memory_tags_are_sglangs():
    from mssr_megatron.rollout.sglang_engine import MEMORY_TAGS

    ns = {}
    exec(open(src.sglang_file("srt/constants.py")).read(), ns)
    assert set(MEMORY_TAGS) == set(ns["GPU_MEMORY_ALL_TYPES"])


def test_seeded_and_unseeded_batch_layout():
    reqs = [GenerationRequest(f"r{i}", f"prompt {i}") for i in range(3)]
    kwargs, layout = sglang_generate_input(reqs, SamplingParams(n=2), POLICY)
    assert kwargs["text"] == ["prompt 0", "prompt 1", "prompt 2"] and kwargs["sampling_params"]["n"] == 2
    assert layout == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] and "image_data" not in kwargs
    kwargs, layout = sglang_generate_input(reqs, SamplingParams(n=2, seed=10), POLICY)
    assert kwargs["text"] == ["prompt 0", "prompt 0", "prompt 1", "prompt 1", "prompt 2", "prompt 2"]
    seeds = [p["sampling_seed"] for p in kwargs["sampling_params"]]
    assert seeds == [10, 11, 12, 13, 14, 15] and all(p["n"] == 1 for p in kwargs["sampling_params"])
    alone, _ = sglang_generate_input(reqs[1:2], SamplingParams(n=2, seed=10), POLICY, request_indices=[1])
    assert [p["sampling_seed"] for p in alone["sampling_params"]] == [12, 13]  # same seeds alone as in the batch


def test_images_go_as_one_list_per_entry(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(b"\x89PNG fake bytes")
    reqs = [GenerationRequest("a", "<|image_pad|><|image_pad|>", [str(path), b"raw"]), GenerationRequest("b", "x")]
    kwargs, _ = sglang_generate_input(reqs, SamplingParams(n=2, seed=1))
    assert kwargs["image_data"] == [[b"\x89PNG fake bytes", b"raw"]] * 2 + [[], []]


def sglang_normalized_images(kwargs: dict) -> tuple[list, list]:
    """(text, image_data) per expanded entry after SGLang's own batch normalisation of GenerateReqInput
    (io_struct.py: batch size, parallel-sampling expansion, image normalisation), run on a stand-in object."""
    methods = ["_determine_batch_size", "_sampling_params_beam_width", "_handle_beam_search_parallel_sampling",
               "_handle_parallel_sampling", "_expand_inputs", "_normalize_image_data"]
    ns = src.sglang_defs("srt/managers/io_struct.py", methods, {}, class_name="GenerateReqInput")
    req = types.SimpleNamespace(text=kwargs["text"], sampling_params=kwargs["sampling_params"],
                                image_data=kwargs.get("image_data"), input_ids=None, input_embeds=None,
                                modalities=None)
    for name in methods:  # bind the SGLang methods to the stand-in, as methods of the real class would be
        setattr(req, name, types.MethodType(ns[name], req))
    req._determine_batch_size()
    req._handle_parallel_sampling()
    num = req.batch_size * req.parallel_sample_num
    req._expand_inputs(num)
    req._normalize_image_data(num)
    return req.text, req.image_data


@pytest.mark.parametrize("sampling", [SamplingParams(n=1), SamplingParams(n=3), SamplingParams(n=2, seed=4)])
def test_text_only_entries_do_not_mis_wrap_the_batch_images(sampling):
    """A text-only request first in a mixed batch: SGLang must still see each request's own image list."""
    has_valid_data = src.sglang_defs("srt/multimodal/mm_utils.py", ["has_valid_data"], {
        "flatten_nested_list": src.sglang_defs("srt/utils/common.py", ["flatten_nested_list"], {})[
            "flatten_nested_list"]})["has_valid_data"]
    reqs = [GenerationRequest("t", "text only"), GenerationRequest("a", "<|image_pad|> one", [b"img-a"]),
            GenerationRequest("b", "<|image_pad|><|image_pad|> two", [b"img-b1", b"img-b2"]),
            GenerationRequest("u", "also text")]
    kwargs, _ = sglang_generate_input(reqs, sampling, POLICY)
    texts, images = sglang_normalized_images(kwargs)
    by_prompt = {r.prompt: r.images for r in reqs}
    assert len(texts) == len(images) == len(reqs) * sampling.n
    for text, entry in zip(texts, images):
        want = by_prompt[text]
        assert has_valid_data(entry) == bool(want), (text, entry)
        if want:
            assert entry == want, (text, entry)  # one list of this request's images, not wrapped again


# -------------------------------------------------------------------------------------- (d) output conversion


@pytest.fixture(scope="module")
def sglang_output_parts():
    """SGLang's finish-reason classes (schedule_batch.py) and its log-prob formatting (tokenizer_manager.py)."""
    finish = src.sglang_defs("srt/managers/schedule_batch.py", [
        "BaseFinishReason", "FINISH_MATCHED_TOKEN", "FINISH_MATCHED_STR", "FINISH_LENGTH", "FINISH_ABORT"],
        {"Union": object, "List": list})
    fmt = src.sglang_defs("srt/managers/tokenizer_manager.py", ["detokenize_logprob_tokens"], {"List": list},
                          class_name="TokenizerManager")["detokenize_logprob_tokens"]
    return finish, fmt


def sglang_output(parts, reason, ids, logprobs, text="", prompt=(5, 6, 7)):
    finish, fmt = parts
    # the keys TokenizerManager._handle_batch_output writes for a finished, non-streamed request with return_logprob
    return {
        "text": text,
        "output_ids": list(ids),
        "meta_info": {
            "id": "0f3a", "finish_reason": reason.to_json(), "prompt_tokens": len(prompt), "weight_version": "default",
            "num_retractions": 0, "input_token_logprobs": [],
            "output_token_logprobs": fmt(None, list(logprobs), list(ids), False),
            "output_token_logprobs_length": len(ids), "reasoning_tokens": 0, "completion_tokens": len(ids),
            "cached_tokens": 0,
        },
        "prompt_token_ids": list(prompt),
    }


def test_output_conversion(sglang_output_parts):
    finish, _ = sglang_output_parts
    req = GenerationRequest("q1", "<|image_pad|> how many?", ["x.png"])
    out = sglang_output(sglang_output_parts, finish["FINISH_MATCHED_TOKEN"](matched=2), [11, 12, 2], [-0.5, -1.0, -0.1],
                        "\\boxed{3}")
    r = from_sglang_output(req, 1, out)
    assert (r.request_id, r.sample_index, r.prompt_ids, r.response_ids) == ("q1", 1, [5, 6, 7], [11, 12, 2])
    assert r.response_logprobs == [-0.5, -1.0, -0.1] and r.finish_reason == "stop" and r.text == "\\boxed{3}"
    assert r.error is None
    r = from_sglang_output(req, 0, sglang_output(sglang_output_parts, finish["FINISH_MATCHED_STR"](matched="</a>"),
                                                 [11, 13], [-0.2, -0.3], "x</a>"))
    assert r.finish_reason == "stop" and r.text == "x</a>"
    r = from_sglang_output(req, 0, sglang_output(sglang_output_parts, finish["FINISH_LENGTH"](length=2), [11, 12],
                                                 [-0.2, -0.3]))
    assert r.finish_reason == "length" and len(r.response_logprobs) == 2


def test_aborted_output_becomes_error_rollout(sglang_output_parts):
    finish, _ = sglang_output_parts
    out = sglang_output(sglang_output_parts, finish["FINISH_ABORT"](message="prompt too long"), [], [])
    r = from_sglang_output(GenerationRequest("q9", "p"), 3, out)
    assert r.finish_reason == "error" and r.sample_index == 3 and "prompt too long" in r.error and "q9" in r.error
    assert r.response_ids == [] and r.response_logprobs == []


def test_output_contract_violations_raise(sglang_output_parts):
    finish, _ = sglang_output_parts
    out = sglang_output(sglang_output_parts, finish["FINISH_LENGTH"](length=2), [11, 12], [-0.2, -0.3])
    out["output_ids"] = [11, 99]
    with pytest.raises(ValueError, match="disagree"):
        from_sglang_output(GenerationRequest("q", "p"), 0, out)
    del out["meta_info"]["output_token_logprobs"]
    with pytest.raises(ValueError, match="return_logprob"):
        from_sglang_output(GenerationRequest("q", "p"), 0, out)

