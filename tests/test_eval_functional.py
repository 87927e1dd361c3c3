"""`dylora-moe eval`: pass@k of a trained run on tasks with tests, --compare of the
mixture / each expert / uniform / base, per-sample JSONL, resume, and provenance."""
import json

import pytest
import torch
from trainrun import SMALL, explain, run

from dylora_moe.eval.functional import load_tasks, main as eval_main
from dylora_moe.eval.loading import load_run, weights_hash
from dylora_moe.train.config import load_recipe


@pytest.fixture(scope="module")
def specialised(tmp_path_factory):
    """A run whose expert 0 alone was trained, on the "numbers" family only: forced to
    expert 0 the model writes number functions; the base alone does not."""
    tmp = tmp_path_factory.mktemp("spec")
    recipe = tmp / "numbers.yaml"
    recipe.write_text(open(SMALL[1]).read().replace("    - {name: demo, family: strings}\n", ""))
    out = tmp / "run"
    args = ["--config", str(recipe)] + SMALL[2:] + ["--max_steps", "150", "--lora_dropout", "0.0", "--num_experts", "1",
                                                     "--learning_rate", "0.02", "--output_dir", str(out)]
    done = run("single", args, tmp)
    assert done.returncode == 0, explain(done)
    return out


def test_compare_scores_each_variant_and_records_what_it_scored(specialised, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [str(specialised), "--tasks", "demo", "--limit", "6", "--n", "2", "--k", "1,2", "--compare",
            "--max_new_tokens", "48", "--out", str(out), "--temperature", "0.5"]
    assert eval_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["functional"]["demo"]}
    assert set(rows) == {"mixture", "expert-0", "uniform", "base"}
    loaded = load_run(specialised)
    assert rows["mixture"]["weights_sha256"] == weights_hash(loaded.moe) == summary["weights_sha256"]
    assert rows["base"]["weights_sha256"] == "(base only)"
    assert rows["expert-0"]["pass@1"] > rows["base"]["pass@1"]  # the trained expert beats the bare base
    samples = [json.loads(l) for l in (out / "demo" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 6 * 2
    assert {s["error"] for s in samples if not s["passed"]} <= {"assertion", "exception", "timeout", "memory",
                                                                 "output_limit", "crashed"}
    by_variant = {}
    for s in samples:
        by_variant.setdefault(s["variant"], []).append(s["completion"])
    assert by_variant["expert-0"] != by_variant["base"]  # the rows really used different weights
    assert all(s["weights_sha256"] == loaded.weights_sha256 for s in samples)
    assert "loss" in summary and any(k.endswith("/validation") for k in summary["loss"])

    # resumable: a second run executes nothing new and reports the same numbers
    before = (out / "demo" / "samples.jsonl").read_text()
    assert eval_main(args) == 0
    assert (out / "demo" / "samples.jsonl").read_text() == before
    again = {r["variant"]: r for r in json.loads((out / "summary.json").read_text())["functional"]["demo"]}
    assert again == rows


def test_tasks_and_bad_arguments(specialised, capsys):
    humaneval = load_tasks("humaneval", None)
    assert len(humaneval) == 164 and "def has_close_elements" in humaneval[0].prompt
    program = humaneval[0].program("```python\n" + humaneval[0].problem["prompt"] +
                                   humaneval[0].problem["canonical_solution"] + "```")
    from dylora_moe.eval import run_program

    assert run_program(program).passed  # the canonical solution passes through our harness
    assert eval_main([str(specialised), "--tasks", "demo", "--n", "1", "--k", "5"]) == 2
    assert "every k must be in 1..n=1" in capsys.readouterr().err
    assert eval_main([str(specialised), "--tasks", "apps", "--no_loss"]) == 2
    assert "expected mbpp, humaneval or demo" in capsys.readouterr().err


def test_mbpp_tasks_default_to_the_official_test_split(shared_file):
    recipe = load_recipe(None, ["--data.sources", f"[{{name: mbpp, path: {shared_file('mbpp.jsonl')}}}]"])
    tasks = load_tasks("mbpp", recipe)
    assert len(tasks) == 500 and {int(t.id.split("/")[1]) for t in tasks} == set(range(11, 511))
    assert "Your code should pass these tests" in tasks[0].prompt
