"""SGLang rollout engine: one offline `sglang.Engine` per placement slot (its own TP size; rollout/placement.py).

Facts this module relies on, read from SGLang 0.5.23's source (the version CI installs; re-check on upgrades):
  * Engine(**ServerArgs fields): model_path, tp_size, mem_fraction_static, enable_memory_saver (needed for
    release/resume), random_seed, base_gpu_id, enable_deterministic_inference (sampling_seed is ignored without it).
  * Sampling dict -> `srt/sampling/sampling_params.SamplingParams(**d)`, then normalize(tokenizer), verify(vocab):
    max_new_tokens, temperature (0 = greedy: becomes top_k=1), top_p, top_k (-1 = off), stop, stop_token_ids, n,
    no_stop_trim (keep a matched stop string in the text), logit_bias {str(id): bias}, sampling_seed. With n > 1 all
    samples of a request share one sampling_params, hence one seed: seeded calls are expanded here, one seed each.
  * Output (one dict per sample, request-major for n > 1): "text", "output_ids" (untrimmed: ends with the eos or the
    token completing the stop string), "prompt_token_ids" (with return_prompt_token_ids), "meta_info" with "id",
    "finish_reason" ({"type": "stop", "matched": id|str} | {"type": "length", "length": n} | {"type": "abort",
    "message": ...}), "prompt_tokens", "completion_tokens", "cached_tokens", and with return_logprob
    "output_token_logprobs" = [(logprob, token_id, text|None), ...]. The log-prob is log_softmax((logits + bias) / T)
    (greedy: T = 1), taken BEFORE top-k/top-p truncation; the HF engine reports it after (equal when both are off).
  * Weights: update_weights_from_tensor(named_tensors=<one serialized payload per TP rank>,
    load_format="flattened_bucket", flush_cache) where a payload is MultiprocessingSerializer.serialize({
    "flattened_tensor": uint8 tensor, "metadata": [FlattenedTensorMetadata, ...]}). Each TP worker unpickles only
    payloads[tp_rank] with SGLang's SafeUnpickler, which admits SGLang's FlattenedTensorMetadata and torch rebuild
    functions only (not this project's TensorMeta). Every update must run between begin_weight_update() and
    end_weight_update(). update_weights_from_distributed(names, dtypes, shapes, group_name, flush_cache,
    load_format="flattened_bucket") receives ONE broadcast into `FlattenedTensorBucket.empty(names, dtypes, shapes)`
    (unpadded layout); with load_format=None one broadcast per tensor.
  * Memory: release_memory_occupation(tags) / resume_memory_occupation(tags), tags from "weights", "kv_cache",
    "cuda_graph" (None = all); the scheduler asserts it is idle. The offline Engine has no pause_generation (that is an
    HTTP/TokenizerManager call): this engine is driven synchronously, so nothing is in flight when weights change, and
    SGLang's model-update lock would wait for in-flight requests anyway.
  * SGLang caches vision-encoder outputs by image hash (SGLANG_VLM_CACHE_SIZE_MB, default 100) and no weight update
    or cache flush clears that cache: with a trained vision tower a repeated image would be encoded by old weights,
    so this engine sets the cache size to 0 unless the environment sets it.

The pure functions (engine arguments, sampling dict, request batch, output conversion, weight payload) are tested
on CPU against SGLang's own classes in tests/test_sglang_payloads.py; the serving itself needs CUDA.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from typing import Callable, Iterable

import torch

from mssr_megatron.rollout.buckets import WeightBucket
from mssr_megatron.rollout.engine_common import BLOCK_BIAS, IMAGE_TOKEN, TokenPolicy, error_rollouts, generate_isolated
from mssr_megatron.rollout.protocol import GenerationRequest, Rollout, SamplingParams

SGLANG_MISSING = "rollout.engine=sglang needs SGLang on a CUDA node: pip install 'mssr-megatron[sglang]' (README)"

#: SGLang's memory tags (srt/constants.py).
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def _sglang(module: str = "sglang"):
    """Import an SGLang module, or fail with the one-line install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{SGLANG_MISSING} (importing {module} failed: {exc})") from exc


# ----------------------------------------------------------------------------------------------- pure conversions


def sglang_engine_kwargs(model_dir, rollout_cfg, *, base_gpu_id: int = 0, deterministic: bool = False,
                         **overrides) -> dict:
    """Keyword arguments of `sglang.Engine` (ServerArgs fields) for one engine of `rollout_cfg` (RolloutConfig)."""
    kwargs = {
        "model_path": os.fspath(model_dir),
        "tp_size": rollout_cfg.engine_tp_size,
        "mem_fraction_static": rollout_cfg.mem_fraction,
        # release/resume only work on memory allocated through torch_memory_saver from the start
        "enable_memory_saver": rollout_cfg.colocate,
        "random_seed": rollout_cfg.seed,
        "base_gpu_id": base_gpu_id,
        "log_level": "error",
    }
    if deterministic:  # the only mode in which SGLang honours sampling_seed
        kwargs["enable_deterministic_inference"] = True
    kwargs.update(overrides)
    return kwargs


def to_sglang_sampling_params(sampling: SamplingParams, *, n: int | None = None, seed: int | None = None,
                              policy: TokenPolicy | None = None) -> dict:
    """The sampling_params dict SGLang takes for `sampling` (n and seed overridable for expanded requests)."""
    params = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,  # SGLang rejects 0; -1 = whole vocabulary
        "n": sampling.n if n is None else n,
        "no_stop_trim": True,  # the protocol keeps a matched stop string in the response
    }
    if sampling.stop:
        params["stop"] = list(sampling.stop)
    if policy is not None and policy.stop_ids:
        params["stop_token_ids"] = list(policy.stop_ids)
    if policy is not None and policy.blocked_ids:
        params["logit_bias"] = {str(i): BLOCK_BIAS for i in policy.blocked_ids}
    if seed is not None:
        params["sampling_seed"] = int(seed)
    return params


def sglang_memory_tags(tags: list[str] | None) -> list[str] | None:
    """SGLang's memory tags for the protocol's `MEMORY_TAGS` (None: all of them)."""
    if tags is None:
        return None
    mapping = {"weights": ["weights"], "kv_cache": ["kv_cache", "cuda_graph"]}
    unknown = sorted(set(tags) - set(mapping))
    if unknown:
        raise ValueError(f"unknown memory tags {unknown}; the tags are {sorted(mapping)}")
    return [sglang_tag for tag in tags for sglang_tag in mapping[tag]]


def sglang_image(image):
    """An image as SGLang's load_image takes it: PIL images and bytes as they are, a file path as its bytes (SGLang
    would read a path without an image extension as base64)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(os.fspath(image), "rb") as f:
            return f.read()
    return image


def sglang_generate_input(requests: list[GenerationRequest], sampling: SamplingParams,
                          policy: TokenPolicy | None = None,
                          request_indices: list[int] | None = None) -> tuple[dict, list[tuple[int, int]]]:
    """(GenerateReqInput keyword arguments, layout) for one batch; layout[k] = (request position, sample index) of
    SGLang's k-th output. Unseeded: one entry per request with n samples (SGLang prefills the prompt once).
    Seeded: n entries per request, each n=1 with seed + (request index * n + sample), so samples differ and a
    request gets the same seeds alone as in a batch (`request_indices`: positions in the caller's list)."""
    indices = list(range(len(requests))) if request_indices is None else list(request_indices)
    if sampling.seed is None:
        entries = [(r, None) for r in range(len(requests))]
        params: dict | list[dict] = to_sglang_sampling_params(sampling, policy=policy)
        layout = [(r, s) for r in range(len(requests)) for s in range(sampling.n)]
    else:
        entries = [(r, s) for r in range(len(requests)) for s in range(sampling.n)]
        params = [to_sglang_sampling_params(sampling, n=1, seed=sampling.seed + indices[r] * sampling.n + s,
                                            policy=policy) for r, s in entries]
        layout = entries
    kwargs = {
        "text": [requests[r].prompt for r, _ in entries],
        "sampling_params": params,
        "return_logprob": True,
        "logprob_start_len": -1,  # output tokens only
        "top_logprobs_num": 0,
        "return_text_in_logprobs": False,
        "return_prompt_token_ids": True,
        "stream": False,
    }
    if any(requests[r].images for r, _ in entries):
        # A text-only entry gets [], never None: GenerateReqInput._normalize_image_data keeps a list of lists only
        # when the FIRST entry is a list, and otherwise wraps every entry once more (a leading None would turn the
        # other requests' image lists into one nested "image" each).
        kwargs["image_data"] = [[sglang_image(im) for im in requests[r].images] for r, _ in entries]
    return kwargs, layout


def from_sglang_output(request: GenerationRequest, sample_index: int, output: dict,
                       prompt_ids: list[int] | None = None) -> Rollout:
    """One SGLang output dict -> Rollout. An aborted sample becomes an error rollout; output ids that disagree with
    the log-prob entries raise (a broken contract, not a bad request)."""
    meta = output["meta_info"]
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in ("stop", "length"):
        detail = finish.get("message") if isinstance(finish, dict) else None
        rollout = error_rollouts(request, 1, f"SGLang finished with {kind!r}: {detail or finish!r}")[0]
        rollout.sample_index = sample_index
        return rollout
    response_ids = [int(t) for t in output["output_ids"]]
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise ValueError("SGLang output has no output_token_logprobs: the request must set return_logprob=True")
    if [int(e[1]) for e in entries] != response_ids:
        raise ValueError(f"SGLang output ids and log-prob ids disagree for request {request.request_id!r}")
    prompt = output.get("prompt_token_ids") or prompt_ids or []
    return Rollout(request.request_id, sample_index, [int(t) for t in prompt], response_ids,
                   [float(e[0]) for e in entries], kind, output.get("text") or "")


def flattened_bucket_payload(bucket: WeightBucket, tp_size: int,
                             serialize: Callable[[object], bytes] | None = None) -> list[bytes]:
    """What `Engine.update_weights_from_tensor(named_tensors=..., load_format="flattened_bucket")` receives for one
    bucket: one serialized {"flattened_tensor", "metadata"} per TP rank (each rank deserializes only its own copy, so
    CUDA-IPC references are dropped after every load). A CUDA bucket travels as an IPC handle, not as data: every TP
    rank copies from the trainer's GPU, and that copy may still be running when the update call returns (SGLang does
    not synchronise its stream), so the bucket must never be overwritten (`SGLangEngine.reads_buckets_after_return`:
    one buffer per bucket; GPU-only: not run (no GPU was available)). `serialize` defaults to SGLang's
    MultiprocessingSerializer with its UUID-based CUDA-IPC reductions; tests pass the same serializer loaded without
    SGLang's CUDA deps."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    meta_cls = _sglang("sglang.srt.weight_sync.tensor_bucket").FlattenedTensorMetadata
    metadata = [meta_cls(name=m.name, shape=torch.Size(m.shape), dtype=m.dtype, start_idx=m.start_idx,
                         end_idx=m.end_idx, numel=m.numel) for m in bucket.metadata]
    if serialize is None:
        _sglang("sglang.srt.utils.patch_torch").monkey_patch_torch_reductions()  # GPU UUIDs, not local indices
        serialize = _sglang("sglang.srt.utils.common").MultiprocessingSerializer.serialize
    payload = {"flattened_tensor": bucket.flat, "metadata": metadata}
    return [serialize(payload) for _ in range(tp_size)]


# ------------------------------------------------------------------------------------------------------ the engine


class SGLangEngine:
    """GPU-only: not run in CI (no CUDA here). The `RolloutEngine` protocol on an offline `sglang.Engine`.

    One engine per placement slot, TP size `rollout.engine_tp_size`, GPUs from `base_gpu_id` (the slot's first
    GPU; several engines on one node each get their own IPC sockets and NCCL port); memory saver on when colocated so
    that `release_memory` frees weights, KV cache and CUDA graphs while training. Sampling follows the HF engine's
    token policy (blocked ids, end ids; `engine_common.TokenPolicy`)."""

    #: SGLang's flattened-bucket load copies from a CUDA-IPC view of the bucket on its own stream and returns without
    #: synchronising it, so `sync_weights` must not overwrite a sent bucket (it gives each bucket its own buffer).
    reads_buckets_after_return = True

    def __init__(self, model_dir, rollout_cfg, *, base_gpu_id: int = 0, deterministic: bool = False,
                 policy: TokenPolicy | None = None, image_token: str = IMAGE_TOKEN, **engine_overrides):
        sglang = _sglang("sglang")
        self.tp_size = rollout_cfg.engine_tp_size
        self.image_token = image_token
        self.policy = policy if policy is not None else TokenPolicy.from_model_dir(model_dir)
        os.environ.setdefault("SGLANG_VLM_CACHE_SIZE_MB", "0")  # see module docstring: stale vision features
        self._engine = sglang.Engine(**sglang_engine_kwargs(model_dir, rollout_cfg, base_gpu_id=base_gpu_id,
                                                            deterministic=deterministic, **engine_overrides))

    # generation ------------------------------------------------------------------------------------------------

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Rollout]:
        """n rollouts per request, flat, in request order; a bad request fails alone (`generate_isolated`)."""
        if (sampling.top_p < 1 or sampling.top_k > 0) and sampling.temperature > 0:
            warnings.warn("SGLang reports log-probs before top-k/top-p truncation (the HF engine after)", stacklevel=2)
        return generate_isolated(requests, sampling, lambda batch, positions: self._run(batch, sampling, positions),
                                 self.image_token)

    def _run(self, requests, sampling, indices) -> list[list[Rollout]]:
        io_struct = _sglang("sglang.srt.managers.io_struct")
        kwargs, layout = sglang_generate_input(requests, sampling, self.policy, indices)
        # What Engine.generate does, with return_prompt_token_ids (which Engine.generate does not forward in 0.5.23).
        manager = self._engine.tokenizer_manager
        outputs = self._engine.loop.run_until_complete(
            manager.generate_request(io_struct.GenerateReqInput(**kwargs), None).__anext__())
        groups: list[list] = [[None] * sampling.n for _ in requests]
        for (r, s), output in zip(layout, outputs, strict=True):
            groups[r][s] = from_sglang_output(requests[r], s, output)
        return groups

    # weights ---------------------------------------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Load buckets in place (CUDA IPC, no copy through the host), then flush the prefix cache once: buckets are
        streamed, so the last one is not known in advance. Each bucket must have a buffer of its own
        (`reads_buckets_after_return`): SGLang may still be copying from it after the call returns."""
        with self._weight_update_session():
            for bucket in buckets:
                payload = flattened_bucket_payload(bucket, self.tp_size)
                _check(self._engine.update_weights_from_tensor(
                    named_tensors=payload, load_format="flattened_bucket", flush_cache=False),
                    "update_weights_from_tensor")
        self._flush_cache()

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str, backend: str = "nccl") -> None:
        """Join a trainer's broadcast group: the engine's TP rank r is rank rank_offset + r of it."""
        _check(self._engine.init_weights_update_group(
            master_address=master_address, master_port=master_port, rank_offset=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend), "init_weights_update_group")

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                        group_name: str, flush_cache: bool = False,
                                        load_format: str | None = None) -> None:
        """Receive one bucket broadcast by the trainer (rank 0 of the group) and load it."""
        _check(self._engine.update_weights_from_distributed(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, flush_cache=flush_cache,
            load_format=load_format), "update_weights_from_distributed")

    def connect(self, sender) -> None:
        """Build the broadcast group with a `weight_broadcast.DistributedWeightSender` in this process (both sides
        block until every rank arrives, so the sender runs in a thread)."""
        _together(lambda: self.init_weights_update_group(sender.master_address, sender.master_port, 1,
                                                          sender.world_size, sender.group_name, sender.backend),
                  sender.init_group)

    def update_weights_distributed(self, buckets: Iterable[WeightBucket], sender) -> None:
        """The disaggregated path: NCCL broadcast of each bucket from `sender` (connected with `connect`)."""
        from mssr_megatron.rollout.weight_broadcast import distributed_update_args

        with self._weight_update_session():
            for bucket in buckets:
                args = distributed_update_args(bucket)
                _together(lambda: self.update_weights_from_distributed(group_name=sender.group_name, **args),
                          lambda: sender.send(bucket, args["load_format"]))
        self._flush_cache()

    @contextlib.contextmanager
    def _weight_update_session(self):
        # 0.5.23's scheduler refuses weight updates outside a session; older releases have no sessions.
        begin = getattr(self._engine, "begin_weight_update", None)
        if begin is not None:
            _check(begin(), "begin_weight_update")
        try:
            yield
        except BaseException:
            if begin is not None:
                self._engine.end_weight_update()  # close the session; the update's own error is the one to report
            raise
        if begin is not None:
            _check(self._engine.end_weight_update(), "end_weight_update")

    def _flush_cache(self) -> None:
        result = self._engine.flush_cache()
        if not getattr(result, "success", True):
            raise RuntimeError(f"SGLang flush_cache failed: {getattr(result, 'message', result)}")

    # memory and lifetime ---------------------------------------------------------------------------------------

    def release_memory(self) -> None:
        """Free weights, KV cache and CUDA graphs (all of SGLang's `MEMORY_TAGS`) while training uses the GPUs. The
        weights are not backed up (no enable_weights_cpu_backup): the next weight sync fills them."""
        self._engine.release_memory_occupation(tags=None)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Re-map `protocol.MEMORY_TAGS` (None: all): "weights" as SGLang's "weights"; "kv_cache" as its "kv_cache"
        and "cuda_graph" (the graphs' pools come back last, with the cache they address). SGLang raises for a tag
        that is not released: factory.Colocation resumes each tag once."""
        self._engine.resume_memory_occupation(tags=sglang_memory_tags(tags))

    def shutdown(self) -> None:
        self._engine.shutdown()


def _check(result, what: str) -> None:
    """SGLang's control calls return (success, message); raise on failure."""
    if isinstance(result, tuple) and len(result) >= 2 and not result[0]:
        raise RuntimeError(f"SGLang {what} failed: {result[1]}")


def _together(main: Callable[[], object], side: Callable[[], object], timeout_s: float = 600.0) -> None:
    """Run `side` in a thread while `main` runs here (two ends of one collective); re-raise either's error."""
    errors: list[BaseException] = []

    def run_side():
        try:
            side()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    thread = threading.Thread(target=run_side, daemon=True)
    thread.start()
    try:
        main()
    except BaseException:
        thread.join(timeout=5.0)  # the side may be stuck in the collective for good: do not wait for it
        raise
    thread.join(timeout=timeout_s)
    if errors:
        raise errors[0]
    if thread.is_alive():
        raise TimeoutError(f"the trainer side of a weight broadcast did not finish within {timeout_s} s")
