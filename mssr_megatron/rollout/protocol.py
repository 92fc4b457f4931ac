"""What the trainer says to a rollout engine, and what it gets back. The trainer never imports an engine's library.

An engine is anything with
    generate(requests, sampling) -> list[Rollout]        n samples per request, flat, in request order
    update_weights(buckets)                              buckets of full HF-named tensors (WeightBucket)
    release_memory()                                     free weights + KV cache while training shares the GPU
    resume_memory(tags=None)                             re-allocate MEMORY_TAGS ("weights", then "kv_cache"; None: all)
    shutdown()
Released weights are not kept: after resume_memory(["weights"]) the engine serves only once update_weights has filled
them (factory.Colocation orders the calls: release, resume weights, sync, resume KV cache).
A bad request (missing image, empty prompt, max_new_tokens 0) yields Rollouts with finish_reason "error" and the
error text for that request only; the other requests are generated normally.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol, Union

from mssr_megatron.rollout.buckets import WeightBucket

#: What `resume_memory` brings back, in the order a colocated step needs it: the weights (filled by the next weight
#: sync), then the KV cache (once the sync's buffers are gone).
MEMORY_TAGS = ("weights", "kv_cache")

ImageInput = Union[str, bytes, "PIL.Image.Image"]  # noqa: F821 - a path, encoded bytes, or a decoded image


@dataclass
class SamplingParams:
    """Sampling settings of one generate call (the same for every request in it)."""

    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k: int = -1
    """Top-k cut-off (-1 = off)."""
    max_new_tokens: int = 512
    """Maximum response tokens."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a response (kept in the response); the tokenizer's end-of-turn token always does."""
    n: int = 1
    """Samples per request."""
    seed: int | None = None
    """Seed for reproducible sampling (engine-specific streams)."""


@dataclass
class GenerationRequest:
    """One prompt: chat-templated text with one image placeholder per entry of `images`."""

    request_id: str
    prompt: str
    images: list[ImageInput] = field(default_factory=list)


FinishReason = Literal["stop", "length", "error"]


@dataclass
class Rollout:
    """One sample of one request."""

    request_id: str
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    """Log-prob of each response token under the engine's sampling distribution (temperature applied)."""
    finish_reason: FinishReason
    text: str = ""
    error: str | None = None


class RolloutEngine(Protocol):
    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Rollout]: ...

    def update_weights(self, buckets: Iterable[WeightBucket]) -> None: ...

    def release_memory(self) -> None: ...

    def resume_memory(self, tags: list[str] | None = None) -> None: ...

    def shutdown(self) -> None: ...
