"""vLLM rollout engine (offline `vllm.LLM`) behind the same protocol, for clusters that prefer vLLM to SGLang.

Facts this module relies on, read from vLLM 0.33's source (re-check on upgrades):
  * LLM(model, tensor_parallel_size, gpu_memory_utilization, seed, enable_sleep_mode, logprobs_mode,
    worker_extension_cls, ...). logprobs_mode defaults to "raw_logprobs" (before temperature); "processed_logprobs"
    is after the logit bias, temperature and top-k/top-p: the distribution sampled from, as the HF engine reports.
  * SamplingParams(n, temperature (0 = greedy), top_p, top_k (0 or -1 = off), max_tokens, stop, stop_token_ids,
    include_stop_str_in_output, seed (child i of an n > 1 request gets seed + i), logprobs=0 (the sampled token's
    log-prob only), logit_bias {id: bias} (the constructor does not clamp it; `from_optional` clamps to +-100)).
  * Prompts: {"prompt": text, "multi_modal_data": {"image": [PIL images]}}. Output: RequestOutput.prompt_token_ids
    and .outputs[k] (CompletionOutput: token_ids, text, logprobs = one {token_id: Logprob(logprob, ...)} per
    position, finish_reason "stop" | "length" | "abort" | ...).
  * Weights: `llm.collective_rpc(method_name, args=...)` calls a method of every worker; methods of the class named
    by `worker_extension_cls` are mixed into the worker. Arguments travel through vLLM's msgpack encoder, which sends
    CPU tensors zero-copy and needs VLLM_ALLOW_INSECURE_SERIALIZATION for anything else, so a bucket goes as its CPU
    byte buffer plus plain-list metadata and is rebuilt on the worker (`rebuild_bucket`) and loaded with the model's
    own `load_weights` (which maps published HF names). After an update: `llm.reset_prefix_cache()` and
    `llm.llm_engine.reset_encoder_cache()` (cached vision embeddings were computed with the old weights).
  * Memory: `llm.sleep(level)` (1: weights to host memory, KV cache dropped; 2: both dropped) and `llm.wake_up(tags)`
    with tags from "weights", "kv_cache" (None = all); needs enable_sleep_mode=True at start.
"""

from __future__ import annotations

import importlib
import io
import os
from typing import Iterable

import torch

from mssr_megatron.rollout.buckets import WeightBucket
from mssr_megatron.rollout.engine_common import BLOCK_BIAS, IMAGE_TOKEN, TokenPolicy, error_rollouts, generate_isolated
from mssr_megatron.rollout.protocol import GenerationRequest, Rollout, SamplingParams

VLLM_MISSING = "rollout.engine=vllm needs vLLM on a CUDA node: pip install 'mssr-megatron[vllm]' (README)"

#: Import path of the worker extension (vLLM imports it inside each worker process).
WORKER_EXTENSION = "mssr_megatron.rollout.vllm_engine.VLLMWeightLoader"


def _vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        raise ImportError(f"{VLLM_MISSING} (importing vllm failed: {exc})") from exc


# ----------------------------------------------------------------------------------------------- pure conversions


def vllm_engine_kwargs(model_dir, rollout_cfg, **overrides) -> dict:
    """Keyword arguments of `vllm.LLM` for one engine of `rollout_cfg` (RolloutConfig)."""
    kwargs = {
        "model": os.fspath(model_dir),
        "tensor_parallel_size": rollout_cfg.engine_tp_size,
        "gpu_memory_utilization": rollout_cfg.mem_fraction,
        "enable_sleep_mode": rollout_cfg.colocate,
        "seed": rollout_cfg.seed,
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": WORKER_EXTENSION,
    }
    kwargs.update(overrides)
    return kwargs


def to_vllm_sampling_kwargs(sampling: SamplingParams, *, seed: int | None = None,
                            policy: TokenPolicy | None = None) -> dict:
    """Keyword arguments of `vllm.SamplingParams` for `sampling` (seed overridable per request)."""
    kwargs = {
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else 0,  # 0 = off
        "max_tokens": sampling.max_new_tokens,
        "logprobs": 0,  # the sampled token's log-prob, no alternatives
        "include_stop_str_in_output": True,  # the protocol keeps a matched stop string
    }
    if sampling.stop:
        kwargs["stop"] = list(sampling.stop)
    seed = sampling.seed if seed is None else seed
    if seed is not None:
        kwargs["seed"] = int(seed)
    if policy is not None and policy.stop_ids:
        kwargs["stop_token_ids"] = list(policy.stop_ids)
    if policy is not None and policy.blocked_ids:
        kwargs["logit_bias"] = {int(i): BLOCK_BIAS for i in policy.blocked_ids}
    return kwargs


def vllm_prompt(request: GenerationRequest) -> dict:
    """A vLLM prompt dict; images decoded to PIL RGB (vLLM takes images, not paths or bytes)."""
    from PIL import Image

    images = []
    for image in request.images:
        if isinstance(image, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(image)))
        elif isinstance(image, (str, os.PathLike)):
            image = Image.open(os.fspath(image))
        images.append(image.convert("RGB") if image.mode != "RGB" else image)
    prompt = {"prompt": request.prompt}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    return prompt


def from_vllm_completion(request: GenerationRequest, sample_index: int, completion, prompt_ids) -> Rollout:
    """One vLLM CompletionOutput -> Rollout (finish reasons other than stop/length become error rollouts)."""
    reason = completion.finish_reason
    if reason not in ("stop", "length"):
        rollout = error_rollouts(request, 1, f"vLLM finished with {reason!r}")[0]
        rollout.sample_index = sample_index
        return rollout
    ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(ids):
        raise ValueError(f"vLLM returned no per-token log-probs for request {request.request_id!r}: set logprobs=0")
    logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, ids)]
    return Rollout(request.request_id, sample_index, [int(t) for t in prompt_ids or []], ids, logprobs, reason,
                   completion.text or "")


def bucket_rpc_args(bucket: WeightBucket) -> tuple[torch.Tensor, list[list]]:
    """(CPU byte buffer, [[name, dtype name, shape, start, end], ...]): a bucket as vLLM's RPC encoder carries it."""
    metadata = [[m.name, str(m.dtype).removeprefix("torch."), list(m.shape), m.start_idx, m.end_idx]
                for m in bucket.metadata]
    return bucket.flat.detach().cpu(), metadata


def rebuild_bucket(flat: torch.Tensor, metadata: list[list]) -> list[tuple[str, torch.Tensor]]:
    """The inverse of `bucket_rpc_args` (views of `flat`)."""
    return [(name, flat[start:end].view(getattr(torch, dtype)).view(shape))
            for name, dtype, shape, start, end in metadata]


# ------------------------------------------------------------------------------------------------------ the engine


class VLLMWeightLoader:
    """GPU-only: not run in CI (no CUDA here). Mixed into each vLLM GPU worker through `worker_extension_cls`;
    `self` is the worker (it has `device` and `model_runner`)."""

    def mssr_load_bucket(self, flat: torch.Tensor, metadata: list[list]) -> None:
        weights = rebuild_bucket(flat.to(self.device), metadata)
        self.model_runner.get_model().load_weights(weights)


class VLLMEngine:
    """GPU-only: not run in CI (no CUDA here). The `RolloutEngine` protocol on an offline `vllm.LLM`."""

    def __init__(self, model_dir, rollout_cfg, *, policy: TokenPolicy | None = None, image_token: str = IMAGE_TOKEN,
                 sleep_level: int = 1, **llm_overrides):
        vllm = _vllm()
        self.policy = policy if policy is not None else TokenPolicy.from_model_dir(model_dir)
        self.image_token = image_token
        # Level 1 keeps a host copy of the weights, so generating after resume_memory without an update still works;
        # level 2 saves that host memory when every resume is followed by update_weights.
        self.sleep_level = sleep_level
        self._sampling_cls = vllm.SamplingParams
        self._llm = vllm.LLM(**vllm_engine_kwargs(model_dir, rollout_cfg, **llm_overrides))

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Rollout]:
        """n rollouts per request, flat, in request order; a bad request fails alone (`generate_isolated`)."""
        return generate_isolated(requests, sampling, lambda batch, positions: self._run(batch, sampling, positions),
                                 self.image_token)

    def _run(self, requests, sampling, positions) -> list[list[Rollout]]:
        if sampling.seed is None:
            params = self._sampling_cls(**to_vllm_sampling_kwargs(sampling, policy=self.policy))
        else:  # one seed per request (vLLM adds the sample index), the same alone as in a batch
            params = [self._sampling_cls(**to_vllm_sampling_kwargs(
                sampling, seed=sampling.seed + p * sampling.n, policy=self.policy)) for p in positions]
        outputs = self._llm.generate([vllm_prompt(r) for r in requests], params, use_tqdm=False)
        return [[from_vllm_completion(request, k, completion, output.prompt_token_ids)
                 for k, completion in enumerate(output.outputs)]
                for request, output in zip(requests, outputs, strict=True)]

    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        for bucket in buckets:  # each call returns when every worker has loaded the bucket
            flat, metadata = bucket_rpc_args(bucket)
            self._llm.collective_rpc("mssr_load_bucket", args=(flat, metadata))
        self._llm.reset_prefix_cache()
        self._llm.llm_engine.reset_encoder_cache()

    def release_memory(self) -> None:
        """Sleep: the KV cache is dropped, the weights go to host memory (level 1) or are dropped (level 2)."""
        self._llm.sleep(level=self.sleep_level)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Wake up `protocol.MEMORY_TAGS` (vLLM's own tag names; None: all): "weights" before the weight sync,
        "kv_cache" after it."""
        self._llm.wake_up(tags=tags)

    def shutdown(self) -> None:
        self._llm.llm_engine.engine_core.shutdown()
