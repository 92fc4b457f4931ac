"""Pieces the served engines (SGLang, vLLM) share: the token policy of the embedded engine, request checks, error
rollouts, per-request error isolation. Pure Python, no engine library: tested on CPU.

The token policy keeps the served engines sampling from the same distribution as the HF engine (see
`rollout/sampling.py`): the same ids are blocked (vision placeholders, `<|im_start|>`, `<|endoftext|>`, embedding
rows past the tokenizer) and the same ids end a response. Engines block through a logit bias of `BLOCK_BIAS` added
to the logits before the softmax, so the reported log-probs are those of the masked distribution, as the trainer
recomputes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from mssr_megatron.rollout.protocol import GenerationRequest, Rollout, SamplingParams

#: Added to the logits of blocked tokens. Finite (not -inf) so that every serializer on the way to the engine's
#: scheduler carries it; exp(-1e9 / T) is exactly 0 in float32 for any temperature a run uses.
BLOCK_BIAS = -1e9

#: The image placeholder of Qwen2.5-VL chat prompts: one per image in a request's prompt.
IMAGE_TOKEN = "<|image_pad|>"


@dataclass(frozen=True)
class TokenPolicy:
    """Which ids are never sampled and which ids end a response."""

    blocked_ids: tuple[int, ...]
    stop_ids: tuple[int, ...]

    @classmethod
    def from_model_dir(cls, model_dir) -> "TokenPolicy":
        """The policy of the HF checkpoint in `model_dir` (tokenizer, config, generation_config), computed as the HF
        engine computes it: blocked = `sampling.blocked_token_ids`; stop = `<|im_end|>`, the tokenizer's eos and the
        checkpoint's eos ids, minus blocked ids."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from mssr_megatron.models.special_tokens import EOS_TOKEN
        from mssr_megatron.rollout.sampling import blocked_token_ids

        path = os.fspath(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(path)
        vocab_size = AutoConfig.from_pretrained(path).get_text_config().vocab_size
        try:
            checkpoint_eos = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:  # no generation_config.json
            checkpoint_eos = None
        checkpoint_eos = [checkpoint_eos] if isinstance(checkpoint_eos, int) else list(checkpoint_eos or [])
        blocked = blocked_token_ids(tokenizer, vocab_size)
        ends = {tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.eos_token_id, *checkpoint_eos}
        stops = sorted(t for t in ends if t is not None and t not in set(blocked))
        return cls(tuple(blocked), tuple(stops))


def request_error(request: GenerationRequest, sampling: SamplingParams, image_token: str = IMAGE_TOKEN) -> str | None:
    """Why this request cannot be generated (None if it can): checked before a batch goes to a served engine,
    because one bad request there fails the whole batch."""
    if not request.prompt.strip():
        return "empty prompt"
    if sampling.max_new_tokens < 1:
        return f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}"
    placeholders = request.prompt.count(image_token)
    if placeholders != len(request.images):
        return f"prompt has {placeholders} {image_token} placeholders but {len(request.images)} images were given"
    for index, image in enumerate(request.images):
        if image is None:
            return f"image {index} is missing (None)"
        if isinstance(image, (str, os.PathLike)) and not os.path.isfile(os.fspath(image)):
            return f"image {index} ({os.fspath(image)!r}) is not a file"
    return None


def error_rollouts(request: GenerationRequest, n: int, message: str) -> list[Rollout]:
    """The n rollouts of a request that failed: empty, finish_reason "error", the message naming the request."""
    text = f"request {request.request_id!r}: {message}"
    return [Rollout(request.request_id, k, [], [], [], "error", "", text) for k in range(n)]


def generate_isolated(requests: list[GenerationRequest], sampling: SamplingParams,
                      run_batch: Callable[[list[GenerationRequest], list[int]], list[list[Rollout]]],
                      image_token: str = IMAGE_TOKEN) -> list[Rollout]:
    """n rollouts per request, flat, in request order, through `run_batch(requests, positions)` (one list of n
    rollouts per request). Bad requests are caught before the batch; a batch the engine rejects as a whole is retried
    request by request, so only the request that broke it becomes error rollouts."""
    groups: list[list[Rollout] | None] = [None] * len(requests)
    valid = []
    for i, request in enumerate(requests):
        problem = request_error(request, sampling, image_token)
        if problem:
            groups[i] = error_rollouts(request, sampling.n, problem)
        else:
            valid.append(i)
    if valid:
        try:
            done = run_batch([requests[i] for i in valid], valid)
        except Exception:  # noqa: BLE001 - find the request that broke the batch
            done = None
        if done is not None:
            for i, group in zip(valid, done, strict=True):
                groups[i] = group
        else:
            for i in valid:
                try:
                    groups[i] = run_batch([requests[i]], [i])[0]
                except Exception as exc:  # noqa: BLE001 - this request's failure only
                    groups[i] = error_rollouts(requests[i], sampling.n, f"{type(exc).__name__}: {exc}")
    return [rollout for group in groups for rollout in group]
