"""Suite files (keys, readers, paths, limits, errors) and the tiny synthetic suite `mssr make-tiny` writes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pyarrow as pa  # a requirement (requirements.txt): fail loudly, never skip, when it is missing
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mssr_megatron.data.images import decode_image
from mssr_megatron.data.records import DataFileError
from mssr_megatron.eval.suite import SuiteError, load_suite, read_suite
from mssr_megatron.eval.tiny_suite import write_tiny_suite


def chartqa_file(path, n: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (10, 10)).save(os.path.join(os.path.dirname(path), "c.png"))
    rows = [{"image": {"bytes": None, "path": "c.png"}, "query": f"q{i}", "label": [str(i)]} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_suite(tmp_path, text: str) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return str(path)


def test_load_suite_defaults_relative_paths_and_limits(tmp_path, caplog):
    chartqa_file(tmp_path / "bench" / "chartqa" / "test.parquet", 5)
    suite = load_suite(write_suite(tmp_path, (
        "benchmarks:\n"
        "  chartqa: {path: bench/chartqa/test.parquet}\n"
        "  charts_again: {reader: chartqa, path: bench/chartqa/test.parquet, limit: 2}\n")))
    assert suite.names == ["chartqa", "charts_again"]
    first, second = suite.entries
    assert (first.reader, first.path, first.limit) == ("chartqa", str(tmp_path / "bench/chartqa/test.parquet"), None)
    assert (second.reader, second.limit) == ("chartqa", 2)
    with caplog.at_level(logging.INFO, logger="mssr_megatron.eval.suite"):
        sets = read_suite(suite, limit=3)  # the smaller cap wins per entry
    assert [(s.name, len(s)) for s in sets] == [("chartqa", 3), ("charts_again", 2)]
    assert [s.samples[0].key for s in sets] == ["chartqa/chartqa_0", "charts_again/chartqa_0"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("eval chartqa (chartqa): 3 samples") and "none skipped" in lines[0]


@pytest.mark.parametrize("text, error, message", [
    ("benchmarks:\n  chartqa: {path: x.parquet, split: test}\n", SuiteError,
     r"benchmarks\.chartqa: unknown key\(s\) split \(allowed: reader, path, limit, image_root\)"),
    ("suites: {}\n", SuiteError, r"unknown key\(s\) suites \(allowed: benchmarks\)"),
    ("benchmarks:\n  hb: {path: x.parquet}\n", SuiteError,
     r"benchmarks\.hb: unknown benchmark reader 'hb'.*known: chartqa, hallusionbench.*set benchmarks\.hb\.reader"),
    ("benchmarks:\n  mathvista: {reader: mathvsta, path: x.parquet}\n", SuiteError, "did you mean 'mathvista'"),
    ("benchmarks:\n  chartqa: {path: nowhere/test.parquet}\n", DataFileError,
     r"benchmarks\.chartqa\.path: no such file or folder .*nowhere/test\.parquet.*relative to the suite file"),
    ("benchmarks:\n  chartqa: {reader: chartqa}\n", SuiteError, r"benchmarks\.chartqa: no path"),
    ("benchmarks:\n  chartqa: {path: c/test.parquet, limit: 0}\n", SuiteError, "limit must be a positive integer"),
    ("benchmarks: {}\n", SuiteError, "must map at least one name"),
    ("benchmarks: [\n", SuiteError, "not valid YAML"),
])
def test_suite_errors_are_one_line_naming_key_and_fix(tmp_path, text, error, message):
    chartqa_file(tmp_path / "c" / "test.parquet", 1)
    with pytest.raises(error, match=message) as info:
        load_suite(write_suite(tmp_path, text))
    assert "\n" not in str(info.value)


def test_missing_suite_file(tmp_path):
    with pytest.raises(DataFileError, match="eval.suite: no such suite file .*make-tiny"):
        load_suite(tmp_path / "absent.yaml")


def test_tiny_suite_reads_back_in_every_layout(tmp_path):
    suite_path = write_tiny_suite(tmp_path, seed=3)
    assert suite_path == str(tmp_path / "eval_suite.yaml")
    sets = read_suite(suite_path)
    # six questions per benchmark, as written; HallusionBench's seventh row has no figure and is skipped
    assert {s.name: len(s) for s in sets} == {name: 6 for name in (
        "mathverse", "mathvista", "mmk12", "r1_onevision_bench", "hallusionbench", "wemath", "logicvista", "chartqa")}
    assert {s.name: s.skipped for s in sets if s.skipped} == {"hallusionbench": {"no_image": 1}}
    by_name = {s.name: s for s in sets}
    assert {s.answer_type for s in by_name["hallusionbench"].samples} == {"yes_no"}
    assert {s.answer_type for s in by_name["wemath"].samples} == {"choice"}
    # every third MathVista question is multiple choice: its letter points at the option holding a count
    vista = by_name["mathvista"].samples
    assert [s.answer_type for s in vista] == ["free_form", "free_form", "choice"] * 2
    for s in vista[2::3]:
        assert s.choices["ABCD".index(s.answer)].isdigit()
    # the images are the synthetic level-1 scenes (84x84, data/synthetic.py) and decode
    for bench in sets:
        for sample in bench.samples[:2]:
            assert sample.sizes == [(84, 84)] and decode_image(sample.images[0]).size == (84, 84)
    # deterministic for a seed: a second write gives the same questions and answers
    again = read_suite(write_tiny_suite(tmp_path / "again", seed=3))
    assert [[(s.question, s.answer) for s in b.samples] for b in again] == \
        [[(s.question, s.answer) for s in b.samples] for b in sets]


def test_make_tiny_reuse_adds_the_eval_suite_to_an_older_manifest(tmp_path):
    from mssr_megatron.warmstart import TinySetup, make_tiny

    setup = TinySetup(out_dir=str(tmp_path))
    (tmp_path / "model").mkdir()
    older = {"settings": dataclasses.asdict(setup), "model_dir": str(tmp_path / "model"), "warm_start": []}
    (tmp_path / "make_tiny.json").write_text(json.dumps(older))
    manifest = make_tiny(setup)  # reuses the model; writes only the suite
    assert manifest["eval_suite"] == str(tmp_path / "eval_suite.yaml")
    assert json.loads((tmp_path / "make_tiny.json").read_text())["eval_suite"] == manifest["eval_suite"]
    assert len(load_suite(manifest["eval_suite"]).entries) == 8
