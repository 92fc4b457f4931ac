"""The analytic FLOP formulas of `mssr bench` against hand-worked cases and against torch's FlopCounterMode on a real
tiny Qwen2.5-VL (Hugging Face, eager attention so that the attention products are plain matmuls the counter sees).

Differences to know: FlopCounterMode counts matmuls/convolutions only (so does bench/flops.py); on CPU it has no
formula for the fused SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`), so with the default "sdpa"
attention it sees every FLOP except the attention products - checked below as well.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mssr_megatron.bench import flops as F

HF_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


def _text(**kw):
    base = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=16, vocab_size=10)
    return SimpleNamespace(text_config=SimpleNamespace(**{**base, **kw}))


def test_language_flops_hand_worked():
    # h=8, nh=2, nkv=1, d=4, f=16, V=10, one layer, S=3:
    # projections per token 2*8*8 (q) + 2*2*8*4 (k, v) + 2*8*8 (o) + 6*8*16 (mlp) = 128 + 128 + 128 + 768 = 1152
    # attention: 4 * S * nh * d per query = 4*3*2*4 = 96, x 3 queries = 288; logits 2*8*10 = 160 per token
    out = F.language_forward_flops(_text(), [3])
    assert out == {"projections": 3 * 1152, "attention": 288, "logits": 480, "tokens": 3, "total": 3456 + 288 + 480}
    causal = F.language_forward_flops(_text(), [3], causal=True)
    assert causal["attention"] == 4 * 2 * 4 * (1 + 2 + 3)
    two = F.language_forward_flops(_text(num_hidden_layers=2), [3, 1])
    assert two["projections"] == 2 * 4 * 1152 and two["attention"] == 2 * 32 * (9 + 1)


def _vision(**kw):
    base = dict(hidden_size=4, depth=2, intermediate_size=8, out_hidden_size=6, in_channels=3, temporal_patch_size=2,
                patch_size=14, spatial_merge_size=2, window_size=56, fullatt_block_indexes=[1])
    return SimpleNamespace(vision_config=SimpleNamespace(**{**base, **kw}))


def test_window_lengths_follow_the_tiling():
    v = F.VisionDims.from_hf(_vision())
    # window 56 px = 2 x 2 merged tokens; a 6 x 10 patch grid is 3 x 5 merged tokens: rows [2, 1] x cols [2, 2, 1]
    assert F.window_lengths(v, (1, 6, 10)) == [16, 16, 8, 8, 8, 4]
    assert F.window_lengths(v, (2, 4, 4)) == [16, 16]  # one window per frame
    assert sum(F.window_lengths(v, (1, 14, 22))) == 14 * 22


def test_vision_flops_hand_worked():
    # grid (1, 4, 4): 16 patches of 3*2*14*14 = 1176 pixels, hv=4, iv=8, out=6, merge unit 4 -> 4 image tokens
    out = F.vision_forward_flops(_vision(), [(1, 4, 4)])
    per_patch = 2 * 4 * 12 + 2 * 4 * 4 + 6 * 4 * 8  # qkv + proj + mlp = 96 + 32 + 192
    assert out["patch_embed"] == 2 * 16 * 1176 * 4
    assert out["projections"] == 2 * 16 * per_patch
    assert out["attention"] == 2 * 4 * 16 * 16 * 4  # window block: one 16-patch window; full block: 16 patches
    assert out["merger"] == 4 * (2 * 16 * 16 + 2 * 16 * 6)
    assert out["image_tokens"] == 4


def test_training_multiplier():
    fwd = {"language": 100, "vision": 40, "patch_embed": 10, "total": 140}
    assert F.training_flops(fwd) == {"language": 300, "vision": 110, "total": 410}
    assert F.training_flops(fwd, train_vision=False) == {"language": 300, "vision": 40, "total": 340}


@pytest.fixture(scope="module")
def tiny():
    """A random tiny Qwen2.5-VL and a right-padded batch of two prompts: one image of 6 x 10 patches (partial
    attention windows, 15 image tokens) and one of 4 x 4 patches (4 tokens)."""
    from mssr_megatron.models.tiny_hf import init_tiny_model, tiny_qwen2_5_vl_config

    cfg = tiny_qwen2_5_vl_config(vocab_size=331, num_layers=2)
    model = init_tiny_model(cfg, seed=0)
    model.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(0)
    grids = [(1, 6, 10), (1, 4, 4)]
    rows = []
    for before, (t, h, w), after in ((4, grids[0], 5), (2, grids[1], 3)):
        image = [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
        rows.append(torch.randint(10, 300, (before,), generator=gen).tolist() + image
                    + torch.randint(10, 300, (after,), generator=gen).tolist())
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    inputs = {"input_ids": ids, "attention_mask": mask, "image_grid_thw": torch.tensor(grids),
              "pixel_values": torch.randn(60 + 16, 3 * 2 * 14 * 14, generator=gen),
              "mm_token_type_ids": (ids == cfg.image_token_id).long()}
    return cfg, model, inputs, grids


def _count(fn) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()


def test_forward_matches_flop_counter(tiny):
    cfg, model, inputs, grids = tiny
    model.eval()
    total, by_module = _count(lambda: model(**{k: inputs[k] for k in HF_KEYS}))
    width = inputs["input_ids"].shape[1]
    # The padded batch is what the model computes: every row at the padded width.
    ours = F.forward_flops(cfg, [width, width], grids)
    assert total == ours["total"]
    visual = sum(by_module["Qwen2_5_VLForConditionalGeneration.model.visual"].values())
    assert visual == ours["vision"]


def test_training_matches_flop_counter(tiny):
    cfg, model, inputs, grids = tiny
    model.train()
    width = inputs["input_ids"].shape[1]

    def step():
        model(**{k: inputs[k] for k in HF_KEYS}).logits.float().pow(2).mean().backward()

    total, _ = _count(step)
    model.zero_grad(set_to_none=True)
    assert total == F.training_flops(F.forward_flops(cfg, [width, width], grids))["total"]


def test_sdpa_attention_is_invisible_to_the_counter_on_cpu(tiny):
    cfg, model, inputs, grids = tiny
    model.set_attn_implementation("sdpa")
    model.eval()
    try:
        total, _ = _count(lambda: model(**{k: inputs[k] for k in HF_KEYS}))
    finally:
        model.set_attn_implementation("eager")
    width = inputs["input_ids"].shape[1]
    lang = F.language_forward_flops(cfg, [width, width])
    vis = F.vision_forward_flops(cfg, grids)
    assert total == lang["total"] - lang["attention"] + vis["total"] - vis["attention"]


def test_generation_matches_flop_counter(tiny):
    from transformers import GenerationConfig

    cfg, model, inputs, grids = tiny
    model.eval()
    p = int(inputs["attention_mask"][1].sum())  # the second prompt alone: no padding
    row = {"input_ids": inputs["input_ids"][1:, :p], "attention_mask": inputs["attention_mask"][1:, :p],
           "mm_token_type_ids": inputs["mm_token_type_ids"][1:, :p], "pixel_values": inputs["pixel_values"][60:],
           "image_grid_thw": inputs["image_grid_thw"][1:]}
    n = 5
    config = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        total, _ = _count(lambda: model.generate(**row, generation_config=config))
    assert total == F.generation_flops(cfg, [p], [n], [grids[1]])["total"]


def test_per_token_summary_of_the_tiny_model(tiny):
    cfg, *_ = tiny
    s = F.per_token_summary(cfg, 64, (1, 6, 6))
    t = F.TextDims.from_hf(cfg)
    assert s["language_weights_per_token"] == t.layers * t.projection_flops() + t.logits_flops()
    assert s["language_forward_per_token"] == pytest.approx(
        s["language_weights_per_token"] + s["language_attention_per_token"])
    assert s["image_tokens_per_image"] == 9
