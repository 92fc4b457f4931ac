"""Qwen2.5-VL's special tokens: the strings every Qwen2.5-VL tokenizer (and the tiny one of `tiny_tokenizer`) carries.

The rollout engines, the sampler's blocked-token list and the tiny tokenizer all read them from here.
"""

from __future__ import annotations

__all__ = [
    "ENDOFTEXT_TOKEN",
    "IM_START_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "VISION_START_TOKEN",
    "VISION_END_TOKEN",
    "VISION_PAD_TOKEN",
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "SPECIAL_TOKENS",
]

ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = ENDOFTEXT_TOKEN
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
VISION_PAD_TOKEN = "<|vision_pad|>"
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"

#: Qwen's special tokens, in Qwen's relative id order; they take the last ids of the tokenizer, as in Qwen.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT_TOKEN,
    IM_START_TOKEN,
    EOS_TOKEN,
    VISION_START_TOKEN,
    VISION_END_TOKEN,
    VISION_PAD_TOKEN,
    IMAGE_TOKEN,
    VIDEO_TOKEN,
)
