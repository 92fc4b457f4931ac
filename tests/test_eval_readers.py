"""Benchmark readers on fixture files in each benchmark's published layout (column names and answer formats as on the
Hugging Face hub), built here: question/answer mapping per benchmark, images, bad rows counted, clear errors."""

from __future__ import annotations

import base64
import csv
import io
import json

import pyarrow as pa  # a requirement (requirements.txt): fail loudly, never skip, when it is missing
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mssr_megatron.data.records import DataFileError
from mssr_megatron.eval.benchmarks import BENCHMARK_READERS, read_benchmark


def png(size=(30, 20), colour="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def cell(data: bytes | None, path: str | None = "x.png") -> dict | None:
    """A `datasets` Image cell as HF writes it to parquet."""
    return None if data is None else {"bytes": data, "path": path}


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_all_published_layouts_are_registered():
    assert BENCHMARK_READERS.names() == sorted(["mathverse", "mathvista", "mmk12", "r1_onevision_bench",
                                                "hallusionbench", "wemath", "logicvista", "chartqa"])


def mathvista_row(pid, *, answer="2", question_type="free_form", choices=None, decoded=b"", image=None,
                  query="How many?"):
    return {"pid": pid, "question": "raw question", "image": image, "decoded_image": cell(png() if decoded == b""
                                                                                          else decoded),
            "choices": choices, "unit": None, "precision": None, "answer": answer, "question_type": question_type,
            "answer_type": "integer", "metadata": {"task": "figure question answering", "category": "math"},
            "query": query}


def test_mathvista_letters_image_fallback_and_bad_rows(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (12, 34), "blue").save(tmp_path / "images" / "2.png")
    rows = [
        mathvista_row("1", answer="7", question_type="multi_choice", choices=["3", "5", "7"]),
        mathvista_row("2", answer="2.5", decoded=None, image="images/2.png"),  # no decoded_image: the path column
        mathvista_row("3", answer="9", question_type="multi_choice", choices=["3", "5", "7"]),
        mathvista_row("4", decoded=None, image=None),
        mathvista_row("1"),
        mathvista_row("6", query=""),
        mathvista_row("7", decoded=b"not an image"),
        mathvista_row("8", decoded=None, image="images/none.png"),
        mathvista_row("9", answer=""),
    ]
    bench = read_benchmark("mathvista", write_parquet(tmp_path / "testmini.parquet", rows))
    assert [s.sample_id for s in bench.samples] == ["1", "2"]
    first, second = bench.samples
    # "7" is choices[2] -> option letter C
    assert (first.answer, first.answer_type, first.choices) == ("C", "choice", ["3", "5", "7"])
    assert first.question == "How many?" and first.meta["question"] == "raw question"
    assert first.sizes == [(30, 20)] and isinstance(first.images[0], bytes)
    assert (second.answer, second.answer_type, second.choices) == ("2.5", "free_form", [])
    assert second.images == [str(tmp_path / "images" / "2.png")] and second.sizes == [(12, 34)]
    assert bench.skipped == {"answer_not_in_choices": 1, "no_image": 1, "duplicate_id": 1, "empty_question": 1,
                             "bad_image": 1, "missing_image": 1, "empty_answer": 1}
    assert bench.skipped_examples["answer_not_in_choices"] == ["3"]
    assert first.key == "mathvista/1" and bench.name == "mathvista"


def hallusion_row(set_id, *, gt="1", image=b"", filename="./hb/VD/1.png", question="Is the bar red?"):
    return {"category": "VD", "subcategory": "chart", "visual_input": "1", "set_id": set_id, "figure_id": "0",
            "sample_note": "", "question_id": "0", "question": question, "gt_answer_details": "",
            "gt_answer": gt, "filename": filename, "image": cell(png() if image == b"" else image)}


def test_hallusionbench_yes_no_and_rows_without_figure(tmp_path):
    rows = [hallusion_row("0", gt="1"), hallusion_row("1", gt="0", question="Is it blue? Answer yes or no."),
            hallusion_row("2", image=None, filename=None), hallusion_row("3", gt="2")]
    bench = read_benchmark("hallusionbench", write_parquet(tmp_path / "image-00000-of-00001.parquet", rows),
                           name="hb")
    assert [(s.sample_id, s.answer, s.answer_type) for s in bench.samples] == [
        ("VD_chart_0_0_0", "yes", "yes_no"), ("VD_chart_1_0_0", "no", "yes_no")]
    assert bench.samples[0].question == "Is the bar red? Answer yes or no."
    assert bench.samples[1].question == "Is it blue? Answer yes or no."  # already asks for yes/no: unchanged
    assert bench.skipped == {"no_image": 1, "answer_not_yes_no": 1}
    assert bench.skipped_examples["no_image"] == ["VD_chart_2_0_0"]
    assert bench.samples[0].key == "hb/VD_chart_0_0_0"


def test_r1_onevision_tsv_base64_image_and_question_split(tmp_path):
    image = png((17, 9))
    path = tmp_path / "r1-onevision.tsv"
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["index", "image", "question", "answer", "category", "level"])
        writer.writerow([101, base64.b64encode(image).decode(), "Hint: think.\tIn steps.\nQuestion: What is x?",
                         "3", "Math", "College"])
        writer.writerow([102, base64.b64encode(image).decode(), "Question: Which?\n(A) 1 (B) 2", "B", "Math",
                         "College"])
        writer.writerow([103, "%%% not base64 %%%", "Question: Bad image?", "1", "Math", "College"])
    bench = read_benchmark("r1_onevision_bench", path)
    first, second = bench.samples
    assert (first.sample_id, first.question, first.answer, first.answer_type) == ("101", "What is x?", "3",
                                                                                  "free_form")
    assert first.images == [image] and first.sizes == [(17, 9)]
    assert first.meta == {"category": "Math", "level": "College"}
    assert (second.question, second.answer, second.answer_type) == ("Which?\n(A) 1 (B) 2", "B", "choice")
    assert bench.skipped == {"bad_image": 1}


def test_mathverse_query_cot_meta_and_choice_answers(tmp_path):
    def row(index, answer, question_type):
        return {"sample_index": index, "problem_index": "7", "problem_version": "Vision Only",
                "question": "short question", "image": cell(png()), "answer": answer, "question_type": question_type,
                "metadata": {"split": "testmini", "source": "GeoQA", "subject": "plane geometry",
                             "subfield": "angle"},
                "query_wo": "q without cot", "query_cot": f"Reason step by step. Question {index}",
                "question_for_eval": f"eval question {index}"}

    rows = [row("1", "60°", "free-form"), row("2", "B", "multi-choice"), row("3", "12", "multi-choice")]
    bench = read_benchmark("mathverse", write_parquet(tmp_path / "testmini.parquet", rows))
    first, second = bench.samples
    assert (first.question, first.answer, first.answer_type) == ("Reason step by step. Question 1", "60°",
                                                                 "free_form")
    assert first.meta["question_for_eval"] == "eval question 1" and first.meta["problem_version"] == "Vision Only"
    assert (second.answer, second.answer_type, second.choices) == ("B", "choice", [])
    assert bench.skipped == {"answer_not_in_choices": 1}  # a multi-choice row whose answer is no option letter


def test_wemath_options_written_into_question(tmp_path):
    def row(key, answer, option="A. 6cm; B. 8cm; C. 10cm; D. 12cm"):
        return {"ID": "12", "split": "testmini", "knowledge concept": "Area", "question": "How long is AB?",
                "option": option, "answer": answer, "key": key, "question number": 3,
                "knowledge concept description": "", "image_path": cell(png())}

    rows = [row("2steps_1", "B"), row("2steps_2", "E"), row("3steps_1", "C", option="6cm or 8cm")]
    bench = read_benchmark("wemath", write_parquet(tmp_path / "testmini.parquet", rows))
    first, unparsed = bench.samples
    assert first.sample_id == "12@2steps_1"
    assert first.question == "How long is AB?\nOptions: A. 6cm; B. 8cm; C. 10cm; D. 12cm"
    assert (first.answer, first.answer_type, first.choices) == ("B", "choice", ["6cm", "8cm", "10cm", "12cm"])
    assert unparsed.choices == [] and unparsed.answer == "C"  # options not in 'A. ...; B. ...' form: letter kept
    assert bench.skipped == {"answer_not_in_choices": 1}  # E with four options


def test_chartqa_first_label_ids_by_row_across_shards(tmp_path):
    folder = tmp_path / "chartqa"
    folder.mkdir()
    write_parquet(folder / "test-00000-of-00002.parquet", [
        {"image": cell(png()), "query": "Max value?", "label": ["42", "42.0"], "human_or_machine": 0},
        {"image": cell(png()), "query": "Empty label?", "label": [], "human_or_machine": 1}])
    write_parquet(folder / "test-00001-of-00002.parquet", [
        {"image": cell(png()), "query": "Which year?", "label": ["2019"], "human_or_machine": 1}])
    bench = read_benchmark("chartqa", folder)
    assert [(s.sample_id, s.answer, s.meta["human_or_machine"]) for s in bench.samples] == [
        ("chartqa_0", "42", "human"), ("chartqa_2", "2019", "machine")]
    assert bench.skipped == {"empty_answer": 1}


def test_mmk12_parquet_and_logicvista_jsonl_with_image_files(tmp_path):
    mmk = [{"id": "a-1", "subject": "math", "question": "Find x.", "answer": "$$35^{\\circ}$$", "image": cell(png())},
           {"id": "a-2", "subject": "physics", "question": "Pick one.", "answer": "C", "image": cell(png())}]
    bench = read_benchmark("mmk12", write_parquet(tmp_path / "test.parquet", mmk))
    assert [(s.answer, s.answer_type) for s in bench.samples] == [("$$35^{\\circ}$$", "free_form"), ("C", "choice")]
    assert bench.samples[1].meta == {"subject": "physics"}

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "images" / "1.png")
    with open(tmp_path / "test.jsonl", "w") as fh:
        fh.write(json.dumps({"id": "lv1", "question": "Which comes next? A. x B. y", "answer": "A",
                             "image": "images/1.png"}) + "\n")
        fh.write("{not json\n")
        fh.write(json.dumps({"id": "lv2", "question": "Q", "answer": "B"}) + "\n")  # no image column
    bench = read_benchmark("logicvista", tmp_path / "test.jsonl")
    assert [(s.sample_id, s.answer_type, s.images, s.sizes) for s in bench.samples] == [
        ("lv1", "choice", [str(tmp_path / "images" / "1.png")], [(8, 6)])]
    assert bench.skipped == {"bad_json": 1, "no_image_column": 1}


def test_limit_keeps_the_first_samples(tmp_path):
    rows = [mathvista_row(str(i)) for i in range(5)]
    bench = read_benchmark("mathvista", write_parquet(tmp_path / "t.parquet", rows), limit=2)
    assert [s.sample_id for s in bench.samples] == ["0", "1"]


def test_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(KeyError, match="did you mean 'mathvista'.*known: chartqa"):
        read_benchmark("mathvsta", tmp_path)
    with pytest.raises(DataFileError, match="no such file or folder .*missing.parquet"):
        read_benchmark("mathvista", tmp_path / "missing.parquet")
    chart = write_parquet(tmp_path / "chart.parquet", [{"image": cell(png()), "query": "q", "label": ["1"]}])
    with pytest.raises(ValueError, match=r"not in the 'mathvista' layout: no column\(s\) \['pid'.*reader"):
        read_benchmark("mathvista", chart)
    bad = write_parquet(tmp_path / "bad.parquet", [mathvista_row("1", decoded=None)])
    with pytest.raises(ValueError, match="no usable rows.*no_image=1"):
        read_benchmark("mathvista", bad)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataFileError, match="cannot tell the format"):
        read_benchmark("chartqa", tmp_path / "data.csv")
