"""Prompt building with the tiny Qwen2.5-VL processor, exact prompt-token counts, the prompt-length filter."""

from __future__ import annotations

import json

import pytest

from mssr_megatron.config import DEFAULT_PROMPT_TEMPLATE, DataConfig
from mssr_megatron.data.prompts import (
    build_request, count_prompt_tokens, fill_template, filter_long_prompts, load_split, prompt_messages, prompt_text,
)
from mssr_megatron.data.records import RecordSet
from mssr_megatron.data.synthetic import generate_dataset
from prompt_assets import processor, record  # noqa: F401 (processor: a pytest fixture)


def test_fill_template_is_plain_replacement():
    assert fill_template("Q: {problem} put it in \\boxed{}", "1+{x}") == "Q: 1+{x} put it in \\boxed{}"
    with pytest.raises(ValueError, match="data.prompt_template"):
        fill_template("no placeholder", "x")


def test_build_request_text_and_images(processor):
    rec = record([(84, 84)])
    req = build_request(rec, DEFAULT_PROMPT_TEMPLATE, processor)
    assert req.request_id == "r"
    assert req.prompt == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many shapes?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(req.images) == 1 and req.images[0].mode == "RGB" and req.images[0].size == (84, 84)
    raw = build_request(rec, "{problem}", processor, request_id="r#3", decode=False)
    assert raw.request_id == "r#3" and raw.images == rec.images


def test_image_marks_in_problem():
    msgs = prompt_messages("Compare <image> and <image>. Which is bigger?", 2)
    kinds = [part["type"] for part in msgs[0]["content"]]
    assert kinds == ["text", "image", "text", "image", "text"]
    assert [p["type"] for p in prompt_messages("no marks", 2)[0]["content"]] == ["image", "image", "text"]


@pytest.mark.parametrize("sizes", [[(84, 84)], [(112, 112)], [(200, 150)], [(30, 500)], [(84, 84), (56, 112)]])
def test_token_count_matches_processor(processor, sizes):
    """The count computed from image sizes equals what the processor really produces."""
    rec = record(sizes)
    text = prompt_text(rec, DEFAULT_PROMPT_TEMPLATE, processor)
    images = build_request(rec, DEFAULT_PROMPT_TEMPLATE, processor).images
    real = processor(text=[text], images=images, return_tensors="pt")["input_ids"].shape[1]
    assert count_prompt_tokens(text, sizes, processor) == real


def test_filter_long_prompts(processor):
    short, long_text, big_image = record([(84, 84)], pid="short"), record([(84, 84)], "x " * 300, "long"), record(
        [(112, 112), (112, 112)], pid="big")
    counts = {r.prompt_id: count_prompt_tokens(prompt_text(r, "{problem}", processor), r.sizes, processor)
              for r in (short, long_text, big_image)}
    limit = counts["short"]
    assert counts["long"] > limit and counts["big"] > limit
    rs = RecordSet(records=[short, long_text, big_image], path="mem", split="train", skipped={"bad_image": 1})
    filter_long_prompts(rs, "{problem}", processor, limit)
    assert [r.prompt_id for r in rs] == ["short"]
    assert rs.skipped == {"bad_image": 1, "prompt_too_long": 2}
    assert "prompt_too_long=2 (e.g. long, big)" in rs.summary()


def test_load_split_on_synthetic_data(processor, tmp_path):
    train, val = generate_dataset(tmp_path, n_train=40, n_val=30, seed=1)
    cfg = DataConfig(train_path=train, val_path=val, prompt_template="{problem}", max_prompt_tokens=4096, val_size=25)
    rs = load_split(train, cfg, "train", processor)
    assert len(rs) == 40 and not rs.skipped
    assert len(load_split(val, cfg, "val", processor)) == 25
    with open(train) as fh:
        first = json.loads(fh.readline())
    req = build_request(rs[0], cfg.prompt_template, processor)
    assert req.request_id == first["id"] and first["problem"] in req.prompt
    # 84x84 -> 9 merged image tokens (3x3 cells of 28 px), the layout PLATFORM_NOTES describes
    assert count_prompt_tokens(req.prompt, rs[0].sizes, processor) - count_prompt_tokens(req.prompt, [], processor) == 8
    tight = DataConfig(prompt_template="{problem}", max_prompt_tokens=5)
    with pytest.raises(ValueError, match="max_prompt_tokens=5 drops every prompt.*prompt_too_long=40"):
        load_split(train, tight, "train", processor)
