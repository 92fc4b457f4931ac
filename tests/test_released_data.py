"""Issue 13 item 1, the released data settings: image pixel bounds, the released prompt template (a Jinja file),
gold answers in <answer> tags, and binarised tracker rewards."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # the PIL backend: no torchvision

from mssr_megatron.algorithms.pipeline import RLAlgorithm
from mssr_megatron.config import AlgorithmConfig, BaselineConfig, DataConfig
from mssr_megatron.data.images import bounded_size, resize_to_bounds
from mssr_megatron.data.prompts import (
    PromptFormat, build_request, count_prompt_tokens, load_split, prompt_images, prompt_text,
)
from mssr_megatron.data.synthetic import generate_dataset
from mssr_megatron.rewards import choice_reward, format_reward, math_reward
from mssr_megatron.rewards.functions import math_boxed_reward
from prompt_assets import processor, record  # noqa: F401 (processor: a pytest fixture)

RELEASED_MIN, RELEASED_MAX, QWEN_FACTOR = 262144, 4194304, 28  # data.min_pixels/max_pixels; 14 px patch x merge 2
TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "prompts" / "released_math.jinja"


# --- image bounds -----------------------------------------------------------------------------------------------

# (width, height) -> resized, worked by hand with the released bounds and factor 28 (w, h rounded to multiples of
# 28; if the product is over max: scale by sqrt(max / (w h)) and round down; under min: sqrt(min / (w h)), round up).
HAND_WORKED = {
    (100, 80): (588, 476),      # small diagram: 112x84 = 9408 px < min; x5.7243 -> 572.4, 457.9 -> up: 21, 17 cells
    (512, 512): (532, 532),     # 504x504 = 254016 < min; x1 -> 512/28 = 18.3 -> up: 19 cells
    (700, 500): (700, 504),     # 700x504 = 352800, inside: rounded only
    (4000, 3000): (2352, 1764),  # 4004x2996 > max; /1.69146 -> 2364.8, 1773.6 -> down: 84, 63 cells
    (1000, 50): (2296, 140),    # odd aspect 20:1: 1008x56 < min; x2.28973 -> 2289.7, 114.5 -> up: 82, 5 cells
}


@pytest.mark.parametrize("size", list(HAND_WORKED))
def test_bounded_size_hand_worked(size):
    w, h = bounded_size(*size, RELEASED_MIN, RELEASED_MAX, QWEN_FACTOR)
    assert (w, h) == HAND_WORKED[size]
    assert RELEASED_MIN <= w * h <= RELEASED_MAX and w % 28 == 0 and h % 28 == 0


@pytest.mark.parametrize("size", [(1, 1), (28, 28), (100, 80), (320, 240), (511, 513), (1920, 1080), (4000, 3000),
                                  (8192, 8192), (1000, 50), (50, 1000), (3000, 17), (640, 6400)])
def test_bounded_size_matches_transformers_smart_resize(size):
    """Same rule as the Qwen2-VL image processor's own resize (which takes and returns (height, width))."""
    w, h = bounded_size(*size, RELEASED_MIN, RELEASED_MAX, QWEN_FACTOR)
    assert (h, w) == smart_resize(size[1], size[0], QWEN_FACTOR, RELEASED_MIN, RELEASED_MAX)
    assert RELEASED_MIN <= w * h <= RELEASED_MAX and w % 28 == 0 and h % 28 == 0
    ratio_error = abs(math.log((w / h) / (size[0] / size[1])))
    assert ratio_error < math.log(1 + 28 / min(w, h)) * 2  # aspect kept up to one cell of rounding per side


def test_resize_to_bounds_resizes_the_image():
    image = Image.new("RGB", (100, 80), (1, 2, 3))
    assert resize_to_bounds(image, RELEASED_MIN, RELEASED_MAX, QWEN_FACTOR).size == (588, 476)
    same = Image.new("RGB", (700, 504))
    assert resize_to_bounds(same, RELEASED_MIN, RELEASED_MAX, QWEN_FACTOR) is same


BOUNDED = PromptFormat("{problem}", min_pixels=6272, max_pixels=12544)  # inside the tiny processor's 3136..12544


# By hand: 28x28 -> 784 px < 6272: x2.83 -> up: 3x3 cells. 300x200 -> 308x196 > 12544: /2.187 -> 137.2, 91.4 -> down:
# 4x3 cells. 30x500 -> 28x504 > 12544: /1.0935 -> 27.4 (at least one cell), 457.2 -> 16 cells. 84x84: inside.
@pytest.mark.parametrize("sizes, resized", [([(28, 28)], [(84, 84)]), ([(300, 200)], [(112, 84)]),
                                            ([(30, 500), (84, 84)], [(28, 448), (84, 84)])])
def test_bounded_images_reach_the_model_and_the_count(processor, sizes, resized):
    """The images the engine and the trainer get have the bounded size, the processor keeps that size, and the
    prompt-length count is the processor's real token count."""
    rec = record(sizes)
    images = build_request(rec, BOUNDED, processor).images
    assert [im.size for im in images] == resized == [im.size for im in prompt_images(rec, BOUNDED, processor)]
    text = prompt_text(rec, BOUNDED, processor)
    out = processor(text=[text], images=images, return_tensors="pt")
    assert [tuple(g) for g in out["image_grid_thw"].tolist()] == [(1, h // 14, w // 14) for w, h in resized]
    counted = count_prompt_tokens(text, [BOUNDED.image_size(w, h, processor) for w, h in sizes], processor)
    assert counted == out["input_ids"].shape[1]


def test_length_filter_counts_the_resized_image(processor, tmp_path):
    """Synthetic 84x84 images: 9 vision tokens as they are, 19x19 = 361 at the released lower bound of 512x512 px
    (so a limit between the two keeps them only without bounds); and the tiny processor, whose own bounds stop at
    112x112 px, is refused with the released bounds, since it would shrink the images again."""
    train, _ = generate_dataset(tmp_path, n_train=4, n_val=1, seed=1)
    base = DataConfig(prompt_template="{problem}", max_prompt_tokens=4096)
    plain = count_prompt_tokens(prompt_text(load_split(train, base, "train", processor)[0], "{problem}", processor),
                                [(84, 84)], processor)
    assert plain - count_prompt_tokens("", [], processor) > 9
    upscaled = PromptFormat("{problem}", min_pixels=RELEASED_MIN, max_pixels=RELEASED_MAX)
    assert upscaled.image_size(84, 84, processor) == (532, 532)  # released bounds, bigger processor (hand: 19x19)
    limit = DataConfig(prompt_template="{problem}", max_prompt_tokens=plain, min_pixels=12544, max_pixels=12544)
    with pytest.raises(ValueError, match="drops every prompt.*prompt_too_long=4"):  # 84x84 -> 112x112: 16 tokens
        load_split(train, limit, "train", processor)
    assert len(load_split(train, dataclasses.replace(limit, max_prompt_tokens=plain + 7), "train", processor)) == 4
    released = DataConfig(prompt_template="{problem}", min_pixels=RELEASED_MIN, max_pixels=RELEASED_MAX)
    with pytest.raises(ValueError, match="not inside the image processor's own bounds 3136..12544"):
        load_split(train, released, "train", processor)


# --- the released prompt template -------------------------------------------------------------------------------

RELEASED_TEXT = ("What is 1+2? First think through the reasoning process inside <think> </think> tags, then give the "
                 "final answer inside \\boxed{}.")


def test_released_template_renders_image_first(processor):
    fmt = PromptFormat.from_config(DataConfig(prompt_template_file=str(TEMPLATE)))
    assert fmt.fill("  What is 1+2?\n") == RELEASED_TEXT
    text = prompt_text(record([(84, 84)], "What is 1+2?"), fmt, processor)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + RELEASED_TEXT
                    + "<|im_end|>\n<|im_start|>assistant\n")  # the image placeholder precedes the text


def test_template_file_errors(tmp_path):
    with pytest.raises(ValueError, match="prompt_template_file='nope.jinja' cannot be read"):
        PromptFormat.from_config(DataConfig(prompt_template_file="nope.jinja"))
    ignores = tmp_path / "ignores.jinja"
    ignores.write_text("Solve it.")
    with pytest.raises(ValueError, match="never inserts"):
        PromptFormat.from_config(DataConfig(prompt_template_file=str(ignores)))
    typo = tmp_path / "typo.jinja"
    typo.write_text("{{ problme }}")
    with pytest.raises(ValueError, match="does not render: UndefinedError"):
        PromptFormat.from_config(DataConfig(prompt_template_file=str(typo)))


# --- the grader -------------------------------------------------------------------------------------------------

def test_gold_answer_tags_are_stripped():
    assert math_reward("\\boxed{3}", "<answer>3</answer>") == 1.0
    assert math_reward("so \\boxed{\\frac{1}{2}}", "<answer> 0.5 </answer>") == 1.0
    assert math_reward("\\boxed{4}", "<answer>3</answer>") == 0.0
    assert choice_reward("\\boxed{B}", "<answer>B</answer>") == 1.0


def test_math_boxed_grades_the_box_only():
    assert math_reward("The answer is 3", "3") == 1.0  # ours: answer-line fallback
    assert math_boxed_reward("The answer is 3", "3") == 0.0  # released: boxed content only
    assert math_boxed_reward("<answer>\\boxed{3}</answer>", "<answer>3</answer>") == 1.0


# --- binarised tracker rewards ----------------------------------------------------------------------------------

def test_tracker_gets_binarised_rewards_with_a_format_reward_mixed_in():
    """Rewards (1 - w) * answer + w * format with w = 0.1: the tracker receives 1 / 0 (reward > 0.5); without the
    option it gets the raw scores as before."""
    responses = ["<think>ok</think> \\boxed{3}", "<think>ok</think> \\boxed{4}", "\\boxed{3}", "\\boxed{4}"]
    w = 0.1
    rewards = torch.tensor([(1 - w) * math_reward(r, "3") + w * format_reward(r) for r in responses],
                           dtype=torch.float64)
    assert rewards.tolist() == pytest.approx([1.0, 0.1, 0.9, 0.0])
    prompts, mask = ["p0", "p0", "p1", "p1"], torch.ones(4, 3, dtype=torch.bool)

    def tracker_inputs(binarize):
        cfg = AlgorithmConfig(baseline=BaselineConfig(rho_rule="constant", binarize_rewards=binarize))
        algo = RLAlgorithm(cfg)
        seen = []
        for name in ("initialize", "update"):
            method = getattr(algo.tracker, name)
            setattr(algo.tracker, name,
                    lambda ids, r, *a, _m=method, **k: (seen.append(r.tolist()), _m(ids, r, *a, **k)))
        algo.initialize(prompts, rewards)
        baseline = algo.tracker.baseline(["p0", "p1"]).tolist()
        algo.advantages(prompts, rewards, mask)
        algo.after_update(prompts, rewards, mask)
        return seen, baseline, algo.tracker.params(["p0", "p1"])

    seen, baseline, (a, b) = tracker_inputs(True)
    assert seen == [[1.0, 0.0, 1.0, 0.0]] * 2
    # p0: init v0 = 1/2, n0 = 8 -> a = b = 4; update with rho 0.96: a = 3.84 + 1, b = 3.84 + 1. p1 the same.
    assert a.tolist() == pytest.approx([4.84, 4.84]) and b.tolist() == pytest.approx([4.84, 4.84])
    raw_seen, raw_baseline, _ = tracker_inputs(False)
    assert raw_seen == [rewards.tolist()] * 2
    # The baselines the advantages use: success rates 1/2, 1/2 with the option; raw means 0.55, 0.45 without.
    assert baseline == pytest.approx([0.5, 0.5]) and raw_baseline == pytest.approx([0.55, 0.45])


# --- the loop with every released data setting -------------------------------------------------------------------

def _train_worker(rank: int, config_path: str, extra: list) -> None:
    from mssr_megatron.config import load_config
    from mssr_megatron.train.trainer import train

    train(load_config(config_path, extra))


@pytest.mark.slow
def test_loop_runs_with_the_released_data_settings(tmp_path):
    """Two steps with the template file, pixel bounds (the 84x84 images upscaled to 112x112), the box-only grader,
    a format reward and binarised tracker rewards: the engine and the trainer see the same resized images (their
    log-probs agree), and validation goes through the same path."""
    import json

    from megatron_harness import spawn
    from trainer_assets import build_assets, overrides

    assets = build_assets(str(tmp_path / "assets"))
    extra = overrides(assets, str(tmp_path / "run"), f"data.prompt_template_file={TEMPLATE}", "data.min_pixels=12544",
                      "data.max_pixels=12544", "data.reward=math_boxed", "data.format_reward_weight=0.1",
                      "algorithm.baseline.binarize_rewards=true")
    spawn(_train_worker, 1, "examples/configs/tiny_cpu.yaml", extra)
    with open(tmp_path / "run" / "metrics.jsonl") as fh:
        steps = [m for m in map(json.loads, fh) if m["step"] > 0]
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["actor/loss"]) and m["mismatch/max_abs_diff"] <= 1e-3 for m in steps)
    assert "val/accuracy" in steps[-1]


def test_pixel_bounds_config_checks():
    from mssr_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="data.min_pixels=9000 must be at most data.max_pixels=8000"):
        load_config(None, ["data.min_pixels=9000", "data.max_pixels=8000"]).validate()
    with pytest.raises(ConfigError, match="data.max_pixels=0 must be > 0"):
        load_config(None, ["data.max_pixels=0"]).validate()
    load_config(None, ["data.min_pixels=262144", "data.max_pixels=4194304"]).validate()
