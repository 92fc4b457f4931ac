"""The Qwen2.5-VL processor (tokenizer + image processor) of a model directory: built, saved and loaded also without
torchvision.

transformers 5's video processors (and so ``AutoProcessor`` and ``Qwen2_5_VLProcessor.save_pretrained`` with no video
processor) need torchvision, which the CPU development machines lack. :func:`qwen2_5_vl_processor` builds a real
``Qwen2_5_VLProcessor`` without a video processor, :func:`save_processor` writes the files ``save_pretrained`` would,
and :func:`load_processor` loads a directory either way.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from transformers import Qwen2_5_VLProcessor

__all__ = ["qwen2_5_vl_processor", "save_processor", "load_processor"]


def _video_processor_dict(image_processor) -> dict[str, Any]:
    """What ``Qwen2VLVideoProcessor`` would save for these sizes (it cannot be built without torchvision), so that
    ``AutoProcessor`` builds a matching video processor where torchvision is installed."""
    return {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "patch_size": image_processor.patch_size,
        "temporal_patch_size": image_processor.temporal_patch_size,
        "merge_size": image_processor.merge_size,
        "size": dict(image_processor.size),
        "image_mean": list(image_processor.image_mean),
        "image_std": list(image_processor.image_std),
    }


def qwen2_5_vl_processor(image_processor, tokenizer, video_processor=None, chat_template=None):
    """A real ``Qwen2_5_VLProcessor``, also without a video processor.

    transformers 5 type-checks every sub-processor in ``ProcessorMixin.__init__``; without torchvision the check of
    the video processor (even ``None``) fails because the video-processor classes are torchvision-only. The check is
    relaxed for this one instance (and only for a ``None`` video processor), everything else runs unchanged.
    """
    import types

    from transformers import Qwen2_5_VLProcessor

    def check(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return Qwen2_5_VLProcessor.check_argument_for_proper_class(self, argument_name, argument)

    processor = Qwen2_5_VLProcessor.__new__(Qwen2_5_VLProcessor)
    processor.check_argument_for_proper_class = types.MethodType(check, processor)
    try:
        processor.__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=chat_template,
        )
    finally:
        del processor.check_argument_for_proper_class
    return processor


def save_processor(processor, out_dir: str | os.PathLike) -> None:
    """Save a ``Qwen2_5_VLProcessor`` the way ``save_pretrained`` does (tokenizer files, ``chat_template.jinja``,
    ``processor_config.json`` with the image-processor config), also when it has no video processor (where
    ``save_pretrained`` fails). A missing video processor is written as the ``Qwen2VLVideoProcessor`` config
    matching the image processor, so that ``AutoProcessor`` loads the directory where torchvision is installed."""
    out_dir = os.fspath(out_dir)
    if getattr(processor, "video_processor", None) is not None:
        processor.save_pretrained(out_dir)
        return
    os.makedirs(out_dir, exist_ok=True)
    processor.tokenizer._set_processor_class(type(processor).__name__)
    processor.tokenizer.save_pretrained(out_dir)
    if isinstance(processor.chat_template, str):
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as fh:
            fh.write(processor.chat_template)
    data = processor.to_dict()
    data["video_processor"] = _video_processor_dict(processor.image_processor)
    with open(os.path.join(out_dir, "processor_config.json"), "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")


def load_processor(path: str | os.PathLike) -> Qwen2_5_VLProcessor:
    """Load the processor of a model directory: ``AutoProcessor.from_pretrained`` where torchvision is installed;
    otherwise (transformers 5's ``AutoProcessor`` always loads the torchvision-only video processor, and fails) the
    same ``Qwen2_5_VLProcessor`` from ``AutoTokenizer`` + ``AutoImageProcessor`` (PIL backend) without a video
    processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    path = os.fspath(path)
    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    chat_template = tokenizer.chat_template
    template_file = os.path.join(path, "chat_template.jinja")
    if os.path.exists(template_file):
        with open(template_file) as fh:
            chat_template = fh.read()
    return qwen2_5_vl_processor(image_processor, tokenizer, None, chat_template)
