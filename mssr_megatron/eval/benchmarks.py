"""Benchmark readers: one per published file layout, as users download the files from the Hugging Face hub.

    mv = read_benchmark("mathvista", "bench/mathvista/testmini.parquet")
    len(mv), mv.samples[0].answer, mv.skipped          # 1000, 'B', {}

A benchmark file is parquet (HF `datasets` export: an Image column is a {"bytes", "path"} cell), jsonl (images as
paths relative to the file, or base64) or, for R1-OneVision-Bench, the TSV the authors publish (base64 images);
`path` may also be a folder holding the shards of one split (data/testmini-00000-of-00001.parquet, ...).
Each reader turns one row into an EvalSample: the question as the authors pose it (evaluation/utils/data_loaders.py
of the MSSR repository is the reference for which columns they use), the gold answer normalised for rule grading
(option letter, yes/no, free form), and the benchmark's own fields in `meta`.
Bad rows (no or undecodable image, empty question or answer, a choice answer that is not one of the choices,
a duplicate id, a missing column) are skipped and counted by reason, as data/records.py does for training data.

Layouts (columns read; others are ignored):
  mathverse           AI4Math/MathVerse testmini: sample_index, query_cot, answer, question_type, image, ...
  mathvista           AI4Math/MathVista testmini: pid, query, answer, question_type, choices, decoded_image | image
  mmk12               FanqingM/MMK12 test: id, question, answer, image, subject
  r1_onevision_bench  Fancy-MLLM/R1-Onevision-Bench: index, image (base64), question ("... Question: <q>"), answer
  hallusionbench      lmms-lab/HallusionBench image split: set_id, figure_id, question_id, question, gt_answer
                      (1/0), filename, image
  wemath              We-Math/We-Math testmini: ID, key, question, option, answer, image_path
  logicvista          lscpku/LogicVista test: id, question, answer, image
  chartqa             HuggingFaceM4/ChartQA test: query, label (list; the first is the answer), image
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from tqdm import tqdm

from mssr_megatron.data.images import ImageDecodeError, image_size
from mssr_megatron.data.records import (
    DataFileError, MissingImage, cell_text, count_skip, decode_base64_image, iter_jsonl, iter_parquet,
    normalise_image,
)
from mssr_megatron.eval.types import AnswerType, BenchmarkSet, EvalSample
from mssr_megatron.registry import Registry

__all__ = ["BENCHMARK_READERS", "BenchmarkReader", "ParsedRow", "SkipRow", "read_benchmark", "register_benchmark",
           "benchmark_summary"]

logger = logging.getLogger(__name__)

DATA_EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl",
                   ".ndjson": "jsonl", ".jsonl.gz": "jsonl", ".tsv": "tsv"}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class SkipRow(Exception):
    """Raised by a reader for a row it cannot use; the message is the skip reason (e.g. 'answer_not_in_choices')."""

    def __init__(self, reason: str, sample_id: str | None = None):
        super().__init__(reason)
        self.sample_id = sample_id
        """The row's id when the reader knows it (shown as the example id of the skip)."""


@dataclass
class ParsedRow:
    """What a reader takes from one row; `read_benchmark` decodes the image cells and validates the rest."""

    sample_id: str
    question: str
    answer: str
    answer_type: AnswerType
    images: list[Any]
    """Raw image cells: bytes, {"bytes", "path"} dicts, paths (relative to the image root) or data URIs."""
    choices: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkReader:
    """One published layout: the columns every row must have, and row -> ParsedRow."""

    name: str
    required: tuple[str, ...]
    parse: Callable[[dict[str, Any], int], ParsedRow]
    """(row, row index in the file) -> ParsedRow; raises SkipRow for a row it cannot use."""


BENCHMARK_READERS: Registry[BenchmarkReader] = Registry("benchmark reader")


def register_benchmark(name: str, *, required: tuple[str, ...]):
    """Decorator: register `parse(row, index) -> ParsedRow` as the reader of layout `name`."""

    def wrap(parse):
        BENCHMARK_READERS.register(name)(BenchmarkReader(name, tuple(required), parse))
        return parse

    return wrap


# ------------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------------


def _format_of(path: str) -> str | None:
    lower = path.lower()
    return next((fmt for ext, fmt in DATA_EXTENSIONS.items() if lower.endswith(ext)), None)


def _data_files(path: str) -> list[str]:
    """The file itself, or the data files directly inside a folder (the shards of one split), sorted."""
    if os.path.isfile(path):
        return [path]
    files = sorted(os.path.join(path, n) for n in os.listdir(path) if _format_of(n) and not n.startswith("."))
    if not files:
        raise DataFileError(f"{path}: folder holds no .parquet/.jsonl/.tsv file; point the suite entry's path at the "
                            "benchmark's data file (or a folder of its shards)")
    return files


def _iter_tsv(path: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """Rows of a tab-separated file with a header line (base64 images make fields far longer than csv's default)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        for index, row in enumerate(csv.DictReader(fh, delimiter="\t")):
            yield index, row if None not in row else "bad_tsv_row"  # None key: more fields than the header


def _columns(path: str, fmt: str) -> list[str] | None:
    """Column names from the file header (parquet schema, TSV header); None for jsonl (rows may differ)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(pq.ParquetFile(path).schema_arrow.names)
    if fmt == "tsv":
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            return next(csv.reader(fh, delimiter="\t"), [])
    return None


def _rows(path: str, fmt: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    if fmt == "parquet":
        return iter_parquet(path)
    if fmt == "tsv":
        return _iter_tsv(path)
    return iter_jsonl(path)


# ------------------------------------------------------------------------------------------------------------------
# Reading and validation
# ------------------------------------------------------------------------------------------------------------------


def read_benchmark(reader: str, path: str | os.PathLike, *, name: str | None = None, limit: int | None = None,
                   image_root: str | None = None) -> BenchmarkSet:
    """Read one benchmark file (or folder of shards) with the layout `reader`. `name`: the suite entry name
    (default: the reader's); `limit`: keep at most this many samples, the first in file order; `image_root`: folder
    relative image paths are resolved against (default: the data file's folder). Raises KeyError for an unknown
    reader, DataFileError for a missing file or unknown format, ValueError when the file has none of the reader's
    columns or no usable row; never for one bad row."""
    layout = BENCHMARK_READERS.get(reader)
    name = name or reader
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise DataFileError(f"benchmark {name!r}: no such file or folder {path!r} (download the benchmark or fix the "
                            "suite entry's path)")
    out = BenchmarkSet(name=name, reader=reader, path=path)
    seen: set[str] = set()
    offset = 0  # row indices run on across the shards of a folder (ChartQA numbers its ids by row)
    for file in _data_files(path):
        fmt = _format_of(file)
        if fmt is None:
            raise DataFileError(f"benchmark {name!r}: cannot tell the format of {file!r}; use a .parquet, .jsonl "
                                "or .tsv file")
        columns = _columns(file, fmt)
        missing = [c for c in layout.required if columns is not None and c not in columns]
        if missing:
            raise ValueError(f"benchmark {name!r}: {file} is not in the {reader!r} layout: no column(s) {missing} "
                             f"(it has {columns}); set the suite entry's reader to the layout of this file")
        base_dir = os.path.abspath(image_root) if image_root else os.path.dirname(file)
        rows_in_file = 0
        rows = tqdm(_rows(file, fmt), desc=f"read {name}", unit="row", leave=False, disable=None)
        for index, row in rows:
            rows_in_file = index + 1
            if limit is not None and len(out.samples) >= limit:
                break
            sample = _sample(layout, row, offset + index, name, base_dir, out)
            if sample is None:
                continue
            if sample.sample_id in seen:
                count_skip(out.skipped, out.skipped_examples, "duplicate_id", sample.sample_id)
                continue
            seen.add(sample.sample_id)
            out.samples.append(sample)
        rows.close()
        offset += rows_in_file
    if not out.samples:
        raise ValueError(f"benchmark {name!r}: no usable rows; {benchmark_summary(out)}. Check that the reader "
                         f"{reader!r} matches the file and that relative image paths resolve (image_root)")
    return out


def _sample(layout: BenchmarkReader, row, index: int, name: str, base_dir: str, out: BenchmarkSet):
    """One row -> EvalSample, or None after counting why it was skipped."""
    label = f"row {index}"
    if isinstance(row, str):  # the file reader's reason for an unusable line
        count_skip(out.skipped, out.skipped_examples, row, label)
        return None
    absent = [c for c in layout.required if c not in row]
    try:
        if absent:
            raise SkipRow(f"no_{absent[0]}_column")
        parsed = layout.parse(row, index)
        label = parsed.sample_id or label
        _validate(parsed)
        images, sizes = [], []
        for cell in parsed.images:
            try:
                image, _ = normalise_image(cell, base_dir)
                sizes.append(image_size(image))
            except MissingImage:
                raise SkipRow("missing_image") from None
            except ImageDecodeError:
                raise SkipRow("bad_image") from None
            images.append(image)
    except SkipRow as skip:
        count_skip(out.skipped, out.skipped_examples, str(skip), skip.sample_id or label)
        return None
    return EvalSample(benchmark=name, sample_id=parsed.sample_id, question=parsed.question, answer=parsed.answer,
                      answer_type=parsed.answer_type, images=images, sizes=sizes, choices=list(parsed.choices),
                      meta=parsed.meta)


def _validate(parsed: ParsedRow) -> None:
    if not parsed.sample_id:
        raise SkipRow("empty_id")
    if not parsed.question:
        raise SkipRow("empty_question")
    if not parsed.answer:
        raise SkipRow("empty_answer")
    if not parsed.images or any(cell in (None, "", b"") for cell in parsed.images):
        raise SkipRow("no_image")
    if parsed.answer_type == "choice":
        letters = LETTERS[: len(parsed.choices)] if parsed.choices else LETTERS
        if len(parsed.answer) != 1 or parsed.answer not in letters:
            raise SkipRow("answer_not_in_choices")
    if parsed.answer_type == "yes_no" and parsed.answer not in ("yes", "no"):
        raise SkipRow("answer_not_yes_no")


def benchmark_summary(bench: BenchmarkSet) -> str:
    """One line: kept count, skipped counts by reason with example ids."""
    line = f"eval {bench.name} ({bench.reader}): {len(bench.samples)} samples from {bench.path}"
    if not bench.skipped:
        return line + ", none skipped"
    parts = [f"{reason}={count} (e.g. {', '.join(bench.skipped_examples.get(reason, []))})"
             for reason, count in sorted(bench.skipped.items())]
    return f"{line}, skipped {sum(bench.skipped.values())}: " + "; ".join(parts)


# ------------------------------------------------------------------------------------------------------------------
# Helpers the readers share
# ------------------------------------------------------------------------------------------------------------------


def _letter_or_free(answer: str) -> AnswerType:
    """'choice' for a single option letter (benchmarks whose options are written into the question), else free form."""
    return "choice" if re.fullmatch(r"[A-Z]", answer) else "free_form"


def _image_cell(row: dict[str, Any], *keys: str) -> Any:
    """The first usable image cell among `keys`: an Image cell with bytes or a path, else a non-empty path string."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, dict) and not (value.get("bytes") or value.get("path")):
            continue
        if value not in (None, "", b""):
            return value
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_OPTION = re.compile(r"(?:^|;\s*)([A-Z])\.\s*(.*?)(?=;\s*[A-Z]\.|$)", re.S)


def _lettered_options(text: str) -> list[str]:
    """'A. 6cm; B. 8cm; C. 10cm' -> ['6cm', '8cm', '10cm']; [] unless the letters run A, B, C, ... in order."""
    found = _OPTION.findall(text.strip())
    if len(found) < 2 or [letter for letter, _ in found] != list(LETTERS[: len(found)]):
        return []
    return [option.strip() for _, option in found]


# ------------------------------------------------------------------------------------------------------------------
# Readers, one per published layout
# ------------------------------------------------------------------------------------------------------------------


@register_benchmark("mathverse", required=("sample_index", "query_cot", "answer", "image"))
def mathverse(row: dict[str, Any], index: int) -> ParsedRow:
    """The question is query_cot, as the authors pose it; multi-choice rows have option letters as answers."""
    answer = cell_text(row.get("answer"))
    multi = cell_text(row.get("question_type")).lower().replace("_", "-") == "multi-choice"
    meta = {k: cell_text(row.get(k)) for k in ("problem_index", "problem_version", "question_type",
                                                "question_for_eval", "question")}
    return ParsedRow(cell_text(row["sample_index"]), cell_text(row["query_cot"]), answer,
                     "choice" if multi else "free_form", [_image_cell(row, "image")], meta=meta)


@register_benchmark("mathvista", required=("pid", "query", "answer", "question_type"))
def mathvista(row: dict[str, Any], index: int) -> ParsedRow:
    """Multiple choice: the answer text becomes its option letter (index in `choices`); the image is decoded_image,
    else the `image` path (relative to image_root: the folder images.zip was unpacked in)."""
    answer, question_type = cell_text(row.get("answer")), cell_text(row.get("question_type"))
    choices = [cell_text(c) for c in _as_list(row.get("choices"))]
    answer_type: AnswerType = "free_form"
    if question_type == "multi_choice":
        if answer not in choices:
            raise SkipRow("answer_not_in_choices", cell_text(row.get("pid")))
        answer, answer_type = LETTERS[choices.index(answer)], "choice"
    metadata = row.get("metadata") or {}
    meta = {"question_type": question_type, "answer_type": cell_text(row.get("answer_type")),
            "unit": cell_text(row.get("unit")), "precision": row.get("precision"),
            "task": cell_text(metadata.get("task")), "category": cell_text(metadata.get("category")),
            "question": cell_text(row.get("question"))}
    return ParsedRow(cell_text(row["pid"]), cell_text(row["query"]), answer, answer_type,
                     [_image_cell(row, "decoded_image", "image")], choices=choices if answer_type == "choice" else [],
                     meta=meta)


@register_benchmark("mmk12", required=("id", "question", "answer", "image"))
def mmk12(row: dict[str, Any], index: int) -> ParsedRow:
    answer = cell_text(row.get("answer"))
    return ParsedRow(cell_text(row["id"]), cell_text(row["question"]), answer, _letter_or_free(answer),
                     [_image_cell(row, "image")], meta={"subject": cell_text(row.get("subject"))})


@register_benchmark("r1_onevision_bench", required=("index", "image", "question", "answer"))
def r1_onevision_bench(row: dict[str, Any], index: int) -> ParsedRow:
    """The image is a bare base64 string; the question is the text after the last 'Question: ' (the authors' split)."""
    raw = row.get("image")
    image = raw
    if isinstance(raw, str) and raw and not raw.startswith("data:"):
        try:
            image = decode_base64_image(raw)
        except ImageDecodeError:
            raise SkipRow("bad_image") from None
    answer = cell_text(row.get("answer"))
    question = cell_text(row.get("question")).split("Question: ")[-1].strip()
    meta = {k: cell_text(row.get(k)) for k in ("category", "level")}
    return ParsedRow(cell_text(row["index"]), question, answer, _letter_or_free(answer), [image], meta=meta)


@register_benchmark("hallusionbench", required=("set_id", "figure_id", "question_id", "question", "gt_answer"))
def hallusionbench(row: dict[str, Any], index: int) -> ParsedRow:
    """gt_answer 1/0 -> yes/no. Rows without a figure (no filename/image) are skipped as 'no_image', as the authors
    drop them. The id joins category, subcategory, set, figure and question ids (set ids repeat across categories)."""
    parts = [cell_text(row.get(k)) for k in ("category", "subcategory", "set_id", "figure_id", "question_id")]
    sample_id = "_".join(p for p in parts if p)
    if not cell_text(row.get("filename")) and _image_cell(row, "image") is None:
        raise SkipRow("no_image", sample_id)
    answer = {"1": "yes", "0": "no"}.get(cell_text(row.get("gt_answer")), "")
    if not answer:
        raise SkipRow("answer_not_yes_no", sample_id)
    question = cell_text(row.get("question"))
    if question and "yes or no" not in question.lower():
        question += " Answer yes or no."
    meta = {k: cell_text(row.get(k)) for k in ("category", "subcategory", "visual_input", "filename",
                                                "gt_answer_details")}
    return ParsedRow(sample_id, question, answer, "yes_no", [_image_cell(row, "image", "filename")], meta=meta)


@register_benchmark("wemath", required=("ID", "key", "question", "option", "answer", "image_path"))
def wemath(row: dict[str, Any], index: int) -> ParsedRow:
    """The options ('A. ...; B. ...') are written after the question; the id is ID@key, as the authors make it."""
    option = cell_text(row.get("option"))
    question = cell_text(row.get("question"))
    meta = {k: cell_text(row.get(k)) for k in ("knowledge concept", "question number", "split")}
    return ParsedRow(f"{cell_text(row['ID'])}@{cell_text(row['key'])}", f"{question}\nOptions: {option}",
                     cell_text(row.get("answer")), "choice", [_image_cell(row, "image_path")],
                     choices=_lettered_options(option), meta=meta)


@register_benchmark("logicvista", required=("id", "question", "answer", "image"))
def logicvista(row: dict[str, Any], index: int) -> ParsedRow:
    answer = cell_text(row.get("answer"))
    return ParsedRow(cell_text(row["id"]), cell_text(row["question"]), answer, _letter_or_free(answer),
                     [_image_cell(row, "image")])


@register_benchmark("chartqa", required=("query", "label", "image"))
def chartqa(row: dict[str, Any], index: int) -> ParsedRow:
    """The answer is the first label; ids are chartqa_<row index> (the file has none), as the authors number them."""
    labels = _as_list(row.get("label"))
    source = row.get("human_or_machine")
    meta = {"human_or_machine": {0: "human", 1: "machine"}.get(source, cell_text(source))}
    return ParsedRow(f"chartqa_{index}", cell_text(row.get("query")), cell_text(labels[0]) if labels else "",
                     "free_form", [_image_cell(row, "image")], meta=meta)

