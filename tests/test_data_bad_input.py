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
    splits = load_examples(DataConfig(sources=[{"name": "mbpp", "path": str(path)}], mbpp_split="random"))["mbpp"]
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


def test_deeply_nested_and_oversized_rows_are_skipped_not_fatal(tmp_path, caplog):
    path = tmp_path / "hostile.jsonl"
    lines = [json.dumps(good(i)) for i in range(12)]
    lines[3] = "[" * 200_000 + "]" * 200_000                                   # RecursionError in json
    lines[5] = '{"instruction": "' + "x" * 2_000_000                           # 2 MB, and not even JSON
    lines[7] = json.dumps({**good(7), "tests": "assert f7() is None"})         # tests: not a list
    lines[8] = json.dumps({**good(8), "tests": None, "setup": None})           # nulls: usable
    lines[9] = json.dumps({**good(9), "setup": 5})                             # setup: not a string
    deep = {"instruction": "deep", "output": "x", "extra": None}
    node = deep
    for _ in range(900):  # parses, and is walked without recursion
        node["extra"] = {"extra": None}
        node = node["extra"]
    lines[10] = json.dumps(deep)
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        splits = load_examples(DataConfig(sources=[{"name": "jsonl", "path": str(path)}]))["jsonl"]
    assert sum(len(v) for v in splits.values()) == 8
    assert "skipped 4 bad row(s)" in caplog.text
    for reason in (f"{path}:4: nested too deeply", f"{path}:6: over data.max_row_bytes=1000000",
                   f"{path}:8: field 'tests' must be a list of strings", f"{path}:10: field 'setup' is int"):
        assert reason in caplog.text


def test_row_size_limit_is_a_setting_and_applies_to_json_arrays(tmp_path, caplog):
    path = tmp_path / "rows.json"
    rows = [good(i) for i in range(10)]
    rows[4]["output"] = "y" * 5000
    path.write_text(json.dumps(rows))
    cfg = DataConfig(sources=[{"name": "code_alpaca", "path": str(path)}], max_row_bytes=4096)
    splits = load_examples(cfg)["code_alpaca"]
    assert sum(len(v) for v in splits.values()) == 9
    assert f"{path}:[4]: over data.max_row_bytes=4096" in caplog.text
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"nested\.json: invalid JSON \(nested too deeply to parse\)"):
        load_examples(DataConfig(sources=[{"name": "jsonl", "path": str(nested)}]))


def test_no_training_examples_left_names_the_file_and_why(tmp_path):
    path = tmp_path / "dupes.jsonl"
    path.write_text("\n".join([json.dumps(good(0))] * 30) + "\n")
    with pytest.raises(ValueError) as info:
        load_examples(DataConfig(sources=[{"name": "jsonl", "path": str(path)}]))
    message = str(info.value)
    assert message.startswith("data: no training examples left: jsonl")
    assert f"({path}): 30 usable row(s), 29 exact duplicate prompt(s) removed, 1 distinct example(s)" in message
    assert "split 90/10 train/validation into 0 train, 1 validation" in message


def test_a_source_without_training_examples_is_named_when_others_have_some(tmp_path, caplog):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(good(0)) + "\n")
    examples = load_examples(DataConfig(sources=["demo", {"name": "jsonl", "path": str(path)}]))
    assert examples["jsonl"]["train"] == [] and examples["demo"]["train"]
    assert "source jsonl has no training examples" in caplog.text and "it is only evaluated" in caplog.text


def test_all_too_long_after_tokenizing_says_so(tmp_path):
    from dylora_moe.data import build_datasets, build_demo_tokenizer

    cfg = DataConfig(sources=[{"name": "demo", "family": "numbers"}], max_seq_length=8, overlong="drop")
    examples = load_examples(cfg)
    tokenizer = build_demo_tokenizer(ex["prompt"] for ex in examples["demo:numbers"]["train"])
    with pytest.raises(ValueError, match=r"no training examples left after tokenizing: demo:numbers: all \d+ train "
                                         r"example\(s\) are longer than data.max_seq_length=8 \(data.overlong='drop'"):
        build_datasets(cfg, tokenizer, examples)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_train_on_prompt_reaches_the_training_batches(packing, train_on_prompt, tmp_path):
    """Through build_loaders, as the loop builds them: prompt tokens are labelled exactly
    when data.train_on_prompt is on; evaluation batches score the answers only."""
    from dylora_moe.data import IGNORE_INDEX, build_datasets, build_demo_tokenizer
    from dylora_moe.train.build import build_loaders
    from dylora_moe.recipe import load_recipe

    cfg = load_recipe(None, ["--base_model", "tiny-random:gemma", "--tokenizer", "demo", "--sources", "[demo]",
                             "--demo_examples", "40", "--max_seq_length", "256", "--train_batch_size", "4",
                             "--packing", str(packing).lower(), "--train_on_prompt", str(train_on_prompt).lower()])
    examples = load_examples(cfg.data)
    tokenizer = build_demo_tokenizer(ex["prompt"] + ex["answer"] for s in examples.values() for ex in s["train"])
    train, evals = build_loaders(cfg, build_datasets(cfg.data, tokenizer, examples), tokenizer)
    batch = next(iter(train))
    prompt, labels = batch["prompt_mask"], batch["labels"]
    labelled_prompt = (labels[prompt] != IGNORE_INDEX).sum().item()
    if train_on_prompt:
        # every prompt token but each example's first (nothing before it predicts it)
        starts = (batch["segment_ids"] >= 0).logical_and(batch["position_ids"] == 0).sum() if packing \
            else labels.shape[0]
        assert labelled_prompt == prompt.sum().item() - (starts if packing else 0) > 0
    else:
        assert labelled_prompt == 0
    answers = (~prompt) & (batch["attention_mask"] == 1)
    assert (labels[answers] != IGNORE_INDEX).sum() > 0
    eval_batch = next(iter(next(iter(evals.values()))))
    assert (eval_batch["labels"][eval_batch["prompt_mask"]] == IGNORE_INDEX).all()
