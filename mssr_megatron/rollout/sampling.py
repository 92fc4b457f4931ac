"""The sampling distribution of the embedded engine, written out once so that the trainer can reproduce it exactly.

For one decoding step with raw logits z [..., V] (float32), `sampling_scores` returns the scores whose softmax IS the
distribution a token is drawn from:

    1. blocked tokens -> -inf        (`blocked_token_ids`: vision placeholders, <|im_start|>, <|endoftext|>, and the
                                      padded rows of an embedding larger than the tokenizer)
    2. greedy (temperature 0): stop here; the argmax is taken and the reported log-prob is log_softmax(step 1)
    3. z / temperature
    4. top-k (k > 0): tokens below the k-th largest score -> -inf (ties at the k-th value are kept)
    5. top-p (p < 1): on the tempered, top-k-filtered distribution, drop the tokens whose preceding cumulative mass
       (sorted by probability) is already >= p; the most likely token is always kept

Rollout log-probs are log_softmax of these scores at the sampled token, i.e. the log-prob under the renormalised,
filtered distribution actually sampled from (the same order as transformers', SGLang's and vLLM's samplers). The
trainer must mask the same blocked tokens (and apply the same temperature) when it recomputes log-probs, or the
importance ratio is off by the blocked mass.

Why block: a sampled `<|image_pad|>` (or another vision placeholder) in a response breaks the next forward that
includes it ("Image features and image tokens do not match"), `<|im_start|>` would open a new chat turn inside a
response, and `<|endoftext|>` is the pad token (it would be indistinguishable from padding). `<|im_end|>` stays
allowed: it is the end-of-turn token that ends a response.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

from mssr_megatron.models.special_tokens import (
    ENDOFTEXT_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_END_TOKEN,
    VISION_PAD_TOKEN,
    VISION_START_TOKEN,
)

#: Tokens never sampled into a response (see the module docstring for why each one).
BLOCKED_TOKENS: tuple[str, ...] = (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    VISION_PAD_TOKEN,
    IM_START_TOKEN,
    ENDOFTEXT_TOKEN,
)


def blocked_token_ids(tokenizer, vocab_size: int | None = None) -> list[int]:
    """Ids that are never sampled: the :data:`BLOCKED_TOKENS` the tokenizer has, plus every id in
    ``[len(tokenizer), vocab_size)`` (embedding rows without a token, e.g. Qwen's 151936-row embedding over a
    151665-token tokenizer) when the model's ``vocab_size`` is given. Sorted."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in BLOCKED_TOKENS if t in vocab}
    if vocab_size is not None:
        ids.update(range(len(tokenizer), vocab_size))
    return sorted(ids)


def blocked_mask(blocked_ids: Sequence[int], vocab_size: int, device=None) -> torch.Tensor:
    """Bool mask [V], True at the blocked ids."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[list(blocked_ids)] = True
    return mask


def sampling_scores(
    logits: torch.Tensor, blocked: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0
) -> torch.Tensor:
    """Scores [..., V] (float32) whose softmax is the sampling distribution for raw ``logits`` [..., V]; ``blocked``
    is the bool mask [V] of :func:`blocked_mask`. Temperature 0 (greedy) only masks. See the module docstring."""
    neg_inf = float("-inf")
    scores = logits.float().masked_fill(blocked, neg_inf)
    if temperature == 0:
        return scores
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, neg_inf)
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # 0 for the most likely token, so it is always kept
        drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        scores = scores.masked_fill(drop, neg_inf)
    return scores


class SamplingProcessor(LogitsProcessor):
    """The only logits processor `generate` runs (the engine leaves transformers' own warpers off), so the scores
    it returns are exactly those sampled from. It also records, step by step, the log-prob of the token chosen from
    them: at step t+1 the token chosen at step t is the last column of ``input_ids``; ``finish`` takes the last one.
    Memory: one [B, V] log-softmax at a time, not [T, B, V] like ``output_scores``."""

    def __init__(self, blocked: torch.Tensor, temperature: float, top_k: int, top_p: float):
        self.blocked, self.temperature, self.top_k, self.top_p = blocked, temperature, top_k, top_p
        self._steps: list[torch.Tensor] = []  # [B] each: log-prob of the token chosen at that step
        self._last: torch.Tensor | None = None  # [B, V] log-softmax of the latest step's scores

    def _take(self, chosen: torch.Tensor) -> None:
        if self._last is not None:
            self._steps.append(self._last.gather(-1, chosen[:, None]).squeeze(-1))
            self._last = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])  # on the first call there is no previous step and this is a no-op
        scores = sampling_scores(scores, self.blocked, self.temperature, self.top_k, self.top_p)
        self._last = torch.log_softmax(scores, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, T] of the generated tokens; ``sequences`` [B, prompt + T] is what `generate` returned."""
        self._take(sequences[:, -1])
        if not self._steps:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        return torch.stack(self._steps, dim=1)


def _window(stops: Sequence[str]) -> int:
    # A token carries at least one byte and a character at most four, so this many trailing tokens always cover a
    # stop string that ends at the last one.
    return 4 * max(len(s) for s in stops) + 4


def _has_stop(tokenizer, ids: list[int], stops: Sequence[str]) -> bool:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return any(s in text for s in stops)


class StopStringCriteria(StoppingCriteria):
    """Per-row stop on any of ``stops`` appearing in the decoded response. Only the trailing tokens are decoded at
    each step (a stop string that ended earlier already stopped its row)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, [s for s in stops if s], prompt_len
        self.window = _window(self.stops) if self.stops else 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if self.stops:
            tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window) :].tolist()
            done = torch.tensor([_has_stop(self.tokenizer, tail, self.stops) for tail in tails], dtype=torch.bool)
        return done.to(input_ids.device)


def cut_response(
    tokenizer, ids: list[int], stop_ids: Sequence[int], stops: Sequence[str]
) -> tuple[int, bool]:
    """Where a generated row ends: ``(length, stopped)``. The response is ``ids[:length]``; it ends right after the
    first stop token (kept) or the token that completes the first stop string (kept), whichever comes first;
    ``stopped`` is False when neither occurs (the row ran to max_new_tokens, or is padding after it)."""
    stop_set = set(stop_ids)
    end = next((i + 1 for i, t in enumerate(ids) if t in stop_set), None)
    stops = [s for s in stops if s]
    if stops:
        window = _window(stops)
        limit = len(ids) if end is None else end - 1  # a stop string must complete before the stop token
        for t in range(1, limit + 1):
            if _has_stop(tokenizer, ids[max(0, t - window) : t], stops):
                end = t
                break
    return (len(ids), False) if end is None else (end, True)
