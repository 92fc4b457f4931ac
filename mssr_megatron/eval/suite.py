"""A suite file: which benchmarks to evaluate, each with its reader (file layout) and local path.

    # eval_suite.yaml (paths relative to this file)
    benchmarks:
      mathvista: {path: mathvista/testmini.parquet}
      hb: {reader: hallusionbench, path: hallusionbench/image.parquet, limit: 100}

    suite = load_suite("eval_suite.yaml")       # checks keys, readers and that every path exists
    sets = read_suite(suite, limit=50)           # list[BenchmarkSet], one log line each

An entry's reader defaults to its name (so `mathvista:` needs only a path); a suite may read one layout twice under
two names. Errors name the suite file, the entry and the fix, in one line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields

import yaml

from mssr_megatron.data.records import DataFileError
from mssr_megatron.eval.benchmarks import BENCHMARK_READERS, benchmark_summary, read_benchmark
from mssr_megatron.eval.types import BenchmarkSet

__all__ = ["Suite", "SuiteEntry", "SuiteError", "load_suite", "read_suite"]

logger = logging.getLogger(__name__)

TOP_LEVEL_KEYS = ("benchmarks",)


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names the file, the key and the fix."""


@dataclass
class SuiteEntry:
    """One benchmark of a suite."""

    name: str
    """Entry name: the benchmark's name in results and metrics (eval/<name>/accuracy)."""
    reader: str
    """File layout, a key of benchmarks.BENCHMARK_READERS (default: the entry name)."""
    path: str
    """Absolute path of the data file or folder of shards (written relative to the suite file)."""
    limit: int | None = None
    """At most this many questions (the first in file order); null = all."""
    image_root: str | None = None
    """Absolute folder that relative image paths are resolved against; null = the data file's folder."""


ENTRY_KEYS = tuple(f.name for f in fields(SuiteEntry) if f.name != "name")


@dataclass
class Suite:
    """A parsed suite file."""

    path: str
    """Absolute path of the suite YAML."""
    entries: list[SuiteEntry] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]


def _resolve(base: str, value: str) -> str:
    value = os.path.expanduser(value)
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(base, value))


def _entry(suite_path: str, name, spec) -> SuiteEntry:
    where = f"{suite_path}: benchmarks.{name}"
    if spec is None or isinstance(spec, str):  # `name: path/to/file` shorthand
        spec = {"path": spec}
    if not isinstance(spec, dict):
        raise SuiteError(f"{where} must be a mapping like {{path: ..., reader: ...}}, not {type(spec).__name__}")
    unknown = sorted(set(spec) - set(ENTRY_KEYS))
    if unknown:
        raise SuiteError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (allowed: {', '.join(ENTRY_KEYS)})")
    reader = str(spec.get("reader") or name)
    if reader not in BENCHMARK_READERS:
        raise SuiteError(f"{where}: {BENCHMARK_READERS.unknown_message(reader)}; set benchmarks.{name}.reader")
    if not spec.get("path"):
        raise SuiteError(f"{where}: no path; give the benchmark's local file, e.g. path: {name}/test.parquet")
    base = os.path.dirname(suite_path)
    path = _resolve(base, str(spec["path"]))
    if not os.path.exists(path):
        raise DataFileError(f"{where}.path: no such file or folder {path!r} (download the benchmark there or fix "
                            "the path; relative paths are relative to the suite file)")
    limit = spec.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise SuiteError(f"{where}.limit must be a positive integer or null, not {limit!r}")
    image_root = _resolve(base, str(spec["image_root"])) if spec.get("image_root") else None
    if image_root is not None and not os.path.isdir(image_root):
        raise DataFileError(f"{where}.image_root: no such folder {image_root!r} (unpack the benchmark's images "
                            "there or fix the path)")
    return SuiteEntry(name=str(name), reader=reader, path=path, limit=limit, image_root=image_root)


def load_suite(path: str | os.PathLike) -> Suite:
    """Parse and check a suite YAML: known keys and readers, existing paths. Raises SuiteError / DataFileError
    (a FileNotFoundError) with one line naming the file, the key and the fix."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise DataFileError(f"eval.suite: no such suite file {path!r} (`mssr make-tiny` writes runs/tiny/"
                            "eval_suite.yaml; or write one: benchmarks: {mathvista: {path: ...}})")
    with open(path, encoding="utf-8") as fh:
        try:
            doc = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise SuiteError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict):
        raise SuiteError(f"{path}: expected a mapping with a 'benchmarks' key, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise SuiteError(f"{path}: unknown key(s) {', '.join(map(str, unknown))} "
                         f"(allowed: {', '.join(TOP_LEVEL_KEYS)})")
    benchmarks = doc.get("benchmarks")
    if not isinstance(benchmarks, dict) or not benchmarks:
        raise SuiteError(f"{path}: 'benchmarks' must map at least one name to {{path: ...}} "
                         f"(known readers: {', '.join(BENCHMARK_READERS.names())})")
    return Suite(path=path, entries=[_entry(path, name, spec) for name, spec in benchmarks.items()])


def read_suite(suite_or_path: Suite | str | os.PathLike, *, limit: int | None = None) -> list[BenchmarkSet]:
    """Read every benchmark of a suite, in file order. `limit` caps every entry (the smaller of it and the entry's
    own limit applies). Logs one line per benchmark: sample count and skipped rows by reason."""
    suite = suite_or_path if isinstance(suite_or_path, Suite) else load_suite(suite_or_path)
    sets = []
    for entry in suite.entries:
        caps = [c for c in (entry.limit, limit) if c is not None]
        bench = read_benchmark(entry.reader, entry.path, name=entry.name, limit=min(caps) if caps else None,
                               image_root=entry.image_root)
        (logger.warning if bench.skipped else logger.info)(benchmark_summary(bench))
        sets.append(bench)
    return sets
