"""Dataset readers: Vision-R1-RL style jsonl / parquet files -> a list of validated `Record`s.

    train = read_records(cfg.data.train_path, cfg.data, "train")
    len(train), train[0].prompt_id, train.skipped        # {"missing_image": 3, "empty_answer": 1}

A row has a problem, an answer and one image or a list of images (column names from `DataConfig`). An image is
  - raw encoded bytes (parquet binary column),
  - a dict {"bytes": ..., "path": ...} (the Hugging Face `datasets` Image feature layout; bytes win when both are set),
  - a path, relative to the data file's folder unless absolute,
  - in jsonl only, where raw bytes cannot be written: a "data:image/...;base64," string or {"bytes": "<base64>"}.
Bad rows (a line that is not UTF-8 or not JSON, an undecodable or missing image, empty problem/answer, duplicate id)
are skipped, counted by reason with a few example ids, and summed up in one log line: one broken row in 10K must not
stop a run, but must not go unseen.

Every record gets a stable `prompt_id`, the key of the per-prompt Beta baseline, so it must survive restarts and
re-reading the file: the row's own `id` / `prompt_id` when present, else a sha1 of its content (problem, answer,
image bytes or the path as written in the file, so moving the dataset folder keeps the ids).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from mssr_megatron.data.images import ImageDecodeError, image_size

__all__ = ["Record", "RecordSet", "DataFileError", "read_records", "resolve_format"]

logger = logging.getLogger(__name__)

ID_KEYS = ("id", "prompt_id")
MAX_EXAMPLE_IDS = 5  # example ids kept per skip reason


class DataFileError(FileNotFoundError):
    """A data file is missing or has an unknown format; the message names the path and the config key."""


@dataclass
class Record:
    """One training/validation example. `images` holds encoded bytes or absolute paths (decoded lazily)."""

    prompt_id: str
    problem: str
    answer: str
    images: list[bytes | str]
    sizes: list[tuple[int, int]] = field(default_factory=list)
    """(width, height) of each image, read from the header at load (prompt-length checks need no decode)."""


@dataclass
class RecordSet:
    """The records of one split, plus what was skipped and why."""

    records: list[Record]
    path: str
    split: str
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def skip(self, reason: str, example_id: str) -> None:
        """Count one skipped row under `reason`, keeping the first few ids as examples."""
        count_skip(self.skipped, self.skipped_examples, reason, example_id)

    def summary(self) -> str:
        """One line: kept count, skipped counts by reason with example ids."""
        line = f"data {self.split}: {len(self.records)} records from {self.path}"
        if not self.skipped:
            return line + ", none skipped"
        parts = [
            f"{reason}={count} (e.g. {', '.join(self.skipped_examples.get(reason, []))})"
            for reason, count in sorted(self.skipped.items())
        ]
        return f"{line}, skipped {sum(self.skipped.values())}: " + "; ".join(parts)


def count_skip(skipped: dict[str, int], examples: dict[str, list[str]], reason: str, example_id: str) -> None:
    """Add one skipped row under `reason` to `skipped`, keeping the first MAX_EXAMPLE_IDS ids in `examples`."""
    skipped[reason] = skipped.get(reason, 0) + 1
    kept = examples.setdefault(reason, [])
    if len(kept) < MAX_EXAMPLE_IDS:
        kept.append(example_id)


def resolve_format(path: str, fmt: str = "auto") -> str:
    """'jsonl' or 'parquet': `fmt` itself, or from the extension when it is 'auto'."""
    if fmt in ("jsonl", "parquet"):
        return fmt
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    raise DataFileError(f"{path!r}: cannot tell the format from the extension; set data.format to jsonl or parquet")


def iter_jsonl(path: str) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(line number, row) per non-empty line, or (line number, why it is unusable: "not_utf8" / "bad_json"). Lines are
    decoded one at a time, so one undecodable line is skipped and counted rather than ending the whole read."""
    opener = open
    if path.endswith(".gz"):
        import gzip

        opener = gzip.open  # type: ignore[assignment]
    with opener(path, "rb") as fh:
        head = fh.read(4096).decode("utf-8", errors="replace").lstrip()
        fh.seek(0)
        if head.startswith("["):  # a .json file holding one array of rows rather than one row per line
            try:
                rows = json.loads(fh.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataFileError(f"{path}: cannot read it as one JSON array of rows ({exc})") from None
            yield from ((i, row if isinstance(row, dict) else "bad_json") for i, row in enumerate(rows))
            return
        for line_no, raw in enumerate(fh):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield line_no, "not_utf8"
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            yield line_no, row if isinstance(row, dict) else "bad_json"


def iter_parquet(path: str, columns: list[str] | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row index, row) per row; only `columns` that the file has (all columns when None)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in requirements.txt
        raise ImportError("reading parquet needs pyarrow: pip install pyarrow") from None
    file = pq.ParquetFile(path)
    present = None if columns is None else [c for c in columns if c in file.schema_arrow.names]  # images are large
    index = 0
    for batch in file.iter_batches(batch_size=256, columns=present):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def decode_base64_image(text: str) -> bytes:
    """A base64 string, optionally a data URI ("data:image/png;base64,...")."""
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ImageDecodeError("invalid base64 image data") from None


class MissingImage(ImageDecodeError):
    """An image path that names no file (counted as 'missing_image', apart from undecodable images)."""


def normalise_image(value: Any, base_dir: str) -> tuple[bytes | str, bytes | str]:
    """(image for the Record: bytes or absolute path, identity for hashing: bytes or the path as written)."""
    if isinstance(value, dict):  # HF datasets Image layout; in jsonl its bytes can only be base64 text
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str) and data:
            data = decode_base64_image(data)
        if data:
            return bytes(data), bytes(data)
        if not path:
            raise ImageDecodeError("image dict has neither bytes nor path")
        value = path
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), bytes(value)
    if isinstance(value, str) and value.startswith("data:"):
        data = decode_base64_image(value)
        return data, data
    if isinstance(value, str) and value:
        full = os.path.normpath(value if os.path.isabs(value) else os.path.join(base_dir, value))
        if not os.path.isfile(full):
            raise MissingImage(f"no such image file {full!r}")
        return full, value
    raise ImageDecodeError(f"unsupported image value of type {type(value).__name__}")


def cell_text(value: Any) -> str:
    """A cell as stripped text. Answers are often numbers in jsonl (3, 0.5): keep them as text; None means missing."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _content_id(problem: str, answer: str, identities: list[bytes | str]) -> str:
    h = hashlib.sha1()
    for part in (problem, answer):
        h.update(part.encode("utf-8") + b"\x00")
    for ident in identities:
        h.update(ident if isinstance(ident, bytes) else ident.encode("utf-8"))
        h.update(b"\x00")
    return "sha1-" + h.hexdigest()[:20]


def read_records(
    path: str | os.PathLike | None, cfg_data, split_name: str = "train", *, apply_val_size: bool = True
) -> RecordSet:
    """Read and validate one split. `split_name` ('train'/'val') names the config key in errors; for 'val',
    `data.val_size` keeps the first val_size good records (unless apply_val_size is False: `prompts.load_split`
    applies it after the prompt-length filter). Raises DataFileError for a missing file; never for a bad row."""
    key = f"data.{split_name}_path"
    if path is None:
        raise DataFileError(f"{key} is not set: give a jsonl or parquet file ({key}=/path/to/{split_name}.parquet)")
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise DataFileError(f"{key}: no such file {path!r} (set {key} to an existing jsonl or parquet file)")
    fmt = resolve_format(path, cfg_data.format)
    base_dir = os.path.dirname(path)
    image_key, problem_key, answer_key = cfg_data.image_key, cfg_data.problem_key, cfg_data.answer_key
    rows = (
        iter_jsonl(path)
        if fmt == "jsonl"
        else iter_parquet(path, [image_key, problem_key, answer_key, *ID_KEYS])
    )
    out = RecordSet(records=[], path=path, split=split_name)
    seen: set[str] = set()
    limit = cfg_data.val_size if split_name == "val" and apply_val_size else None
    for index, row in rows:
        if limit is not None and len(out.records) >= limit:
            break
        label = f"row {index}"
        if isinstance(row, str):  # the reader's reason for an unusable row
            out.skip(row, label)
            continue
        explicit = next((row[k] for k in ID_KEYS if row.get(k) not in (None, "")), None)
        label = str(explicit) if explicit is not None else label
        record = _make_record(row, explicit, label, base_dir, image_key, problem_key, answer_key, out)
        if record is None:
            continue
        if record.prompt_id in seen:
            # The same id twice would share one baseline and be drawn twice per epoch: keep the first.
            out.skip("duplicate_id", record.prompt_id)
            continue
        seen.add(record.prompt_id)
        out.records.append(record)
    if not out.records and out.skipped:
        # Every row bad is a configuration problem (wrong column names, wrong image folder), not bad data.
        raise ValueError(
            f"{key}: no usable rows; {out.summary()}. Check data.problem_key={problem_key!r}, "
            f"data.answer_key={answer_key!r}, data.image_key={image_key!r} and where the images are."
        )
    log = logger.warning if out.skipped else logger.info
    log(out.summary())
    return out


def _make_record(row, explicit, label, base_dir, image_key, problem_key, answer_key, out) -> Record | None:
    """One row -> Record, or None after counting why it was skipped."""
    problem, answer = cell_text(row.get(problem_key)), cell_text(row.get(answer_key))
    if not problem:
        out.skip("empty_problem", label)
        return None
    if not answer:
        out.skip("empty_answer", label)
        return None
    raw = row.get(image_key)
    if raw is None or (isinstance(raw, (list, tuple)) and not raw):
        out.skip("no_image", label)
        return None
    raw_list = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    images: list[bytes | str] = []
    identities: list[bytes | str] = []
    sizes: list[tuple[int, int]] = []
    for value in raw_list:
        try:
            image, ident = normalise_image(value, base_dir)
            sizes.append(image_size(image))
        except MissingImage:
            out.skip("missing_image", label)
            return None
        except ImageDecodeError:
            out.skip("bad_image", label)
            return None
        images.append(image)
        identities.append(ident)
    prompt_id = str(explicit) if explicit is not None else _content_id(problem, answer, identities)
    return Record(prompt_id=prompt_id, problem=problem, answer=answer, images=images, sizes=sizes)
