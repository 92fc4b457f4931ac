"""Dataset readers: jsonl / parquet, the image layouts, stable ids, skipped rows, error messages."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil

import pyarrow as pa  # a requirement (requirements.txt): fail loudly, never skip, when it is missing
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mssr_megatron.config import DataConfig
from mssr_megatron.data.records import DataFileError, read_records


def png(colour=(200, 10, 10), size=(30, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30), "blue").save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (28, 56), "green").save(tmp_path / "imgs" / "b.png")
    return tmp_path


def write_jsonl(path, rows):
    with open(path, "w") as fh:
        for row in rows:
            fh.write(row if isinstance(row, str) else json.dumps(row))
            fh.write("\n")
    return str(path)


def test_jsonl_layouts_and_bad_rows(folder, caplog):
    rows = [
        {"problem": "p0", "answer": "1", "images": ["imgs/a.png"]},  # relative path in a list
        {"id": "x1", "problem": "p1", "answer": 2, "images": "imgs/b.png"},  # one path, numeric answer
        {"problem": "p2", "answer": "3", "images": [{"bytes": None, "path": "imgs/a.png"}, "imgs/b.png"]},
        {"prompt_id": 7, "problem": "p3", "answer": "4", "images": data_uri(png())},
        {"problem": "p4", "answer": "5", "images": [{"bytes": base64.b64encode(png()).decode(), "path": None}]},
        {"problem": "p5", "answer": "6", "images": [str(folder / "imgs" / "a.png")]},  # absolute path
        # bad rows
        {"id": "missing", "problem": "q", "answer": "1", "images": ["imgs/nope.png"]},
        {"id": "corrupt", "problem": "q", "answer": "1", "images": data_uri(b"not an image at all")},
        {"id": "truncated", "problem": "q", "answer": "1", "images": data_uri(png()[:40])},
        {"id": "noanswer", "problem": "q", "answer": "  ", "images": ["imgs/a.png"]},
        {"id": "noproblem", "problem": "", "answer": "1", "images": ["imgs/a.png"]},
        {"id": "noimage", "problem": "q", "answer": "1", "images": []},
        {"id": "x1", "problem": "dup", "answer": "1", "images": ["imgs/a.png"]},
        "{not json",
    ]
    path = write_jsonl(folder / "train.jsonl", rows)
    with caplog.at_level(logging.INFO, logger="mssr_megatron.data.records"):
        rs = read_records(path, DataConfig(), "train")
    assert [r.problem for r in rs] == ["p0", "p1", "p2", "p3", "p4", "p5"]
    assert rs.skipped == {"missing_image": 1, "bad_image": 2, "empty_answer": 1, "empty_problem": 1,
                          "no_image": 1, "duplicate_id": 1, "bad_json": 1}
    assert rs.skipped_examples["bad_image"] == ["corrupt", "truncated"]
    assert rs.skipped_examples["bad_json"] == ["row 13"]
    assert rs[1].prompt_id == "x1" and rs[1].answer == "2" and rs[3].prompt_id == "7"
    assert rs[0].images == [str(folder / "imgs" / "a.png")] and rs[0].sizes == [(40, 30)]
    assert rs[2].images == [str(folder / "imgs" / "a.png"), str(folder / "imgs" / "b.png")]
    assert rs[2].sizes == [(40, 30), (28, 56)]
    assert rs[3].images == [png()] and isinstance(rs[4].images[0], bytes)
    # one summary line, naming counts and example ids
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "missing_image=1 (e.g. missing)" in lines[0]


def test_a_line_that_is_not_utf8_is_skipped_and_counted_by_row(folder):
    good = [json.dumps({"id": f"u{i}", "problem": f"p{i}", "answer": "1", "images": ["imgs/a.png"]}) for i in range(3)]
    path = folder / "latin1.jsonl"
    path.write_bytes("\n".join(good[:2]).encode() + b"\n" + '{"id": "bad", "problem": "caf\u00e9"}'.encode("latin-1")
                     + b"\n" + good[2].encode() + b"\n")
    rs = read_records(str(path), DataConfig(), "train")
    assert [r.prompt_id for r in rs] == ["u0", "u1", "u2"]
    assert rs.skipped == {"not_utf8": 1} and rs.skipped_examples["not_utf8"] == ["row 2"]


def test_content_ids_stable_and_location_independent(folder, tmp_path_factory):
    rows = [{"problem": "p", "answer": "1", "images": ["imgs/a.png"]},
            {"problem": "p", "answer": "2", "images": ["imgs/a.png"]},
            {"problem": "p", "answer": "1", "images": data_uri(png())}]
    path = write_jsonl(folder / "d.jsonl", rows)
    ids = [r.prompt_id for r in read_records(path, DataConfig(), "train")]
    assert len(set(ids)) == 3 and all(i.startswith("sha1-") for i in ids)
    assert ids == [r.prompt_id for r in read_records(path, DataConfig(), "train")]
    moved = tmp_path_factory.mktemp("moved") / "copy"
    shutil.copytree(folder, moved)
    assert ids == [r.prompt_id for r in read_records(moved / "d.jsonl", DataConfig(), "train")]


def test_parquet_bytes_struct_list_and_path(folder):
    good, bad = png(), b"\xff\xd8\xff garbage jpeg"
    tables = {
        "bytes": pa.table({"problem": ["a", "b", "c"], "answer": ["1", "2", ""],
                           "images": pa.array([good, bad, good], pa.binary())}),
        "struct": pa.table({"problem": ["a", "b"], "answer": ["1", "2"],
                            "images": [{"bytes": good, "path": "x.png"}, {"bytes": None, "path": "imgs/b.png"}]}),
        "list": pa.table({"problem": ["a", "b"], "answer": ["1", "2"],
                          "images": [[{"bytes": good, "path": None}, {"bytes": None, "path": "imgs/a.png"}],
                                     [{"bytes": None, "path": "imgs/missing.png"}]]}),
        "path": pa.table({"id": ["r0", "r1"], "problem": ["a", "b"], "answer": ["1", "2"],
                          "images": ["imgs/a.png", "imgs/missing.png"]}),
    }
    results = {}
    for name, table in tables.items():
        pq.write_table(table, folder / f"{name}.parquet")
        results[name] = read_records(str(folder / f"{name}.parquet"), DataConfig(), "train")
    assert len(results["bytes"]) == 1 and results["bytes"].skipped == {"bad_image": 1, "empty_answer": 1}
    assert results["bytes"][0].images == [good] and results["bytes"][0].sizes == [(30, 20)]
    assert [r.images for r in results["struct"]] == [[good], [str(folder / "imgs" / "b.png")]]
    assert len(results["list"]) == 1 and len(results["list"][0].images) == 2
    assert results["list"].skipped == {"missing_image": 1}
    assert [r.prompt_id for r in results["path"]] == ["r0"] and results["path"].skipped_examples == {
        "missing_image": ["r1"]}


def test_custom_keys_format_override_and_val_size(folder):
    rows = [{"question": f"q{i}", "solution": str(i), "image": "imgs/a.png"} for i in range(5)]
    path = write_jsonl(folder / "data.txt", rows)
    cfg = DataConfig(problem_key="question", answer_key="solution", image_key="image", format="jsonl", val_size=3)
    assert len(read_records(path, cfg, "train")) == 5
    val = read_records(path, cfg, "val")
    assert [r.answer for r in val] == ["0", "1", "2"]


def test_json_array_and_all_rows_bad(folder):
    rows = [{"problem": "p", "answer": "1", "images": "imgs/a.png"}]
    (folder / "arr.json").write_text(json.dumps(rows))
    assert len(read_records(str(folder / "arr.json"), DataConfig(), "train")) == 1
    with pytest.raises(ValueError, match="no usable rows.*no_image=1.*data.image_key='pictures'"):
        read_records(str(folder / "arr.json"), DataConfig(image_key="pictures"), "train")


def test_missing_file_and_unknown_format_errors(folder):
    missing = folder / "nowhere" / "train.parquet"
    with pytest.raises(DataFileError) as err:
        read_records(str(missing), DataConfig(), "train")
    assert "data.train_path" in str(err.value) and str(missing) in str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DataFileError, match="data.val_path"):
        read_records(str(missing), DataConfig(), "val")
    with pytest.raises(DataFileError, match="data.train_path is not set"):
        read_records(None, DataConfig(), "train")
    (folder / "data.csv").write_text("x")
    with pytest.raises(DataFileError, match="data.format"):
        read_records(str(folder / "data.csv"), DataConfig(), "train")
