"""A tiny synthetic evaluation suite in each benchmark's own file layout (written by `mssr make-tiny`).

    suite_yaml = write_tiny_suite("runs/tiny")     # runs/tiny/eval_suite.yaml, files in runs/tiny/eval_data/<name>/
    mssr eval --model runs/tiny/model --suite runs/tiny/eval_suite.yaml --out runs/tiny/eval

Every benchmark gets QUESTIONS_PER_BENCHMARK questions written with the column names, answer formats and file types
its reader expects (parquet with Image cells, a base64 TSV, jsonl + image files, a folder of shards), so the whole
`mssr eval` path runs end to end on CPU. Images and answers come from the synthetic visual task (data/synthetic.py);
most questions are the "count" questions the tiny model was warm-started on, so it gets some right; multiple-choice,
yes/no and chart questions use the same scenes with the benchmark's own answer format. HallusionBench also gets one
row without a figure, which its reader skips and counts ('no_image'), as in the published image split.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
from typing import Any

import yaml

from mssr_megatron.data.synthetic import make_scene, question_and_answer, render

__all__ = ["QUESTIONS_PER_BENCHMARK", "SUITE_FILE", "write_tiny_suite"]

QUESTIONS_PER_BENCHMARK = 6
SUITE_FILE = "eval_suite.yaml"
DATA_DIR = "eval_data"


class _Item:
    """One synthetic question: its scene rendered to PNG, the question, the exact answer and four numeric options."""

    def __init__(self, seed: int, bench: str, index: int, family: str = "count", level: int = 1):
        rng = random.Random(f"mssr-tiny-suite:{seed}:{bench}:{index}")
        self.scene = make_scene(rng, family, level)
        self.question, self.answer = question_and_answer(self.scene)
        buf = io.BytesIO()
        render(self.scene).save(buf, format="PNG")
        self.png = buf.getvalue()
        # Options for a multiple-choice version: the answer and three other counts, in a seeded order.
        if self.answer.isdigit():
            others = rng.sample([n for n in range(10) if str(n) != self.answer], 3)
            self.options = [str(n) for n in others] + [self.answer]
            rng.shuffle(self.options)
        else:
            self.options = []

    @property
    def letter(self) -> str:
        return "ABCD"[self.options.index(self.answer)]

    def cell(self, name: str) -> dict[str, Any]:
        """The Hugging Face `datasets` Image cell."""
        return {"bytes": self.png, "path": name}


def _parquet(path: str, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _mathverse(out: str, seed: int) -> str:
    rows = []
    for i in range(QUESTIONS_PER_BENCHMARK):
        item = _Item(seed, "mathverse", i)
        multi = i % 3 == 2
        question = item.question
        if multi:
            question += "\nChoices:\n" + "\n".join(f"{l}:{o}" for l, o in zip("ABCD", item.options))
        rows.append({"sample_index": str(i + 1), "problem_index": str(i + 1),
                     "problem_version": ("Text Lite", "Vision Dominant", "Vision Only")[i % 3],
                     "question": question, "image": item.cell(f"images_version_1-4/image_{i + 1}.png"),
                     "answer": item.letter if multi else item.answer,
                     "question_type": "multi-choice" if multi else "free-form",
                     "metadata": {"split": "testmini", "source": "synthetic", "subject": "counting",
                                  "subfield": "count"},
                     "query_wo": question, "query_cot": question, "question_for_eval": question})
    path = os.path.join(out, "mathverse", "testmini.parquet")
    _parquet(path, rows)
    return path


def _mathvista(out: str, seed: int) -> str:
    rows = []
    for i in range(QUESTIONS_PER_BENCHMARK):
        item = _Item(seed, "mathvista", i)
        multi = i % 3 == 2
        query = item.question
        if multi:
            query += "\nChoices:\n" + "\n".join(f"({l}) {o}" for l, o in zip("ABCD", item.options))
        size = item.scene["size"]
        rows.append({"pid": str(i + 1), "question": item.question, "image": f"images/{i + 1}.png",
                     "decoded_image": item.cell(f"images/{i + 1}.png"),
                     "choices": item.options if multi else None, "unit": None, "precision": None,
                     "answer": item.answer, "question_type": "multi_choice" if multi else "free_form",
                     "answer_type": "text" if multi else "integer",
                     "metadata": {"category": "math-targeted-vqa", "context": "synthetic scene", "grade": "elementary",
                                  "img_height": size, "img_width": size, "language": "english",
                                  "skills": ["arithmetic reasoning"], "source": "synthetic", "split": "testmini",
                                  "task": "figure question answering"},
                     "query": query})
    path = os.path.join(out, "mathvista", "testmini.parquet")
    _parquet(path, rows)
    return path


def _mmk12(out: str, seed: int) -> str:
    rows = []
    for i in range(QUESTIONS_PER_BENCHMARK):
        item = _Item(seed, "mmk12", i)
        answer = f"$${item.answer}$$" if i % 2 else item.answer  # MMK12 writes many answers in $$...$$
        rows.append({"id": f"tiny-mmk12-{i:04d}", "subject": "math", "question": item.question, "answer": answer,
                     "image": item.cell(f"{i}.png")})
    path = os.path.join(out, "mmk12", "test.parquet")
    _parquet(path, rows)
    return path


def _r1_onevision_bench(out: str, seed: int) -> str:
    path = os.path.join(out, "r1_onevision_bench", "r1-onevision.tsv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["index", "image", "question", "answer", "category", "level"])
        for i in range(QUESTIONS_PER_BENCHMARK):
            item = _Item(seed, "r1_onevision_bench", i)
            multi = i % 3 == 2
            question = item.question
            if multi:
                question += " Options: " + " ".join(f"({l}) {o}" for l, o in zip("ABCD", item.options))
            writer.writerow([i, base64.b64encode(item.png).decode("ascii"),
                             f"Look at the image and answer the question.\nQuestion: {question}",
                             item.letter if multi else item.answer, "Math", "Junior High School"])
    return path


def _hallusionbench(out: str, seed: int) -> str:
    rows = []
    for i in range(QUESTIONS_PER_BENCHMARK + 1):
        item = _Item(seed, "hallusionbench", i)
        count = int(item.answer)
        asked = count if i % 2 == 0 else count + 1  # half true, half false claims
        noun = item.question.split("How many ", 1)[1].split(" are there?")[0]
        figure = i < QUESTIONS_PER_BENCHMARK  # the last row has no figure, as some rows of the image split
        rows.append({"category": "VD", "subcategory": "counting", "visual_input": "1" if figure else "0",
                     "set_id": str(i // 2), "figure_id": str(i % 2), "sample_note": "synthetic",
                     "question_id": "0", "question": f"Are there {asked} {noun} in the image?",
                     "gt_answer_details": f"There are {count} {noun}.", "gt_answer": "1" if asked == count else "0",
                     "filename": f"./hallusion_bench/VD/counting/{i}.png" if figure else None,
                     "image": item.cell(f"{i}.png") if figure else None})
    folder = os.path.join(out, "hallusionbench")
    _parquet(os.path.join(folder, "image-00000-of-00001.parquet"), rows)
    return folder


def _wemath(out: str, seed: int) -> str:
    rows = []
    for i in range(QUESTIONS_PER_BENCHMARK):
        item = _Item(seed, "wemath", i)
        rows.append({"ID": str(i + 1), "split": "testmini", "knowledge concept": "Counting",
                     "question": item.question, "option": "; ".join(f"{l}. {o}" for l, o in zip("ABCD", item.options)),
                     "answer": item.letter, "key": "1step", "question number": i + 1,
                     "knowledge concept description": "Count the shapes in a grid.",
                     "image_path": item.cell(f"{i + 1}.png")})
    path = os.path.join(out, "wemath", "testmini.parquet")
    _parquet(path, rows)
    return path


def _logicvista(out: str, seed: int) -> str:
    """jsonl + an images/ folder: the reader's path-based layout (paths relative to the jsonl file)."""
    folder = os.path.join(out, "logicvista")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    path = os.path.join(folder, "test.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(QUESTIONS_PER_BENCHMARK):
            item = _Item(seed, "logicvista", i)
            with open(os.path.join(folder, "images", f"{i}.png"), "wb") as img:
                img.write(item.png)
            question = item.question + "\n" + "\n".join(f"{l}. {o}" for l, o in zip("ABCD", item.options))
            fh.write(json.dumps({"id": f"tiny-logicvista-{i}", "question": question, "answer": item.letter,
                                 "image": f"images/{i}.png"}) + "\n")
    return path


def _chartqa(out: str, seed: int) -> str:
    rows = []
    for i in range(QUESTIONS_PER_BENCHMARK):
        item = _Item(seed, "chartqa", i, family="bars", level=1 + i % 2)  # tallest-bar colour, or a count of bars
        rows.append({"image": item.cell(f"{i}.png"), "query": item.question, "label": [item.answer],
                     "human_or_machine": i % 2})
    path = os.path.join(out, "chartqa", "test.parquet")
    _parquet(path, rows)
    return path


WRITERS = {"mathverse": _mathverse, "mathvista": _mathvista, "mmk12": _mmk12, "r1_onevision_bench": _r1_onevision_bench,
           "hallusionbench": _hallusionbench, "wemath": _wemath, "logicvista": _logicvista, "chartqa": _chartqa}


def write_tiny_suite(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """Write <out_dir>/eval_data/<benchmark>/... and <out_dir>/eval_suite.yaml; return the suite file's path.
    Deterministic for a seed; rewrites the files when called again."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    data_dir = os.path.join(out_dir, DATA_DIR)
    entries = {name: {"path": os.path.relpath(write(data_dir, seed), out_dir)} for name, write in WRITERS.items()}
    suite_path = os.path.join(out_dir, SUITE_FILE)
    with open(suite_path, "w", encoding="utf-8") as fh:
        fh.write("# Tiny synthetic suite written by `mssr make-tiny` (eval/tiny_suite.py): each benchmark's own file\n"
                 "# layout, synthetic questions. Paths are relative to this file; each reader is its entry's name.\n")
        yaml.safe_dump({"benchmarks": entries}, fh, sort_keys=False)
    return suite_path
