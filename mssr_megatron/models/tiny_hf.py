"""Tiny random Qwen2.5-VL checkpoints, built locally and deterministically.

No weights or tokenizers can be downloaded on the development machines, so tests (and ``mssr make-tiny``) build a
complete Hugging Face model directory from scratch:

* a small byte-level BPE tokenizer with Qwen's special tokens and chat template (:mod:`~.models.tiny_tokenizer`);
* a tiny :class:`~transformers.Qwen2_5_VLConfig` whose text and vision towers keep every architectural feature of
  the real model (grouped-query attention, qkv bias, mrope, window + full attention blocks, patch merger) at toy
  sizes (:func:`tiny_qwen2_5_vl_config`);
* seeded random weights, saved under the *published* Qwen2.5-VL tensor names, and a ``Qwen2_5_VLProcessor`` that works
  without torchvision (:func:`build_tiny_model_dir`; saving and loading it: :mod:`~.models.processor`).

Tensor names. Published Qwen2.5-VL checkpoints (and what SGLang / vLLM load) name the tensors ``model.embed_tokens.*``,
``model.layers.*``, ``model.norm.*``, ``visual.*`` and ``lm_head.weight`` (absent when the embeddings are tied).
transformers 5 holds them in memory as ``model.language_model.*`` / ``model.visual.*``. Its ``save_pretrained``
converts back and writes the published names (checked with transformers 5.23: the same key set as
:func:`save_published`), and ``from_pretrained`` maps the published names to the in-memory ones.
:func:`published_state_dict` / :func:`save_published` do the conversion explicitly (with the project's one naming
rule, ``checkpoint.mapping.published_name``), so that exported checkpoints do not depend on the transformers version.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mssr_megatron.models.processor import qwen2_5_vl_processor, save_processor
from mssr_megatron.models.special_tokens import (
    EOS_TOKEN,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VIDEO_TOKEN,
    VISION_END_TOKEN,
    VISION_START_TOKEN,
)
from mssr_megatron.models.tiny_tokenizer import train_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image
    from transformers import PreTrainedTokenizerBase, Qwen2_5_VLConfig, Qwen2_5_VLProcessor

__all__ = [
    "TINY_TEXT",
    "TINY_VISION",
    "TINY_MIN_PIXELS",
    "TINY_MAX_PIXELS",
    "tiny_qwen2_5_vl_config",
    "tiny_image_processor",
    "build_tiny_processor",
    "build_tiny_model_dir",
    "init_tiny_model",
    "published_state_dict",
    "save_published",
    "synthetic_image",
    "chat_messages",
    "make_vl_inputs",
]

# --------------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------------

#: Text tower of the embedded default (about 0.89M parameters with a 320-token vocabulary and tied embeddings).
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,  # head_dim = 128 / 4 = 32
    num_key_value_heads=2,
    intermediate_size=384,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [4, 6, 6]},
    initializer_range=0.02,
    use_sliding_window=False,
    attention_dropout=0.0,
)

#: Vision tower: 2 blocks, block 0 uses window attention and block 1 full attention. window_size 56 px = 2x2 merged
#: tokens, so an 84x84 image (3x3 merged tokens) is split into 4 windows and window attention is not trivial.
TINY_VISION: dict[str, Any] = dict(
    depth=2,
    hidden_size=64,
    num_heads=4,  # head_dim 16
    intermediate_size=128,
    hidden_act="silu",
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=56,
    fullatt_block_indexes=[1],
    tokens_per_second=2,
    initializer_range=0.02,
)

#: Image processor pixel bounds: 56x56 (2x2 merged tokens) up to 112x112 (4x4 merged tokens); an 84x84 image stays
#: 84x84 (3x3 merged tokens, 36 patches).
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def _special_ids(tokenizer: PreTrainedTokenizerBase | None, tokenizer_vocab_size: int) -> dict[str, int]:
    if tokenizer is not None:
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    else:  # the layout train_tokenizer produces: special tokens occupy the last ids
        first = tokenizer_vocab_size - len(SPECIAL_TOKENS)
        ids = {t: first + i for i, t in enumerate(SPECIAL_TOKENS)}
    return ids


def tiny_qwen2_5_vl_config(
    vocab_size: int = 320,
    tie_word_embeddings: bool = True,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    tokenizer_vocab_size: int | None = None,
    num_layers: int | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    vision_overrides: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> Qwen2_5_VLConfig:
    """A tiny ``Qwen2_5_VLConfig`` (transformers 5 layout: ``text_config`` / ``vision_config`` sub-configs).

    ``vocab_size`` is the embedding size; it may exceed the tokenizer (padded rows, e.g. a size that tensor
    parallelism does not divide). Special-token ids come from ``tokenizer`` when given, otherwise from the layout of
    :func:`train_tokenizer` with ``tokenizer_vocab_size`` tokens (default ``min(vocab_size, 320)``).
    ``num_layers`` sets the text depth. ``overrides`` go to the text config when they name a text field (e.g.
    ``hidden_size``), to the top-level config otherwise; ``text_overrides`` / ``vision_overrides`` are explicit.
    """
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    if tokenizer is not None:
        tok_size = len(tokenizer)
    else:
        tok_size = tokenizer_vocab_size if tokenizer_vocab_size is not None else min(vocab_size, 320)
    if vocab_size < tok_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({tok_size} tokens)")
    ids = _special_ids(tokenizer, tok_size)

    text = dict(TINY_TEXT)
    text["rope_parameters"] = dict(text["rope_parameters"])
    text_fields = set(Qwen2_5_VLTextConfig.__dataclass_fields__) | {"rope_theta", "rope_scaling"}
    top = {}
    for key, value in overrides.items():
        (text if key in text_fields else top)[key] = value
    text.update(text_overrides or {})
    if num_layers is not None:
        text["num_hidden_layers"] = int(num_layers)
    if "rope_theta" in text:
        text["rope_parameters"]["rope_theta"] = float(text.pop("rope_theta"))
    text.update(
        vocab_size=int(vocab_size),
        bos_token_id=None,
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=bool(tie_word_embeddings),
    )
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    mrope = list(text["rope_parameters"].get("mrope_section", []))
    if sum(mrope) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim / 2 = {head_dim // 2}")

    vision = dict(TINY_VISION)
    vision["fullatt_block_indexes"] = list(vision["fullatt_block_indexes"])
    vision.update(vision_overrides or {})
    vision["out_hidden_size"] = text["hidden_size"]

    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN],
        vision_start_token_id=ids[VISION_START_TOKEN],
        vision_end_token_id=ids[VISION_END_TOKEN],
        tie_word_embeddings=bool(tie_word_embeddings),
        bos_token_id=None,
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
        **top,
    )


# --------------------------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------------------------


def tiny_image_processor(min_pixels: int = TINY_MIN_PIXELS, max_pixels: int = TINY_MAX_PIXELS, **kwargs: Any):
    """The PIL (numpy) Qwen2-VL image processor: transformers 5's default ``Qwen2VLImageProcessor`` needs
    torchvision, ``Qwen2VLImageProcessorPil`` does not."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        patch_size=TINY_VISION["patch_size"],
        temporal_patch_size=TINY_VISION["temporal_patch_size"],
        merge_size=TINY_VISION["spatial_merge_size"],
        **kwargs,
    )


def build_tiny_processor(tokenizer: PreTrainedTokenizerBase, **image_kwargs: Any) -> Qwen2_5_VLProcessor:
    """``Qwen2_5_VLProcessor`` from ``tokenizer`` and the PIL image processor (:func:`tiny_image_processor`), without a
    video processor (transformers 5's video processors need torchvision)."""
    return qwen2_5_vl_processor(tiny_image_processor(**image_kwargs), tokenizer, None, tokenizer.chat_template)


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


def init_tiny_model(config: Qwen2_5_VLConfig, *, seed: int = 0, dtype: torch.dtype | None = None):
    """Randomly initialised ``Qwen2_5_VLForConditionalGeneration``; the same seed gives bit-identical weights. The
    global torch RNG is left as it was."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def build_tiny_model_dir(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    vocab_size: int | None = None,
    num_layers: int = 3,
    dtype: torch.dtype | None = None,
    tokenizer_vocab_size: int = 320,
    published_names: bool = True,
    **config_overrides: Any,
) -> str:
    """Write a complete tiny Qwen2.5-VL model directory and return its path: tokenizer, processor (PIL image
    processor), config, generation config and seeded random weights in ``model.safetensors``.

    ``vocab_size`` (default: the tokenizer size) may exceed the tokenizer. ``published_names`` (default) writes the
    weights with :func:`save_published`; ``False`` uses transformers' ``save_pretrained`` (the same names with
    transformers 5.23). Both load with ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` and
    :func:`load_processor` (or ``AutoProcessor`` where torchvision is installed).
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer(None, vocab_size=tokenizer_vocab_size)
    config = tiny_qwen2_5_vl_config(
        vocab_size=len(tokenizer) if vocab_size is None else vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        tokenizer=tokenizer,
        num_layers=num_layers,
        **config_overrides,
    )
    model = init_tiny_model(config, seed=seed, dtype=dtype)
    if published_names:
        save_published(model, out_dir)
    else:
        model.save_pretrained(out_dir, safe_serialization=True)
    save_processor(build_tiny_processor(tokenizer), out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------------------------------
# Published tensor names
# --------------------------------------------------------------------------------------------------------------------

def published_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict of a ``Qwen2_5_VLForConditionalGeneration`` under the published Qwen2.5-VL names
    (``model.embed_tokens.weight``, ``model.layers.*``, ``model.norm.weight``, ``visual.*`` and, when the embeddings
    are not tied, ``lm_head.weight``), renamed by :func:`mssr_megatron.checkpoint.mapping.published_name`. Tensors are
    the model's own (not copies)."""
    from mssr_megatron.checkpoint.mapping import published_to_module_names

    state = model.state_dict()
    return {published: state[name] for published, name in published_to_module_names(model).items()}


def save_published(model, out_dir: str | os.PathLike) -> list[str]:
    """Write ``model.safetensors`` (a single file: tiny models) with the published names
    (:func:`published_state_dict`), plus ``config.json`` (``dtype`` set to the weights' dtype) and
    ``generation_config.json``. Returns the tensor names written."""
    import copy

    import torch
    from safetensors.torch import save_file

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in published_state_dict(model).items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    floating = [t.dtype for t in tensors.values() if torch.is_floating_point(t)]
    if floating:
        config.dtype = str(floating[0]).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    return sorted(tensors)


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------

_RGB = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220)}


def synthetic_image(seed: int, size: int = 56, n_shapes: int | None = None) -> Image.Image:
    """A deterministic RGB test image: white background with 1-4 (or ``n_shapes``) red/green/blue circles and
    squares at random places."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    count = rng.randint(1, 4) if n_shapes is None else n_shapes
    for _ in range(count):
        radius = rng.randint(max(2, size // 12), max(3, size // 6))
        cx, cy = rng.randint(radius, size - radius - 1), rng.randint(radius, size - radius - 1)
        colour = _RGB[rng.choice(sorted(_RGB))]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    return image


def chat_messages(text: str, *, system: str | None = None, with_image: bool = True) -> list[dict[str, Any]]:
    """One user turn (an image, then ``text``), optionally after a system message."""
    content: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": text})
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    return messages


def make_vl_inputs(
    processor: Qwen2_5_VLProcessor,
    images: list[Image.Image],
    texts: list[str],
    add_generation_prompt: bool = True,
    *,
    system: str | None = None,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Processor outputs for a batch of one-image chat prompts: ``input_ids``, ``attention_mask`` [B, S] (padded
    on ``padding_side``), ``pixel_values`` [sum of patches, 3*2*14*14], ``image_grid_thw`` [B, 3] and
    ``mm_token_type_ids`` [B, S] (0 text, 1 image). Pass all of them to the model: without ``mm_token_type_ids``
    (or explicit 3-D ``position_ids``) transformers 5 falls back to 1-D positions instead of mrope."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images for {len(texts)} texts")
    prompts = [
        processor.apply_chat_template(
            chat_messages(text, system=system), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        for text in texts
    ]
    batch = processor(
        text=prompts,
        images=list(images),
        padding=True,
        padding_side=padding_side,
        return_tensors="pt",
    )
    out = dict(batch)
    if "mm_token_type_ids" not in out:  # older processors: derive it from the image placeholder
        image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        out["mm_token_type_ids"] = (out["input_ids"] == image_id).to(out["input_ids"].dtype)
    return out
