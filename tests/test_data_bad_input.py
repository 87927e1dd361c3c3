"""Bad rows are skipped, counted and named; bad files and configs are one-line errors."""
import json
import logging

import pytest

from dylora_moe.data import DataConfig, load_examples
from dylora_moe.data.config import SourceConfig


def good(i):
    return {"instruction": f"Write function number {i}.", "input": "", "output": f"def f{i}(): pass"}


def test_bad_jsonl_rows_are_skipped_counted_and_named(tmp_path, caplog):
    path = tmp_path / "mine.jsonl"
    lines = [json.dumps(good(i)).encode() for i in range(20)]
    lines[2] = json.dumps({"instruction": "no output"}).encode()                     # missing field
    lines[4] = json.dumps({"instruction": 7, "output": "x"}).encode()                 # non-string field
    lines[6] = json.dumps({"instruction": "empty", "output": "   "}).encode()         # empty output
    lines[8] = b'{"instruction": "broken", "output": '                                # invalid JSON
    lines[10] = b'{"instruction": "bad \xff\xfe bytes", "output": "x"}'               # undecodable bytes
    lines[12] = json.dumps(["not", "an", "object"]).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING):
        splits = load_examples(DataConfig(sources=[{"name": "jsonl", "path": str(path)}]))["jsonl"]
    assert sum(len(v) for v in splits.values()) == 14
    assert "skipped 6 bad row(s)" in caplog.text
    for reason in ("missing field 'output'", "field 'instruction' is int", "empty 'output'", "invalid JSON",
                   "undecodable bytes"):
        assert reason in caplog.text
    assert f"{path}:3: missing field" in caplog.text  # file:line of the first offenders


def test_undecodable_row_inside_a_json_array_is_skipped(tmp_path, caplog):
    path = tmp_path / "rows.json"
    body = json.dumps([good(i) for i in range(10)]).encode()
    body = body.replace(b"function number 3", b"function \xff number 3")
    path.write_bytes(body)
    splits = load_examples(DataConfig(sources=[{"name": "code_alpaca", "path": str(path)}]))["code_alpaca"]
    assert sum(len(v) for v in splits.values()) == 9
    assert f"{path}:[3]: undecodable bytes" in caplog.text


def test_file_with_no_usable_rows_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"instruction": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"empty\.jsonl: no usable rows"):
        load_examples(DataConfig(sources=[{"name": "jsonl", "path": str(path)}]))


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: data file not found"):
        load_examples(DataConfig(sources=[{"name": "mbpp", "path": str(tmp_path / "nope.jsonl")}]))


def test_bad_mbpp_rows_are_skipped(tmp_path, caplog):
    row = {"text": "Add.", "code": "def add(a, b): return a + b", "task_id": 1,
           "test_list": ["assert add(1, 2) == 3"], "test_setup_code": "", "challenge_test_list": []}
    rows = [dict(row, task_id=i, text=f"Add {i}.") for i in range(1, 11)]
    rows[1]["test_list"] = "assert 1"     # not a list
    rows[2]["task_id"] = "3"              # not an int
    rows[3]["code"] = ""                  # empty answer
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    splits = load_examples(DataConfig(sources=[{"name": "mbpp", "path": str(path)}]))["mbpp"]
    assert sum(len(v) for v in splits.values()) == 7
    assert "'test_list' must be a non-empty list" in caplog.text


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown source 'alpaca'; known sources are \['code_alpaca', 'mbpp', 'jsonl', 'demo'\]"):
        DataConfig(sources=[{"name": "alpaca"}])


@pytest.mark.parametrize("kwargs,field", [
    (dict(training_subset=0), "training_subset"), (dict(eval_subset=150), "eval_subset"),
    (dict(mbpp_split="paper"), "mbpp_split"), (dict(overlong="wrap"), "overlong"),
    (dict(max_seq_length=2), "max_seq_length"), (dict(stopping_strategy="never"), "stopping_strategy"),
])
def test_bad_data_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"data\.{field}="):
        DataConfig(sources=["demo"], **kwargs)


def test_source_config_errors():
    with pytest.raises(ValueError, match="needs a path"):
        SourceConfig("jsonl")
    with pytest.raises(ValueError, match="weight"):
        SourceConfig("demo", weight=0)
    with pytest.raises(ValueError, match="labels must be unique"):
        DataConfig(sources=["demo", "demo"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['file'\]"):
        DataConfig(sources=[{"name": "jsonl", "file": "x"}])
