"""Records -> chat-templated Qwen2.5-VL prompts (GenerationRequest), and the prompt-length filter.

    train = load_split(cfg.data.train_path, cfg.data, "train", processor)   # read + drop over-long prompts
    request = build_request(train[i], PromptFormat.from_config(cfg.data), processor)

The prompt is one user turn: the image(s), then the problem filled into `data.prompt_template` (the literal
'{problem}' is replaced as plain text, because templates carry `\\boxed{}` that str.format would choke on), then the
generation prompt; no system message is passed, so whatever default the model's own chat template adds (Qwen2.5-VL-
Instruct adds "You are a helpful assistant.") stays as the model was trained. A problem that marks where its images
go with "<image>" (EasyR1-style datasets), once per image, gets them there instead of in front.

`PromptFormat` carries what the data config says about a prompt: the user-turn text (data.prompt_template, or the
Jinja file data.prompt_template_file rendered with `problem`, e.g. examples/prompts/released_math.jinja) and the
image pixel bounds (data.min_pixels / data.max_pixels, data/images.py `bounded_size`). Functions below that take a
`template` accept either a PromptFormat or a plain '{problem}' string (no bounds). Every image path goes through it:
rollout requests (training and validation), the trainer's pixel values (`prompt_images`) and the length filter,
which counts the vision tokens of the RESIZED size, so the count is what the model gets.

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
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

from mssr_megatron.data.images import bounded_size, decode_images, image_size, resize_to_bounds
from mssr_megatron.data.records import Record, RecordSet, read_records
from mssr_megatron.rollout.protocol import GenerationRequest

__all__ = [
    "IMAGE_MARK", "PromptFormat", "fill_template", "prompt_images", "prompt_messages", "prompt_text",
    "count_prompt_tokens", "build_request", "filter_long_prompts", "load_split",
]

logger = logging.getLogger(__name__)

IMAGE_MARK = "<image>"  # in-problem image position marker used by EasyR1-style datasets


def fill_template(template: str, problem: str) -> str:
    """`template` with the literal '{problem}' replaced by `problem` (plain text; braces elsewhere are kept)."""
    if "{problem}" not in template:
        raise ValueError(f"data.prompt_template must contain the literal '{{problem}}' (got {template!r})")
    return template.replace("{problem}", problem)


@dataclass(frozen=True)
class PromptFormat:
    """The user-turn text and the image pixel bounds of the prompts (`from_config` builds it from a DataConfig)."""

    template: str
    """A '{problem}' text (plain replacement), or Jinja source when `jinja`."""
    jinja: bool = False
    """Whether `template` is Jinja source, rendered with the variable `problem`."""
    min_pixels: int | None = None
    """Images with fewer pixels are upscaled; None = the image processor's own lower bound."""
    max_pixels: int | None = None
    """Images with more pixels are downscaled; None = the image processor's own upper bound."""

    @classmethod
    def from_config(cls, data) -> PromptFormat:
        """From data.prompt_template / data.prompt_template_file and data.min_pixels / data.max_pixels; a template
        that cannot be read or never uses the problem fails here, before any work."""
        if not data.prompt_template_file:
            fmt = cls(data.prompt_template, False, data.min_pixels, data.max_pixels)
        else:
            try:
                with open(data.prompt_template_file, encoding="utf-8") as fh:
                    source = fh.read()
            except OSError as exc:
                raise ValueError(f"data.prompt_template_file={data.prompt_template_file!r} cannot be read "
                                 f"({exc.strerror or exc}); give a path relative to the working directory") from None
            fmt = cls(source, True, data.min_pixels, data.max_pixels)
        fmt.check()
        return fmt

    @cached_property
    def _jinja(self):
        import jinja2

        # StrictUndefined: a misspelt variable fails instead of rendering as nothing.
        return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(self.template)

    def fill(self, problem: str) -> str:
        """The user-turn text of one problem."""
        return self._jinja.render(problem=problem) if self.jinja else fill_template(self.template, problem)

    def check(self) -> None:
        """Raise ValueError if the text does not contain the problem (a template that ignores it, or fails)."""
        marker = "\x00problem\x00"
        if self.jinja:
            try:
                text = self.fill(marker)
            except Exception as exc:  # jinja2's syntax / undefined-variable errors
                raise ValueError(f"data.prompt_template_file does not render: {type(exc).__name__}: {exc}") from None
            if marker not in text:
                raise ValueError("data.prompt_template_file never inserts {{ problem }} (the question)")
        else:
            self.fill(marker)  # fill_template names the missing '{problem}'

    @property
    def bounded(self) -> bool:
        """Whether images are resized to pixel bounds here (data.min_pixels or data.max_pixels set)."""
        return self.min_pixels is not None or self.max_pixels is not None

    def image_size(self, width: int, height: int, processor) -> tuple[int, int]:
        """(width, height) an image of this size is given to the processor at (unchanged without bounds)."""
        if not self.bounded:
            return width, height
        return bounded_size(width, height, *self.bounds(processor))

    def bounds(self, processor) -> tuple[int, int, int]:
        """(min_pixels, max_pixels, factor) images are resized to, the processor's own where unset."""
        ip = processor.image_processor
        low = ip.size["shortest_edge"] if self.min_pixels is None else self.min_pixels
        high = ip.size["longest_edge"] if self.max_pixels is None else self.max_pixels
        return low, high, ip.patch_size * ip.merge_size

    def check_processor(self, processor) -> None:
        """Raise ValueError if the image processor's own bounds do not contain these: it would resize the images
        again, and the model would not get the bounds the config asks for."""
        if not self.bounded:
            return
        ip = processor.image_processor
        low, high, _ = self.bounds(processor)
        if low < ip.size["shortest_edge"] or high > ip.size["longest_edge"]:
            raise ValueError(
                f"data.min_pixels..max_pixels = {low}..{high} is not inside the image processor's own bounds "
                f"{ip.size['shortest_edge']}..{ip.size['longest_edge']} (its preprocessor_config.json "
                "min_pixels/max_pixels): it would resize the images again; narrow data.min_pixels/max_pixels to "
                "fit, or set them to null")


def _as_format(template: str | PromptFormat) -> PromptFormat:
    return template if isinstance(template, PromptFormat) else PromptFormat(template)


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


def prompt_text(record: Record, template: str | PromptFormat, processor) -> str:
    """The chat-templated prompt of a record, generation prompt appended, one image placeholder per image."""
    messages = prompt_messages(_as_format(template).fill(record.problem), len(record.images))
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


def prompt_images(record: Record, template: str | PromptFormat, processor) -> list:
    """The record's images decoded (through DALI where installed) to RGB PIL images, resized to the pixel bounds."""
    fmt = _as_format(template)
    images = decode_images(record.images)
    if not fmt.bounded:
        return images
    return [resize_to_bounds(image, *fmt.bounds(processor)) for image in images]


def build_request(
    record: Record, template: str | PromptFormat, processor, *, request_id: str | None = None, decode: bool = True
) -> GenerationRequest:
    """A GenerationRequest for `record` (request_id defaults to its prompt_id). With `decode` (the default) images
    are decoded here (`prompt_images`); `decode=False` passes the encoded bytes / paths through for engines that
    decode themselves, and so cannot be combined with pixel bounds."""
    if not decode and _as_format(template).bounded:
        raise ValueError("build_request(decode=False) cannot apply data.min_pixels/max_pixels: decode the images")
    images: list[Any] = prompt_images(record, template, processor) if decode else list(record.images)
    return GenerationRequest(
        request_id=record.prompt_id if request_id is None else request_id,
        prompt=prompt_text(record, template, processor),
        images=images,
    )


def filter_long_prompts(
    records: RecordSet, template: str | PromptFormat, processor, max_prompt_tokens: int | None
) -> RecordSet:
    """Drop (in place, and return) records whose prompt exceeds `max_prompt_tokens` tokens, counting them as
    'prompt_too_long' in `records.skipped`. None or <= 0 disables the check."""
    if not max_prompt_tokens or max_prompt_tokens <= 0 or not records.records:
        return records
    fmt = _as_format(template)
    fmt.check()  # a template without {problem} fails here, before any work
    kept: list[Record] = []
    chunk = 512  # tokenizer batch: fast, and bounded memory on large sets
    for start in range(0, len(records.records), chunk):
        batch = records.records[start : start + chunk]
        texts = [prompt_text(r, fmt, processor) for r in batch]
        sizes = [[fmt.image_size(w, h, processor) for w, h in _sizes(r)] for r in batch]
        counts = count_prompt_tokens(texts, sizes, processor)
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
    fmt = PromptFormat.from_config(cfg_data)
    fmt.check_processor(processor)
    records = read_records(path, cfg_data, split_name, apply_val_size=False)
    filter_long_prompts(records, fmt, processor, cfg_data.max_prompt_tokens)
    if split_name == "val" and cfg_data.val_size is not None:
        records.records = records.records[: cfg_data.val_size]
    if records.skipped.get("prompt_too_long"):
        if not records.records:
            raise ValueError(f"data.max_prompt_tokens={cfg_data.max_prompt_tokens} drops every prompt of "
                             f"data.{split_name}_path; {records.summary()}")
        logger.warning(records.summary())
    return records
