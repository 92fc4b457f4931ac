"""Shared fixtures and helpers of the HF rollout engine tests (test_hf_engine*.py): a tiny random Qwen2.5-VL, tied
and untied, its engines, and image requests."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mssr_megatron.models.processor import load_processor  # noqa: E402
from mssr_megatron.models.tiny_hf import (  # noqa: E402
    build_tiny_model_dir,
    chat_messages,
    init_tiny_model,
    save_published,
    synthetic_image,
    tiny_qwen2_5_vl_config,
)
from mssr_megatron.rollout.hf_engine import HFEngine  # noqa: E402
from mssr_megatron.rollout.protocol import GenerationRequest  # noqa: E402

BUCKET_BYTES = 64 * 1024  # the tiny model (~3.6 MB) streams as dozens of buckets


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_tiny_model_dir(tmp_path_factory.mktemp("hf_engine") / "tied", seed=0)
    # Qwen2.5-VL's published sampling defaults: the engine must not let generate() pick them up.
    with open(os.path.join(path, "generation_config.json")) as fh:
        gen = json.load(fh)
    gen.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)
    with open(os.path.join(path, "generation_config.json"), "w") as fh:
        json.dump(gen, fh)
    return path


@pytest.fixture(scope="module")
def untied_dir(model_dir, tmp_path_factory):
    """Untied embeddings (like 7B) and a 331-row embedding over the 320-token tokenizer (padded rows)."""
    path = str(tmp_path_factory.mktemp("hf_engine") / "untied")
    shutil.copytree(model_dir, path)
    config = tiny_qwen2_5_vl_config(331, False, tokenizer=load_processor(model_dir).tokenizer)
    save_published(init_tiny_model(config, seed=2), path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir):
    return HFEngine(model_dir, max_batch_size=4)  # 6 rows -> batches of 4 and 2


@pytest.fixture(scope="module")
def untied_engine(untied_dir):
    return HFEngine(untied_dir)


def prompt(engine, text, images=1):
    messages = chat_messages(text, with_image=images > 0)
    if images > 1:
        messages[0]["content"] = [{"type": "image"}] * images + messages[0]["content"][1:]
    return engine.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def requests_(engine, tmp_path_factory):
    """Three requests: a PIL image, an image file path, PNG bytes; different image sizes -> different prompt lengths."""
    path = str(tmp_path_factory.mktemp("images") / "img.png")
    synthetic_image(1, size=56).save(path)
    return [
        GenerationRequest("a", prompt(engine, "How many shapes?"), [synthetic_image(0, size=84)]),
        GenerationRequest("b", prompt(engine, "How many red shapes are there in the image?"), [path]),
        GenerationRequest("c", prompt(engine, "How many blue circles?"), [png_bytes(synthetic_image(2, size=112))]),
    ]


def teacher_forced_logits(engine, request, rollout):
    """Raw logits [T, V] at the response positions of one unpadded forward over prompt + response."""
    images = [_decode(img) for img in request.images]
    enc = engine.processor(text=[request.prompt], images=images or None, return_tensors="pt")
    assert enc["input_ids"][0].tolist() == rollout.prompt_ids
    n_prompt, n_resp = len(rollout.prompt_ids), len(rollout.response_ids)
    ids = torch.tensor([rollout.prompt_ids + rollout.response_ids])
    mm = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, n_resp, dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = engine.model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            mm_token_type_ids=mm,
            pixel_values=enc.get("pixel_values"),
            image_grid_thw=enc.get("image_grid_thw"),
        )
    return out.logits[0, n_prompt - 1 : n_prompt + n_resp - 1].float()


def _decode(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    return Image.open(source).convert("RGB")


def blocked(engine):
    mask = torch.zeros(engine.model.config.get_text_config().vocab_size, dtype=torch.bool)
    mask[engine.blocked_ids] = True
    return mask
