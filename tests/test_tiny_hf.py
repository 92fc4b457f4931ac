"""Tiny random Qwen2.5-VL model directory: tokenizer, chat template, processor, config, seeded weights, published
tensor names, and a forward pass with mrope positions (CPU, a few seconds)."""

from __future__ import annotations

import json
import os
import re

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from safetensors import safe_open  # noqa: E402
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from mssr_megatron.checkpoint.mapping import in_memory_name, published_name  # noqa: E402
from mssr_megatron.models.processor import load_processor  # noqa: E402
from mssr_megatron.models.special_tokens import IMAGE_TOKEN, SPECIAL_TOKENS  # noqa: E402
from mssr_megatron.models.tiny_hf import (  # noqa: E402
    build_tiny_model_dir,
    init_tiny_model,
    make_vl_inputs,
    published_state_dict,
    synthetic_image,
    tiny_qwen2_5_vl_config,
)
from mssr_megatron.models.tiny_tokenizer import train_tokenizer  # noqa: E402

PUBLISHED = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|model\.layers\.\d+\..+|visual\..+|lm_head\.weight)$"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    """Untied embeddings, a vocabulary size that 2-way tensor parallelism does not divide, an even layer count."""
    return build_tiny_model_dir(
        tmp_path_factory.mktemp("tiny331") / "model", seed=3, tie_word_embeddings=False, vocab_size=331, num_layers=4
    )


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def safetensors_keys(model_dir) -> set[str]:
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        return set(f.keys())


def two_prompt_batch(processor):
    images = [synthetic_image(0, size=84), synthetic_image(1, size=56)]
    return make_vl_inputs(processor, images, ["How many shapes?", "How many red shapes are there in the image?"])


# ---------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_special_tokens(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == 320
    for text in [
        "How many red shapes? The answer is \\boxed{3}.",
        "<think>12 * 34 = 408</think> naïve café ✓ 漢字\n\ttabs",
        "",
    ]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # Each special token is one id (the last ids, as in Qwen), also inside text, and decodes back.
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert sorted(ids.values()) == list(range(320 - len(SPECIAL_TOKENS), 320))
    for token, token_id in ids.items():
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        inside = tok.encode(f"How many{token}shapes", add_special_tokens=False)
        assert inside.count(token_id) == 1 and tok.decode(inside) == f"How many{token}shapes"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == ids["<|im_end|>"] and tok.pad_token_id == ids["<|endoftext|>"]


def test_tokenizer_is_deterministic(tmp_path):
    train_tokenizer(tmp_path / "a")
    train_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    corpus = ["How many shapes are there?"] * 50 + ["the quick brown fox jumps over the lazy dog"] * 50
    custom = train_tokenizer(None, vocab_size=300, corpus=corpus)
    assert len(custom) == 300 and custom.convert_tokens_to_ids(IMAGE_TOKEN) == 298
    with pytest.raises(ValueError, match="pass a larger corpus"):
        train_tokenizer(None, vocab_size=400, corpus=corpus)


def test_chat_template(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many shapes?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    messages.append({"role": "assistant", "content": "\\boxed{3}"})
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.endswith("<|im_start|>assistant\n\\boxed{3}<|im_end|>\n")


# ---------------------------------------------------------------------------------------------------- processor


def test_processor_files(tiny_dir, processor):
    from transformers import Qwen2_5_VLProcessor

    data = json.loads(open(os.path.join(tiny_dir, "processor_config.json")).read())
    assert data["processor_class"] == "Qwen2_5_VLProcessor"
    assert data["image_processor"]["image_processor_type"].startswith("Qwen2VLImageProcessor")
    assert data["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert processor.image_processor.merge_size == 2 and processor.image_processor.patch_size == 14


def test_auto_processor_where_torchvision_is_installed(tiny_dir):
    from transformers import AutoProcessor, Qwen2_5_VLProcessor
    from transformers.utils import is_torchvision_available

    if not is_torchvision_available():
        pytest.skip("transformers 5 loads the (torchvision-only) video processor in AutoProcessor")
    assert isinstance(AutoProcessor.from_pretrained(tiny_dir), Qwen2_5_VLProcessor)


def test_processor_expands_image_placeholder(processor):
    batch = two_prompt_batch(processor)
    assert set(batch) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 6], [1, 4, 4]]  # 84x84 and 56x56 images, 14-px patches
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    n_image = (batch["input_ids"] == image_id).sum(-1)
    assert n_image.tolist() == (grid.prod(-1) // 4).tolist() == [9, 4]
    # mm_token_type_ids marks exactly the image tokens; left padding with <|endoftext|>.
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_id)
    mask = batch["attention_mask"]
    assert mask.shape == batch["input_ids"].shape and mask[:, -1].all()
    pad = batch["input_ids"][mask == 0]
    assert pad.numel() > 0 and (pad == processor.tokenizer.pad_token_id).all()
    text = processor.tokenizer.decode(batch["input_ids"][1][mask[1].bool()])
    assert text.startswith("<|im_start|>user\n<|vision_start|>" + IMAGE_TOKEN * 4 + "<|vision_end|>How many red")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_synthetic_image_is_deterministic():
    a, b, c = synthetic_image(5, size=84), synthetic_image(5, size=84), synthetic_image(6, size=84)
    assert a.size == (84, 84) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes() != c.tobytes()


# ---------------------------------------------------------------------------------------------------- model


def test_forward_with_mrope_positions(model, processor):
    batch = two_prompt_batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
        seq = batch["input_ids"].shape[1]
        assert logits.shape == (2, seq, 320) and torch.isfinite(logits).all()
        # The forward used the 3-D (mrope) positions of get_rope_index ...
        position_ids, _ = model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        explicit = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
        assert torch.equal(model(**explicit, position_ids=position_ids).logits, logits)
        # ... whose height/width components differ on the image tokens (a 3x3 grid in row 0)
        image_pos = position_ids[:, 0, batch["mm_token_type_ids"][0].bool()]
        assert image_pos[1].unique().numel() == 3 and image_pos[2].unique().numel() == 3
        # Without mm_token_type_ids transformers falls back to 1-D positions: different logits.
        fallback = model(**explicit).logits
    valid = batch["attention_mask"].bool()
    assert not torch.allclose(fallback[valid], logits[valid])


def test_same_seed_same_weights(tiny_dir):
    config = tiny_qwen2_5_vl_config(320)
    state = torch.get_rng_state()
    a, b, c = (published_state_dict(init_tiny_model(config, seed=s)) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    # The directory holds exactly those seed-0 weights.
    with safe_open(os.path.join(tiny_dir, "model.safetensors"), "pt") as f:
        assert all(torch.equal(f.get_tensor(k), a[k]) for k in a)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_published_names(which, tiny_dir, untied_dir):
    model_dir = tiny_dir if which == "tied" else untied_dir
    keys = safetensors_keys(model_dir)
    config = json.loads(open(os.path.join(model_dir, "config.json")).read())
    n_layers = config["text_config"]["num_hidden_layers"]
    assert all(PUBLISHED.match(k) for k in keys), sorted(k for k in keys if not PUBLISHED.match(k))
    assert {"model.embed_tokens.weight", "model.norm.weight", "visual.patch_embed.proj.weight"} <= keys
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == set(range(n_layers))
    assert ("lm_head.weight" in keys) == (which == "untied")
    assert not any("language_model" in k or k.startswith("model.visual") for k in keys)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_from_pretrained_reproduces_every_tensor(which, tiny_dir, untied_dir):
    model_dir = tiny_dir if which == "tied" else untied_dir
    seed, kwargs = (0, {}) if which == "tied" else (3, dict(vocab_size=331, num_layers=4, tie_word_embeddings=False))
    config = tiny_qwen2_5_vl_config(
        kwargs.get("vocab_size", 320), kwargs.get("tie_word_embeddings", True), num_layers=kwargs.get("num_layers")
    )
    reference = init_tiny_model(config, seed=seed)
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected, got = reference.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert published_state_dict(loaded).keys() == safetensors_keys(model_dir)


def test_transformers_save_pretrained_uses_published_names(tmp_path, model, tiny_dir):
    """transformers 5 keeps `model.language_model.*` / `model.visual.*` in memory but its save_pretrained writes
    the published names: both writers give the same file layout."""
    assert any(k.startswith("model.language_model.") for k in model.state_dict())
    model.save_pretrained(tmp_path)
    assert safetensors_keys(tmp_path) == safetensors_keys(tiny_dir)
    assert published_name("model.language_model.layers.0.mlp.up_proj.weight") == (
        "model.layers.0.mlp.up_proj.weight"
    )
    for name in model.state_dict():
        assert in_memory_name(published_name(name)) == name


def test_vocab_331_four_layers_forward(untied_dir):
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(untied_dir, dtype=torch.float32).eval()
    assert model.config.text_config.vocab_size == 331 and model.config.text_config.num_hidden_layers == 4
    assert model.lm_head.weight.shape == (331, 128)
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    processor = load_processor(untied_dir)
    batch = two_prompt_batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 331) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------- config


def test_config_fields():
    tok = train_tokenizer(None)
    config = tiny_qwen2_5_vl_config(320, tokenizer=tok)
    text, vision = config.text_config, config.vision_config
    sizes = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert sizes == (128, 3, 4, 2)
    assert text.intermediate_size == 384 and text.rms_norm_eps == 1e-6
    assert text.rope_parameters["rope_theta"] == 1e6
    assert sum(text.rope_parameters["mrope_section"]) == (text.hidden_size // text.num_attention_heads) // 2
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (2, 64, 128)
    assert 0 < len(vision.fullatt_block_indexes) < vision.depth  # window and full attention blocks
    assert config.tie_word_embeddings
    for field, token in [
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ]:
        assert getattr(config, field) == tok.convert_tokens_to_ids(token)
    # Without a tokenizer the ids follow train_tokenizer's layout.
    assert tiny_qwen2_5_vl_config(321).image_token_id == config.image_token_id
    assert tiny_qwen2_5_vl_config(321, num_layers=4).text_config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tiny_qwen2_5_vl_config(300, tokenizer=tok)
    with pytest.raises(ValueError, match="mrope_section"):
        tiny_qwen2_5_vl_config(320, rope_parameters={"rope_type": "default", "mrope_section": [8, 8, 8]})
