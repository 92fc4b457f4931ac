"""Images, records and the tiny processor for the prompt-building tests (test_data_prompts, test_released_data)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mssr_megatron.data.records import Record
from mssr_megatron.models.processor import load_processor
from mssr_megatron.models.tiny_hf import build_tiny_model_dir


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """The tiny Qwen2.5-VL processor (built once per test module)."""
    return load_processor(build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0))


def png(size) -> bytes:
    """A flat-coloured PNG of (width, height)."""
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def record(sizes, problem="How many shapes?", pid="r") -> Record:
    """A row with one PNG per (width, height) in `sizes` and the gold answer 3."""
    return Record(prompt_id=pid, problem=problem, answer="3", images=[png(s) for s in sizes], sizes=list(sizes))
