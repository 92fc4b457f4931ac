"""The tiny byte-level BPE tokenizer of the tiny Qwen2.5-VL checkpoints, trained locally and deterministically.

No tokenizer can be downloaded on the development machines, so :func:`train_tokenizer` trains a small byte-level BPE
with ``tokenizers`` on a built-in English/arithmetic corpus (:func:`builtin_corpus`), adds Qwen's special tokens at the
last ids (:mod:`mssr_megatron.models.special_tokens`) and wraps it as a fast tokenizer with a Qwen-style chat template
(:data:`CHAT_TEMPLATE`).
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mssr_megatron.models.special_tokens import (
    EOS_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

__all__ = ["CHAT_TEMPLATE", "builtin_corpus", "train_tokenizer"]

# Pre-tokenisation: contractions, runs of letters (with one optional leading non-letter such as a space), single
# digits (so that numbers tokenise digit by digit, like Qwen), punctuation runs, newlines, other whitespace.
_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

#: Qwen-style chat template. Content is a string or a list of parts: ``{"type": "image"}`` (also ``"image"`` /
#: ``"image_url"`` keys) renders as ``<|vision_start|><|image_pad|><|vision_end|>`` (the processor expands the single
#: ``<|image_pad|>`` to one token per merged patch), ``{"type": "video"}`` likewise with ``<|video_pad|>``, and
#: ``{"type": "text", "text": ...}`` as its text. No default system message is inserted (prompts stay short).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in part -%}"
    "{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
_SHAPES = ("circle", "square", "triangle", "shape", "dot", "box")


def builtin_corpus() -> list[str]:
    """A small deterministic English/arithmetic corpus for the tiny BPE: counting questions about coloured shapes
    (weighted most, so that their words get merges), arithmetic, ``\\boxed{}`` answers, ``<think>`` reasoning and
    chat turns (the special tokens in it are cut out before training)."""
    rng = random.Random(1234)
    lines: list[str] = []
    for _ in range(6):
        for colour in _COLOURS[:3]:
            lines.append(f"How many {colour} shapes? How many {colour} shapes are there?")
            lines.append("How many shapes? How many shapes are there in the image?")
        for shape in ("circle", "square"):
            lines.append(f"How many {shape}s? How many red {shape}s? How many blue {shape}s?")
    for colour in _COLOURS:
        for shape in _SHAPES:
            lines.append(f"There is one {colour} {shape}. There are two {colour} {shape}s.")
    lines += [
        "What colour is the shape? What is the colour of the circle?",
        "Look at the image and answer the question.",
        "Let me count the shapes one by one.",
        "Please reason step by step, and put your final answer within \\boxed{}.",
        "You are a helpful assistant.",
    ]
    for n, word in enumerate(_NUMBER_WORDS):
        lines.append(f"{word} {n} The answer is {n}. The answer is \\boxed{{{n}}}.")
    for _ in range(120):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-*")
        value = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"What is {a} {op} {b}? {a} {op} {b} = {value}. The answer is \\boxed{{{value}}}.")
    for _ in range(120):
        colour, shape, k = rng.choice(_COLOURS[:3]), rng.choice(_SHAPES[:2]), rng.randint(1, 9)
        lines.append(f"<think>I see {k} {colour} {shape}s, so there are {k}.</think> The answer is \\boxed{{{k}}}.")
        lines.append(
            f"{IM_START_TOKEN}user\n{VISION_START_TOKEN}{IMAGE_TOKEN}{VISION_END_TOKEN}"
            f"How many {colour} {shape}s?{EOS_TOKEN}\n{IM_START_TOKEN}assistant\n\\boxed{{{k}}}{EOS_TOKEN}\n"
        )
    for _ in range(40):
        p, q = rng.randint(1, 9), rng.randint(2, 9)
        lines.append(f"\\frac{{{p}}}{{{q}}} = {p}/{q}. $x^{2}$ = {p * p}, \\sqrt{{{p * p}}} = {p}. {p}% (A) (B) (C)")
    return lines


def _train_bpe(corpus: Iterable[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    n_learned = vocab_size - len(SPECIAL_TOKENS)
    if n_learned < len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it needs the {len(alphabet)} byte symbols plus "
            f"{len(SPECIAL_TOKENS)} special tokens"
        )
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    # The trainer does not split on added tokens: cut them out of the training text so that they are not learned
    # as text, then add them after the learned tokens (the last ids, as in Qwen's tokenizer).
    special = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    pieces = [piece for line in corpus for piece in special.split(line) if piece]
    tok.train_from_iterator(pieces, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def train_tokenizer(
    out_dir: str | os.PathLike | None = None,
    vocab_size: int = 320,
    corpus: Iterable[str] | None = None,
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE of ``vocab_size`` tokens (learned tokens first, then Qwen's special tokens at the end)
    on ``corpus`` (default :func:`builtin_corpus`) and wrap it as a fast tokenizer with the Qwen-style
    :data:`CHAT_TEMPLATE`, eos ``<|im_end|>`` and pad ``<|endoftext|>``. Saved to ``out_dir`` when given
    (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``). Deterministic: the same corpus and size
    give the same ``tokenizer.json``."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(builtin_corpus() if corpus is None else corpus, vocab_size)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the corpus yields {tok.get_vocab_size()} tokens, not vocab_size={vocab_size}: pass a larger corpus"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        padding_side="right",
    )
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer
