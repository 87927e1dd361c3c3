"""Sources, formats and splits, on the real MBPP / Code Alpaca files and generated data."""
import json
import math
import random

import pytest

from dylora_moe.data import DataConfig, alpaca_prompt, load_examples
from dylora_moe.data.demo_tasks import demo_rows
from dylora_moe.data.formatting import normalize_code


def split_counts(n, fractions):
    counts, start = [], 0
    for f in fractions[:-1]:
        counts.append(math.floor(n * f))
    return counts + [n - sum(counts)]


def no_leak(splits):
    train = {ex["prompt"] for ex in splits["train"]}
    for name, examples in splits.items():
        if name != "train":
            assert not train & {ex["prompt"] for ex in examples}, name


def test_mbpp_random_split_follows_70_10_20(shared_file):
    path = shared_file("mbpp.jsonl")
    splits = load_examples(DataConfig(sources=[{"name": "mbpp", "path": str(path)}], mbpp_split="random"))["mbpp"]
    n = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert n == 974
    assert [len(splits[s]) for s in ("train", "validation", "test")] == split_counts(974, [0.7, 0.1, 0.2])
    no_leak(splits)


def test_mbpp_official_split_by_task_id(shared_file):
    path = shared_file("mbpp.jsonl")
    splits = load_examples(DataConfig(sources=[{"name": "mbpp", "path": str(path)}], mbpp_split="official"))["mbpp"]
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [374, 90, 500]
    assert {int(ex["id"]) for ex in splits["test"]} == set(range(11, 511))
    assert min(int(ex["id"]) for ex in splits["train"]) == 601
    no_leak(splits)


def test_mbpp_targets_are_the_reference_code_and_prompts_carry_the_tests(shared_file):
    path = shared_file("mbpp.jsonl")
    rows = {r["task_id"]: r for r in map(json.loads, path.read_text().splitlines())}
    splits = load_examples(DataConfig(sources=[{"name": "mbpp", "path": str(path)}]))["mbpp"]
    for ex in splits["train"] + splits["test"]:
        row = rows[int(ex["id"])]
        assert normalize_code(row["code"]) in ex["answer"] and ex["answer"].strip()
        assert row["text"].strip() in ex["prompt"]
        assert all(t.strip() in ex["prompt"] for t in row["test_list"])
        assert ex["tests"] == row["test_list"] and ex["source"] == "mbpp"


def test_code_alpaca_90_10_without_leaks(shared_file, caplog):
    path = shared_file("code_alpaca_2k.json")
    rows = json.loads(path.read_text())
    usable = [r for r in rows if r["output"].strip() and r["instruction"].strip()]
    splits = load_examples(DataConfig(sources=[{"name": "code_alpaca", "path": str(path)}]))["code_alpaca"]
    n = len({alpaca_prompt(r["instruction"], r["input"]) for r in usable})
    assert [len(splits["train"]), len(splits["validation"])] == split_counts(n, [0.9, 0.1])
    no_leak(splits)
    if len(usable) < len(rows):  # the sample has rows with empty outputs: named in the log
        assert "empty 'output'" in caplog.text and "code_alpaca_2k.json:[" in caplog.text


def test_splits_are_stable_and_independent_of_row_order(tmp_path):
    rows = [{"instruction": f"task {i}", "input": "x" if i % 3 else "", "output": f"answer {i}"} for i in range(300)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(map(json.dumps, rows)))
    random.Random(0).shuffle(rows)
    b.write_text("\n".join(map(json.dumps, rows)))
    split = lambda p, seed=42: {s: sorted(e["prompt"] for e in v) for s, v in load_examples(
        DataConfig(sources=[{"name": "jsonl", "path": str(p)}], seed=seed))["jsonl"].items()}
    assert split(a) == split(b) == split(a)
    assert split(a, seed=1) != split(a)
    assert [len(v) for v in split(a).values()] == [270, 30]


def test_duplicates_are_removed_before_splitting(tmp_path):
    rows = [{"instruction": f"task {i % 50}", "output": f"answer {i}"} for i in range(200)]
    path = tmp_path / "dups.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    splits = load_examples(DataConfig(sources=[{"name": "jsonl", "path": str(path)}]))["jsonl"]
    assert len(splits["train"]) + len(splits["validation"]) == 50
    no_leak(splits)


def test_alpaca_template_with_and_without_input():
    with_input = alpaca_prompt("Add the numbers.", "1, 2")
    assert with_input.endswith("### Instruction:\nAdd the numbers.\n\n### Input:\n1, 2\n\n### Response:\n")
    assert "paired with an input" in with_input
    without = alpaca_prompt("Say hi.", "")
    assert without.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and "Input" not in without


def test_subsets_take_a_stable_percentage_of_each_split(shared_file):
    path = shared_file("mbpp.jsonl")
    full = load_examples(DataConfig(sources=[{"name": "mbpp", "path": str(path)}]))["mbpp"]
    cfg = DataConfig(sources=[{"name": "mbpp", "path": str(path)}], training_subset=10, eval_subset=50)
    part, again = load_examples(cfg)["mbpp"], load_examples(cfg)["mbpp"]
    assert len(part["train"]) == math.ceil(len(full["train"]) * 0.1)
    assert len(part["test"]) == math.ceil(len(full["test"]) * 0.5)
    assert [e["id"] for e in part["train"]] == [e["id"] for e in again["train"]]
    assert {e["id"] for e in part["train"]} <= {e["id"] for e in full["train"]}


@pytest.mark.parametrize("family", ["numbers", "strings"])
def test_demo_tasks_are_deterministic_and_their_solutions_pass(family):
    rows = demo_rows(family, 60, seed=3)
    assert rows == demo_rows(family, 60, seed=3) and rows != demo_rows(family, 60, seed=4)
    for row in rows:
        namespace = {}
        exec(row["output"], namespace)  # our own generated code, not model output
        for test in row["tests"]:
            exec(test, namespace)
        assert row["tests"][0] in row["instruction"]


def test_demo_families_look_different():
    numbers = load_examples(DataConfig(sources=[{"name": "demo", "family": "numbers"}]))["demo:numbers"]["train"]
    strings = load_examples(DataConfig(sources=[{"name": "demo", "family": "strings"}]))["demo:strings"]["train"]
    assert all("xs" in ex["answer"] for ex in numbers)
    assert all("(s)" in ex["answer"] for ex in strings)
    assert {ex["source"] for ex in numbers} == {"demo:numbers"}


def test_hub_paths_ask_for_the_documented_datasets(monkeypatch, shared_file):
    """No network here: a stand-in load_dataset checks what would be downloaded and
    serves the local copies, so the rest of the hub path runs for real."""
    import datasets

    alpaca = json.loads(shared_file("code_alpaca_2k.json").read_text())
    mbpp = [json.loads(line) for line in shared_file("mbpp.jsonl").read_text().splitlines()]
    asked = []

    def fake_load_dataset(repo, config=None, data_files=None, split=None):
        asked.append((repo, config, data_files, split))
        if repo == "sahil280114/codealpaca":
            return datasets.Dataset.from_list(alpaca)
        by_split = {"train": mbpp[600:], "test": mbpp[10:500], "validation": mbpp[500:600], "prompt": mbpp[:10]}
        return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in by_split.items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    examples = load_examples(DataConfig(sources=["code_alpaca", "mbpp"], mbpp_split="official"))
    assert asked == [("sahil280114/codealpaca", None, "data/code_alpaca_20k.json", "train"),
                     ("google-research-datasets/mbpp", "full", None, None)]
    assert len(examples["mbpp"]["test"]) == 500
    assert len(examples["code_alpaca"]["train"]) > 1500
