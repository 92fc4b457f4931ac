"""The embedded rollout engine: Qwen2.5-VL in-process through transformers (`generate` with a KV cache).

Sampling (see `rollout/sampling.py` for the exact distribution): blocked tokens masked, then temperature, top-k,
top-p; greedy when temperature == 0. Transformers' own warpers stay off (its generate applies top_k=50 unless told
otherwise, and a checkpoint's generation_config.json - Qwen ships top_k=1, repetition_penalty=1.05 - would leak in),
so `SamplingProcessor` alone defines what is sampled, and it records each sampled token's log-prob under that
distribution as it goes.

Responses: the tokens up to and including the first end token (`<|im_end|>`, the tokenizer's eos and the
checkpoint's eos ids, minus blocked tokens) or the token that completes the first stop string, finish_reason
"stop"; otherwise max_new_tokens tokens, "length". `text` is the response decoded without special tokens (so a
stop string is kept, `<|im_end|>` is not).

Seeding: with `sampling.seed` set, the whole call runs inside `torch.random.fork_rng` after `torch.manual_seed(seed)`
(the caller's RNG state is restored afterwards). The stream is torch's default generator of the model's device,
consumed by one `torch.multinomial` per decoding step per batch; batches are the rows (request, sample) in request
order, `max_batch_size` at a time. So the same seed, requests and settings give identical rollouts; the same request
in another batch composition gives other (equally valid) samples.

Weight names: buckets carry published Qwen2.5-VL names (`model.layers.*`, `visual.*`, ...). The engine maps them to
its in-memory names by inverting `published_state_dict` of its own model (the export contract of this project,
computed once at load); the tests check that transformers' checkpoint loader renames every published name the same way.
"""

from __future__ import annotations

import io
import os
from contextlib import nullcontext
from typing import Iterable

import torch

from mssr_megatron.checkpoint.mapping import published_to_module_names
from mssr_megatron.models.processor import load_processor
from mssr_megatron.models.special_tokens import EOS_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN
from mssr_megatron.rollout.buckets import WeightBucket, tensor_checksum
from mssr_megatron.rollout.protocol import MEMORY_TAGS, GenerationRequest, Rollout, SamplingParams
from mssr_megatron.rollout.sampling import (
    SamplingProcessor,
    StopStringCriteria,
    blocked_mask,
    blocked_token_ids,
    cut_response,
)

__all__ = ["HFEngine", "blocked_token_ids"]

_SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")  # [1, S] per request: left-padded
_IMAGE_KEYS = ("pixel_values", "image_grid_thw")  # [patches, ...] / [images, 3]: concatenated in row order


class RequestError(ValueError):
    """A problem with one request; it fails that request only."""


def _load_image(image, index: int):
    """A PIL RGB image from a path, encoded bytes or a PIL image; RequestError naming the problem otherwise."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (bytes, bytearray, memoryview)):
        source, label = io.BytesIO(bytes(image)), f"image {index} ({len(image)} bytes)"
    elif isinstance(image, (str, os.PathLike)):
        source, label = os.fspath(image), f"image {index} ({os.fspath(image)!r})"
        if not os.path.isfile(source):
            raise RequestError(f"{label}: no such file")
    else:
        raise RequestError(f"image {index}: unsupported type {type(image).__name__} (a path, bytes or PIL image)")
    try:
        with Image.open(source) as img:
            img.load()  # decode now: a truncated file fails here, not inside the processor
            return img.convert("RGB")
    except Exception as exc:  # PIL raises several types for undecodable data
        raise RequestError(f"{label}: does not decode as an image ({exc})") from None


class HFEngine:
    """In-process Hugging Face rollout engine (implements `RolloutEngine`)."""

    def __init__(self, model_dir, *, dtype: str | torch.dtype = "float32", device="cpu", max_batch_size: int = 16):
        from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.max_batch_size = max_batch_size
        self.processor = load_processor(model_dir)
        self.tokenizer = self.processor.tokenizer
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.fspath(model_dir), dtype=self.dtype)
        self.model = model.to(self.device).eval()
        vocab_size = self.model.config.get_text_config().vocab_size
        self.blocked_ids = blocked_token_ids(self.tokenizer, vocab_size)
        self._blocked = blocked_mask(self.blocked_ids, vocab_size, self.device)
        checkpoint_eos = self.model.generation_config.eos_token_id
        checkpoint_eos = [checkpoint_eos] if isinstance(checkpoint_eos, int) else list(checkpoint_eos or [])
        ends = {self.tokenizer.convert_tokens_to_ids(EOS_TOKEN), self.tokenizer.eos_token_id, *checkpoint_eos}
        self.stop_token_ids = sorted(t for t in ends if t is not None and t not in set(self.blocked_ids))
        self.pad_token_id = self.tokenizer.pad_token_id
        # Drop the checkpoint's sampling defaults: generate() fills unset fields from them (see module docstring).
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.stop_token_ids, pad_token_id=self.pad_token_id
        )
        self._names = published_to_module_names(self.model)
        self._released: set[str] = set()  # MEMORY_TAGS released and not resumed
        self._shapes: list[tuple[torch.Tensor, torch.Size]] = []  # the released weights, to re-allocate
        self._unfilled: set[str] = set()  # weights re-allocated and not yet filled by update_weights

    # ------------------------------------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Rollout]:
        """n rollouts per request, flat, in request order (sample_index 0..n-1 within a request)."""
        self._check_ready()
        if sampling.n < 1 or sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise ValueError(f"invalid sampling settings: n >= 1, temperature >= 0, 0 < top_p <= 1 ({sampling})")
        per_request: list[list[Rollout] | None] = [None] * len(requests)
        encoded: dict[int, dict[str, torch.Tensor]] = {}
        for i, request in enumerate(requests):
            try:
                encoded[i] = self._encode(request, sampling)
            except RequestError as exc:
                message = f"request {request.request_id!r}: {exc}"
                per_request[i] = [
                    Rollout(request.request_id, k, [], [], [], "error", "", message) for k in range(sampling.n)
                ]
        rows = [(i, k) for i in encoded for k in range(sampling.n)]
        done: dict[tuple[int, int], Rollout] = {}
        cuda = self.device.type == "cuda"
        devices = [torch.cuda.current_device() if self.device.index is None else self.device.index] if cuda else []
        rng = torch.random.fork_rng(devices=devices) if sampling.seed is not None else nullcontext()
        with rng, torch.inference_mode():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                batch = [encoded[i] for i, _ in chunk]
                for (i, k), (ids, logprobs, stopped) in zip(chunk, self._generate_batch(batch, sampling)):
                    prompt_ids = encoded[i]["input_ids"][0].tolist()
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    reason = "stop" if stopped else "length"
                    done[i, k] = Rollout(requests[i].request_id, k, prompt_ids, ids, logprobs, reason, text)
        return [
            r
            for i in range(len(requests))
            for r in (per_request[i] or [done[i, k] for k in range(sampling.n)])
        ]

    def _encode(self, request: GenerationRequest, sampling: SamplingParams) -> dict[str, torch.Tensor]:
        """Processor outputs of one request (batch of 1), or RequestError naming what is wrong with it."""
        if sampling.max_new_tokens <= 0:
            raise RequestError(f"max_new_tokens must be positive, got {sampling.max_new_tokens}")
        if not request.prompt or not request.prompt.strip():
            raise RequestError("empty prompt")
        if VIDEO_TOKEN in request.prompt:
            raise RequestError(f"video placeholders ({VIDEO_TOKEN}) are not supported")
        n_placeholders = request.prompt.count(IMAGE_TOKEN)
        if n_placeholders != len(request.images):
            raise RequestError(
                f"{len(request.images)} image(s) given but the prompt has {n_placeholders} {IMAGE_TOKEN} placeholder(s)"
            )
        images = [_load_image(image, j) for j, image in enumerate(request.images)]
        try:
            out = dict(self.processor(text=[request.prompt], images=images or None, return_tensors="pt"))
        except Exception as exc:  # the processor's errors are about this request's inputs
            raise RequestError(f"processor failed: {exc}") from None
        if "mm_token_type_ids" not in out:  # older processors; without it mrope silently falls back to 1-D positions
            image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
            out["mm_token_type_ids"] = (out["input_ids"] == image_id).long()
        return out

    def _collate(self, batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Left-pad the [1, S_i] sequences to [B, max S]; concatenate the image tensors in row order."""
        width = max(enc["input_ids"].shape[1] for enc in batch)
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "mm_token_type_ids": 0}
        out = {}
        for key in _SEQUENCE_KEYS:
            rows = [enc[key][0] for enc in batch]
            padded = torch.full((len(rows), width), pad_values[key], dtype=rows[0].dtype)
            for b, row in enumerate(rows):
                padded[b, width - row.numel() :] = row
            out[key] = padded
        for key in _IMAGE_KEYS:
            parts = [enc[key] for enc in batch if key in enc]
            if parts:
                out[key] = torch.cat(parts, dim=0)
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return {k: v.to(self.device) for k, v in out.items()}

    def _generate_batch(self, batch, sampling: SamplingParams) -> list[tuple[list[int], list[float], bool]]:
        """(response ids, their log-probs, stopped) per row of one padded batch."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        inputs = self._collate(batch)
        prompt_len = inputs["input_ids"].shape[1]
        greedy = sampling.temperature == 0
        processor = SamplingProcessor(self._blocked, sampling.temperature, sampling.top_k, sampling.top_p)
        # transformers' own warpers neutral (top_k=0, not None: None becomes its default 50); SamplingProcessor does
        # all of it. Greedy gets no sampling flags (transformers warns about them).
        neutral = {} if greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        config = GenerationConfig(
            do_sample=not greedy,
            **neutral,
            repetition_penalty=1.0,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        stopping = StoppingCriteriaList([StopStringCriteria(self.tokenizer, sampling.stop, prompt_len)])
        sequences = self.model.generate(
            **inputs,
            generation_config=config,
            logits_processor=LogitsProcessorList([processor]),
            stopping_criteria=stopping if any(sampling.stop) else None,
        )
        logprobs = processor.finish(sequences).cpu()  # [B, T]
        generated = sequences[:, prompt_len:].cpu()  # [B, T]
        assert logprobs.shape == generated.shape, (logprobs.shape, generated.shape)
        results = []
        for b in range(generated.shape[0]):
            ids = generated[b].tolist()
            length, stopped = cut_response(self.tokenizer, ids, self.stop_token_ids, sampling.stop)
            results.append((ids[:length], logprobs[b, :length].tolist(), stopped))
        return results

    # ------------------------------------------------------------------------------------------------ weights

    def update_weights(self, buckets: Iterable[WeightBucket], *, expect_all: bool = False) -> list[str]:
        """Copy each bucket's tensors (published names) into the model in place; returns the names updated, in order.

        Each bucket is checked as a whole (name known, shape and dtype equal) before any of it is copied, so a bad
        bucket changes nothing; earlier buckets of the same call stay applied. A tied ``lm_head`` follows the
        embedding (one tensor). ``expect_all``: raise, after copying, when some weight of a full checkpoint was not
        in any bucket (a truncated export).
        """
        self._check_weights_held("update_weights")
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers(remove_duplicate=False))
        updated: list[str] = []
        for bucket in buckets:
            pairs = []
            for name, tensor in bucket.named_tensors():
                if name not in self._names:
                    hint = " (this model ties it to model.embed_tokens.weight)" if name == "lm_head.weight" else ""
                    raise KeyError(f"update_weights: unknown weight {name!r}{hint}")
                target = targets[self._names[name]]
                if tensor.shape != target.shape or tensor.dtype != target.dtype:
                    raise ValueError(
                        f"update_weights: {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the model holds "
                        f"{tuple(target.shape)} {target.dtype}"
                    )
                pairs.append((name, target, tensor))
            with torch.no_grad():
                for name, target, tensor in pairs:
                    target.copy_(tensor)  # the bucket is only valid until the next one: copy now
                    updated.append(name)
                    self._unfilled.discard(name)
        if expect_all:
            missing = sorted(set(self._names) - set(updated))
            if missing:
                raise ValueError(f"update_weights: {len(missing)} weight(s) never updated: {missing}")
        return updated

    def weight_checksums(self) -> dict[str, str]:
        """sha256 per published name of what the engine holds; compare with `WeightBucket.checksums` of what was
        sent."""
        self._check_weights_held("weight_checksums")
        state = self.model.state_dict()
        return {published: tensor_checksum(state[name]) for published, name in self._names.items()}

    # ------------------------------------------------------------------------------------------------ memory

    def memory_bytes(self) -> int:
        """Bytes the model holds now on its device: parameters and buffers, shared storage counted once (there is no
        KV cache between generate calls)."""
        self._check_alive()
        storages = {}
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            storage = tensor.untyped_storage()
            if storage.nbytes():
                storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())

    def release_memory(self) -> None:
        """Free every weight the weight sync fills (their storage is dropped; shapes are kept for `resume_memory`)
        and, on CUDA, the allocator's cache (the last generate call's KV cache). Buffers the sync does not carry (rotary
        frequencies) stay. A no-op when already released. The CUDA cache call is GPU-only: not run (no GPU was
        available)."""
        self._check_alive()
        if "weights" not in self._released:
            with torch.no_grad():
                for tensor in self._weight_tensors():
                    self._shapes.append((tensor, tensor.shape))
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        self._released = set(MEMORY_TAGS)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Re-allocate what `release_memory` freed, per tag of `protocol.MEMORY_TAGS` (None: all). The weights come
        back uninitialised: generate refuses until `update_weights` has filled every one of them. "kv_cache" only
        lifts the release (generate allocates its cache per call)."""
        self._check_alive()
        tags = list(MEMORY_TAGS) if tags is None else list(tags)
        unknown = sorted(set(tags) - set(MEMORY_TAGS))
        if unknown:
            raise ValueError(f"resume_memory: unknown memory tags {unknown}; the tags are {list(MEMORY_TAGS)}")
        if "weights" in tags and "weights" in self._released:
            with torch.no_grad():
                for tensor, shape in self._shapes:
                    tensor.data = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            self._shapes = []
            self._unfilled = set(self._names)
        self._released -= set(tags)

    def _weight_tensors(self) -> list[torch.Tensor]:
        """The model's tensors that `update_weights` fills, each once (a tied lm_head is the embedding)."""
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(self.model.named_buffers(remove_duplicate=False))
        unique = {id(targets[name]): targets[name] for name in self._names.values()}
        return list(unique.values())

    def shutdown(self) -> None:
        """Free the model; the engine cannot be used afterwards."""
        self.model = None
        self.processor = self.tokenizer = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_alive(self) -> None:
        if self.model is None:
            raise RuntimeError("HFEngine was shut down")

    def _check_ready(self) -> None:
        self._check_alive()
        if self._released:
            raise RuntimeError(f"HFEngine memory is released ({sorted(self._released)}): call resume_memory() "
                               "and sync the weights before generate()")
        if self._unfilled:
            raise RuntimeError(f"HFEngine weights were re-allocated by resume_memory and {len(self._unfilled)} were "
                               f"not filled since (e.g. {sorted(self._unfilled)[0]!r}): sync the weights "
                               "(update_weights) before generate()")

    def _check_weights_held(self, what: str) -> None:
        self._check_alive()
        if "weights" in self._released:
            raise RuntimeError(f"HFEngine weights are released: call resume_memory(['weights']) before {what}")
