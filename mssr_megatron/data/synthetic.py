"""Synthetic visual-reasoning data with exact answers, for CPU training of a tiny Qwen2.5-VL (the embedded default).

    train_path, val_path = generate_dataset("runs/synth", n_train=6000, n_val=500, seed=0)
    floor_accuracy(read_records(train_path, cfg.data, "train"))   # accuracy of always giving the commonest answer

Every example is first a *scene* (a small JSON-able dict: what is drawn where, and what is asked); the image is
rendered from the scene with PIL and the answer is computed from the scene, never read back from pixels, so answers
are exact by construction. The scene is stored in the record ("scene" field; readers ignore extra fields) so tests
and analyses can re-derive every answer.

Families and levels (level 1 of "count" is the layout that was seen to learn on 2 cores, see PLATFORM_NOTES):
  count    1: 84x84, 3x3 grid of 28-px cells (one merged image token per cell), 1-6 circles/squares in red/green/blue,
              "How many shapes?" / "How many red shapes?"
           2: 112x112, 4x4 grid, 2-10 shapes incl. triangles, also "How many triangles?"
           3: 112x112, 4x4 grid, 3-14 shapes of varying size and offset in their cell, "How many blue circles?"
  numbers  1: one digit (84x84), "What number is shown?"   2: two digits, their sum
           3: two numbers 0-99 (112x112), their sum or difference
  bars     1: 2 bars (84x84), "Which bar is tallest? Answer with its colour."   2: 3 bars, or "How many bars are
              taller than the red bar?"   3: 4 bars (112x112) with smaller height gaps, both questions
Answers are a number or a colour word, so a tiny model can emit `\\boxed{<answer>}` in a few tokens.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from collections import Counter
from typing import Any, Iterable

from PIL import Image, ImageDraw, ImageFont

__all__ = ["FAMILIES", "LEVELS", "make_scene", "question_and_answer", "render", "generate_dataset", "floor_accuracy"]

logger = logging.getLogger(__name__)

FAMILIES = ("count", "numbers", "bars")
LEVELS = (1, 2, 3)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "orange": (245, 140, 0)}
SHAPE_COLOURS = ("red", "green", "blue")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
CELL = 28  # = patch 14 x merge 2: one merged vision token per grid cell
MAX_VAL_ATTEMPTS = 100  # redraws of a validation scene that also occurs in the training set


# ------------------------------------------------------------------------------------------------------------------
# Scenes: pure data drawn from an rng
# ------------------------------------------------------------------------------------------------------------------


def _count_scene(rng: random.Random, level: int) -> dict[str, Any]:
    grid, lo, hi = {1: (3, 1, 6), 2: (4, 2, 10), 3: (4, 3, 14)}[level]
    kinds = ("circle", "square") if level == 1 else ("circle", "square", "triangle")
    cells = rng.sample(range(grid * grid), rng.randint(lo, hi))
    shapes = []
    for cell in sorted(cells):
        row, col = divmod(cell, grid)
        side = 20 if level < 3 else rng.randint(12, 24)  # level 3: varying size and position inside the cell
        if level < 3:
            dx = dy = (CELL - side) // 2
        else:
            dx, dy = rng.randint(2, CELL - side - 2), rng.randint(2, CELL - side - 2)
        x0, y0 = col * CELL + dx, row * CELL + dy
        shapes.append({"row": row, "col": col, "kind": rng.choice(kinds), "colour": rng.choice(SHAPE_COLOURS),
                       "box": [x0, y0, x0 + side - 1, y0 + side - 1]})
    questions = {1: ("all", "colour"), 2: ("all", "colour", "kind"), 3: ("colour", "kind", "colour_kind")}[level]
    asked = rng.choice(questions)
    query = {
        "colour": rng.choice(SHAPE_COLOURS) if asked in ("colour", "colour_kind") else None,
        "kind": rng.choice(kinds) if asked in ("kind", "colour_kind") else None,
    }
    return {"family": "count", "level": level, "size": grid * CELL, "grid": grid, "shapes": shapes, "query": query}


def _numbers_scene(rng: random.Random, level: int) -> dict[str, Any]:
    size, count, top, query = {1: (84, 1, 9, "read"), 2: (84, 2, 9, "sum"), 3: (112, 2, 99, None)}[level]
    query = query or rng.choice(("sum", "difference"))
    slot = size // count
    numbers = []
    for k in range(count):
        font_size = rng.choice((30, 34, 38)) if count == 2 else rng.choice((44, 52, 60))
        # Centre of the text, jittered inside its slot (left / right half for two numbers).
        cx = k * slot + slot // 2 + rng.randint(-4, 4)
        cy = size // 2 + rng.randint(-12, 12)
        numbers.append({"value": rng.randint(0, top), "center": [cx, cy], "font_size": font_size})
    return {"family": "numbers", "level": level, "size": size, "numbers": numbers, "query": query}


def _bars_scene(rng: random.Random, level: int) -> dict[str, Any]:
    size, count, gap = {1: (84, 2, 16), 2: (84, 3, 8), 3: (112, 4, 4)}[level]
    query = "tallest" if level == 1 else rng.choice(("tallest", "taller_than_red"))
    colours = rng.sample(list(COLOURS), count)
    if query == "taller_than_red" and "red" not in colours:
        colours[rng.randrange(count)] = "red"
    while True:  # distinct heights at least `gap` apart, so "tallest" is unambiguous at a glance
        heights = [rng.randint(10, size - 14) for _ in range(count)]
        if all(abs(a - b) >= gap for i, a in enumerate(heights) for b in heights[i + 1 :]):
            break
    slot = size // count
    bars = [{"colour": c, "height": h, "x0": k * slot + slot // 5, "x1": (k + 1) * slot - slot // 5 - 1}
            for k, (c, h) in enumerate(zip(colours, heights, strict=True))]
    return {"family": "bars", "level": level, "size": size, "baseline": size - 4, "bars": bars, "query": query}


_SCENES = {"count": _count_scene, "numbers": _numbers_scene, "bars": _bars_scene}


def make_scene(rng: random.Random, family: str, level: int) -> dict[str, Any]:
    """A random scene of `family` at `level` (1-3)."""
    if family not in _SCENES:
        raise ValueError(f"unknown synthetic family {family!r}; choose from {FAMILIES}")
    if level not in LEVELS:
        raise ValueError(f"unknown synthetic level {level!r}; choose from {LEVELS}")
    return _SCENES[family](rng, level)


def question_and_answer(scene: dict[str, Any]) -> tuple[str, str]:
    """The question text and its exact answer, both from the scene alone."""
    family = scene["family"]
    if family == "count":
        colour, kind = scene["query"]["colour"], scene["query"]["kind"]
        hits = [s for s in scene["shapes"] if colour in (None, s["colour"]) and kind in (None, s["kind"])]
        noun = PLURAL[kind] if kind else "shapes"
        return f"How many {colour + ' ' if colour else ''}{noun} are there?", str(len(hits))
    if family == "numbers":
        values = [n["value"] for n in scene["numbers"]]
        if scene["query"] == "read":
            return "What number is shown in the image?", str(values[0])
        if scene["query"] == "sum":
            return "What is the sum of the numbers?", str(sum(values))
        return "What is the larger number minus the smaller number?", str(max(values) - min(values))
    if family == "bars":
        bars = scene["bars"]
        if scene["query"] == "tallest":
            return "Which bar is tallest? Answer with its colour.", max(bars, key=lambda b: b["height"])["colour"]
        red = next(b["height"] for b in bars if b["colour"] == "red")
        return "How many bars are taller than the red bar?", str(sum(b["height"] > red for b in bars))
    raise ValueError(f"unknown scene family {family!r}")


# ------------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _font(size: int):
    """PIL's bundled font at `size` px (needs FreeType, which Pillow wheels include); None = bitmap fallback."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow without size=, or no FreeType
        return None


def _draw_text(image: Image.Image, text: str, center: tuple[int, int], size: int) -> None:
    draw = ImageDraw.Draw(image)
    font = _font(size)
    if font is not None:
        draw.text(center, text, fill=(0, 0, 0), font=font, anchor="mm")
        return
    # Bitmap fallback: draw with the small default font, then scale the glyphs up to about `size` px tall.
    small = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=small)
    tile = Image.new("L", (right - left + 2, bottom - top + 2), 0)
    ImageDraw.Draw(tile).text((1 - left, 1 - top), text, fill=255, font=small)
    scale = max(1, size // tile.height)
    tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
    image.paste((0, 0, 0), (center[0] - tile.width // 2, center[1] - tile.height // 2), tile)


def render(scene: dict[str, Any]) -> Image.Image:
    """Draw a scene on a white RGB canvas."""
    size = scene["size"]
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    if scene["family"] == "count":
        for s in scene["shapes"]:
            x0, y0, x1, y1 = s["box"]
            fill = COLOURS[s["colour"]]
            if s["kind"] == "circle":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif s["kind"] == "square":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    elif scene["family"] == "numbers":
        for n in scene["numbers"]:
            _draw_text(image, str(n["value"]), tuple(n["center"]), n["font_size"])
    elif scene["family"] == "bars":
        base = scene["baseline"]
        draw.line((0, base + 1, size - 1, base + 1), fill=(0, 0, 0))  # the axis the bars stand on
        for b in scene["bars"]:
            draw.rectangle((b["x0"], base - b["height"] + 1, b["x1"], base), fill=COLOURS[b["colour"]])
    return image


# ------------------------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------------------------


def _scene_key(scene: dict[str, Any]) -> str:
    return json.dumps(scene, sort_keys=True, separators=(",", ":"))


def _draw(seed: int, split: str, index: int, attempt: int, families, levels) -> dict[str, Any]:
    # A string seed is hashed (sha512) by `random`: stable across Python versions and independent per example,
    # so example i does not depend on how many examples come before it.
    rng = random.Random(f"mssr-synthetic:{seed}:{split}:{index}:{attempt}")
    return make_scene(rng, rng.choice(families), rng.choice(levels))


def generate_dataset(
    out_dir: str | os.PathLike,
    n_train: int,
    n_val: int,
    seed: int = 0,
    levels: Iterable[int] = (1,),
    families: Iterable[str] = ("count",),
) -> tuple[str, str]:
    """Write out_dir/train.jsonl, out_dir/val.jsonl (fields id, problem, answer, images, scene) and the PNGs in
    out_dir/images/; return the two jsonl paths. Deterministic for a seed. Validation scenes never repeat a
    training scene (redrawn up to MAX_VAL_ATTEMPTS times), and ids differ ("syn<seed>-train-..." / "...-val-...").
    The defaults (count, level 1) are the task that was seen to learn on CPU."""
    families, levels = tuple(families), tuple(levels)
    for family in families:
        make_scene(random.Random(0), family, levels[0])  # validate names early, before writing anything
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    train_keys: set[str] = set()
    paths, repeats = [], 0
    for split, count in (("train", n_train), ("val", n_val)):
        path = os.path.join(out_dir, f"{split}.jsonl")
        with open(path, "w", encoding="utf-8") as fh:
            for i in range(count):
                scene = _draw(seed, split, i, 0, families, levels)
                attempt = 0
                while split == "val" and _scene_key(scene) in train_keys:
                    attempt += 1
                    if attempt == MAX_VAL_ATTEMPTS:  # tiny scene spaces: accept, but say so below
                        repeats += 1
                        break
                    scene = _draw(seed, split, i, attempt, families, levels)
                if split == "train":
                    train_keys.add(_scene_key(scene))
                image_rel = f"images/{split}-{i:06d}.png"
                render(scene).save(os.path.join(out_dir, image_rel), compress_level=1)
                problem, answer = question_and_answer(scene)
                record = {"id": f"syn{seed}-{split}-{i:06d}", "problem": problem, "answer": answer,
                          "images": [image_rel], "scene": scene}
                fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        paths.append(path)
    if repeats:
        logger.warning("synthetic data: %d validation scenes also occur in the training set", repeats)
    return paths[0], paths[1]


def floor_accuracy(records: Iterable[Any]) -> float:
    """Accuracy of always answering the most common answer: the floor a trained policy must beat.
    Takes Records (`.answer`) or dicts (`["answer"]`)."""
    answers = Counter(r["answer"] if isinstance(r, dict) else r.answer for r in records)
    total = sum(answers.values())
    return answers.most_common(1)[0][1] / total if total else 0.0
