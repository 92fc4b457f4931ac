"""Records -> chat-templated Qwen2.5-VL prompts (GenerationRequest), and the prompt-length filter.

    train = load_split(cfg.data.train_path, cfg.data, "train", processor)   # read + drop over-long prompts
    request = build_request(train[i], cfg.data.prompt_template, processor)

The prompt is one user turn: the image(s), then the problem filled into `data.prompt_template` (the literal
'{problem}' is replaced as plain text, because templates carry `\\boxed{}` that str.format would choke on), then the
generation prompt; no system message is passed, so whatever default the model's own chat template adds (Qwen2.5-VL-
Instruct adds "You are a helpful assistant.") stays as the model was trained. A problem that marks where its images
go with "<image>" (EasyR1-style datasets), once per image, gets them there instead of in front.

Where the length check lives: `filter_long_prompts`, run ONCE per split when the data is loaded (`load_split`), not
per step. Then the sampler only ever sees usable prompts, every step has exactly prompts_per_step prompts (which the
global-batch normalisation and the mini-batch split rely on), the baseline tracker's initial rollouts cover the same
set, and over-long prompts are counted in the same `RecordSet.skipped` report as bad rows ("prompt_too_long").
The count is exact without decoding any image: text tokens from the tokenizer plus, per image, the number of merged
vision tokens the image processor will produce for that (width, height) (its own `get_number_of_image_patches`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

from mssr_megatron.data.images import decode_images, image_size
from mssr_megatron.data.records import Record, RecordSet, read_records
from mssr_megatron.rollout.protocol import GenerationRequest

__all__ = [
    "IMAGE_MARK", "fill_template", "prompt_messages", "prompt_text", "count_prompt_tokens", "build_request",
    "filter_long_prompts", "load_split",
]

logger = logging.getLogger(__name__)

IMAGE_MARK = "<image>"  # in-problem image position marker used by EasyR1-style datasets


def fill_template(template: str, problem: str) -> str:
    """`template` with the literal '{problem}' replaced by `problem` (plain text; braces elsewhere are kept)."""
    if "{problem}" not in template:
        raise ValueError(f"data.prompt_template must contain the literal '{{problem}}' (got {template!r})")
    return template.replace("{problem}", problem)


def prompt_messages(text: str, num_images: int) -> list[dict[str, Any]]:
    """One user turn: the images then the text; or, when `text` has exactly one IMAGE_MARK per image, the images
    at the marks."""
    if num_images and text.count(IMAGE_MARK) == num_images:
        content: list[dict[str, Any]] = []
        pieces = text.split(IMAGE_MARK)
        for k, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece})
            if k < num_images:
                content.append({"type": "image"})
    else:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def prompt_text(record: Record, template: str, processor) -> str:
    """The chat-templated prompt of a record, generation prompt appended, one image placeholder per image."""
    messages = prompt_messages(fill_template(template, record.problem), len(record.images))
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _image_tokens(processor, width: int, height: int) -> int:
    """Merged vision tokens the processor emits for one image of this size (what <|image_pad|> expands to)."""
    ip = processor.image_processor
    return ip.get_number_of_image_patches(height, width, {}) // (ip.merge_size**2)


def count_prompt_tokens(text: str | Sequence[str], sizes: Sequence[Sequence[tuple[int, int]]] | None, processor):
    """Token count(s) of prompt text(s) after the processor expands each image placeholder. `sizes[i]` lists the
    (width, height) of the images of text i. Accepts one text (returns an int) or a list (returns a list)."""
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    size_lists = [sizes] if single else list(sizes or [[] for _ in texts])
    ids = processor.tokenizer(texts, add_special_tokens=False)["input_ids"]
    counts = [
        len(tokens) + sum(_image_tokens(processor, w, h) - 1 for w, h in image_sizes)  # placeholder -> n tokens
        for tokens, image_sizes in zip(ids, size_lists, strict=True)
    ]
    return counts[0] if single else counts


def _sizes(record: Record) -> list[tuple[int, int]]:
    return list(record.sizes) if len(record.sizes) == len(record.images) else [image_size(i) for i in record.images]


def build_request(
    record: Record, template: str, processor, *, request_id: str | None = None, decode: bool = True
) -> GenerationRequest:
    """A GenerationRequest for `record` (request_id defaults to its prompt_id). With `decode` (the default) images
    are decoded here, through DALI where installed, to RGB PIL images; `decode=False` passes the encoded bytes /
    paths through for engines that decode themselves."""
    images: list[Any] = decode_images(record.images) if decode else list(record.images)
    return GenerationRequest(
        request_id=record.prompt_id if request_id is None else request_id,
        prompt=prompt_text(record, template, processor),
        images=images,
    )


def filter_long_prompts(records: RecordSet, template: str, processor, max_prompt_tokens: int | None) -> RecordSet:
    """Drop (in place, and return) records whose prompt exceeds `max_prompt_tokens` tokens, counting them as
    'prompt_too_long' in `records.skipped`. None or <= 0 disables the check."""
    if not max_prompt_tokens or max_prompt_tokens <= 0 or not records.records:
        return records
    fill_template(template, "")  # a template without {problem} fails here, before any work
    kept: list[Record] = []
    chunk = 512  # tokenizer batch: fast, and bounded memory on large sets
    for start in range(0, len(records.records), chunk):
        batch = records.records[start : start + chunk]
        texts = [prompt_text(r, template, processor) for r in batch]
        counts = count_prompt_tokens(texts, [_sizes(r) for r in batch], processor)
        for record, count in zip(batch, counts, strict=True):
            if count > max_prompt_tokens:
                records.skip("prompt_too_long", record.prompt_id)
            else:
                kept.append(record)
    records.records = kept
    return records


def load_split(path: str | os.PathLike | None, cfg_data, split_name: str, processor) -> RecordSet:
    """read_records + filter_long_prompts with the config's template and limit (+ data.val_size for 'val', applied
    after the filter so that it counts usable prompts), then one summary log line."""
    records = read_records(path, cfg_data, split_name, apply_val_size=False)
    filter_long_prompts(records, cfg_data.prompt_template, processor, cfg_data.max_prompt_tokens)
    if split_name == "val" and cfg_data.val_size is not None:
        records.records = records.records[: cfg_data.val_size]
    if records.skipped.get("prompt_too_long"):
        if not records.records:
            raise ValueError(f"data.max_prompt_tokens={cfg_data.max_prompt_tokens} drops every prompt of "
                             f"data.{split_name}_path; {records.summary()}")
        logger.warning(records.summary())
    return records
