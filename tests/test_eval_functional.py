"""`dylora-moe eval`: pass@k of a trained run on tasks with tests, --compare of the
mixture / each expert / uniform / base, per-sample JSONL, resume only of samples made
with the same weights and settings, validated flags, and provenance."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from trainrun import ROOT, SMALL, explain, run

from dylora_moe.eval.command import load_tasks, main as eval_main
from dylora_moe.eval.loading import load_run, weights_hash
from dylora_moe.recipe import load_recipe


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


def samples_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "demo" / "samples.jsonl").read_text().splitlines()]


def test_compare_scores_each_variant_and_records_what_it_scored(specialised, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [str(specialised), "--tasks", "demo", "--limit", "6", "--n", "2", "--k", "1,2", "--compare",
            "--max_new_tokens", "48", "--out", str(out), "--temperature", "0.5", "--batch_size", "4"]
    assert eval_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["functional"]["demo"]}
    assert set(rows) == {"mixture", "expert-0", "uniform", "base"}
    loaded = load_run(specialised)
    assert rows["mixture"]["weights_sha256"] == weights_hash(loaded.moe) == summary["weights_sha256"]
    assert rows["base"]["weights_sha256"] == "(base only)"
    assert rows["expert-0"]["pass@1"] > rows["base"]["pass@1"]  # the trained expert beats the bare base
    assert summary["prompt_format"] == {"demo": "instruct"} and summary["decoding"]["temperature"] == 0.5
    assert summary["sandbox"]["mode"] in ("namespaces", "userns", "none")
    samples = samples_of(out)
    assert len(samples) == 4 * 6 * 2
    assert {s["error"] for s in samples if not s["passed"]} <= {"assertion", "exception", "timeout", "memory",
                                                                 "output_limit", "crashed", "exit"}
    assert {s["prompt_format"] for s in samples} == {"instruct"} and len({s["settings"] for s in samples}) == 1
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


def test_samples_of_other_weights_or_settings_are_not_reused(specialised, tmp_path, capsys):
    out = tmp_path / "eval"
    base = [str(specialised), "--tasks", "demo", "--limit", "3", "--n", "2", "--temperature", "0.5",
            "--max_new_tokens", "32", "--no_loss", "--out", str(out)]
    # a timeout (almost) no program can meet: samples fail...
    assert eval_main(base + ["--timeout", "0.001"]) == 0
    first = samples_of(out)
    assert "timeout" in {s["error"] for s in first}
    # ...and that does not stick: with a sane timeout every one of them runs again
    assert eval_main(base + ["--timeout", "10"]) == 0
    fresh = samples_of(out)
    assert len(fresh) == 6 and "timeout" not in {s["error"] for s in fresh}
    assert {s["settings"] for s in fresh}.isdisjoint({s["settings"] for s in first})
    assert len((out / "demo" / "samples.stale.jsonl").read_text().splitlines()) == 6
    assert "moved to" in capsys.readouterr().err
    # other weights (a copy of the run, one expert tensor changed): nothing reused, the new hash recorded
    other = tmp_path / "other"
    shutil.copytree(specialised / "final", other)
    shutil.copytree(specialised / "base_model", tmp_path / "base_model")
    tensors = load_file(other / "experts" / "experts.safetensors")
    name = next(k for k in tensors if k.endswith("lora_B"))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, other / "experts" / "experts.safetensors")
    assert eval_main([str(other)] + base[1:] + ["--timeout", "10"]) == 0
    renewed = samples_of(out)
    new_hash = load_run(other).weights_sha256
    assert new_hash != load_run(specialised).weights_sha256
    assert len(renewed) == 6 and {s["weights_sha256"] for s in renewed} == {new_hash}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["functional"]["demo"][0]["weights_sha256"] == new_hash
    # other decoding settings, another prompt format or task set: other keys as well
    keys = {s["settings"] for s in renewed}
    assert eval_main([str(other)] + base[1:] + ["--timeout", "10", "--top_p", "0.5"]) == 0
    assert {s["settings"] for s in samples_of(out)}.isdisjoint(keys)


BAD_FLAGS = [
    (["--timeout", "-1"], "--timeout -1.0: expected seconds > 0"),
    (["--timeout", "0"], "--timeout 0.0: expected seconds > 0"),
    (["--temperature", "-0.5"], "--temperature -0.5: expected >= 0"),
    (["--top_p", "0"], "--top_p 0.0: expected 0 < top_p <= 1"),
    (["--top_p", "1.5"], "--top_p 1.5: expected 0 < top_p <= 1"),
    (["--limit", "0"], "--limit 0: expected an integer >= 1"),
    (["--n", "0"], "--n 0: expected an integer >= 1"),
    (["--n", "1", "--k", "5"], "--k 5: every k must be in 1..n=1"),
    (["--k", "one"], "--k one: expected comma-separated integers"),
    (["--max_new_tokens", "0"], "--max_new_tokens 0: expected an integer >= 1"),
    (["--batch_size", "0"], "--batch_size 0: expected an integer >= 1"),
    (["--tasks", "apps"], "--tasks 'apps': expected mbpp, humaneval or demo"),
    (["--tasks", "humaneval", "--prompt_format", "3shot"], "--prompt_format 3shot: not available for humaneval"),
    (["--tasks", "mbpp", "--prompt_format", "humaneval=bigcode"], "'humaneval' is not in --tasks"),
    (["--tasks", "humaneval", "--prompt_format", "raw"], "--prompt_format raw: not available for humaneval"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_get_one_line_errors_before_any_model_is_loaded(flags, message, tmp_path, capsys):
    assert eval_main([str(tmp_path / "no-such-run"), "--tasks", "demo", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "no-such-run").exists()


def test_tasks_and_prompt_formats(specialised, capsys):
    humaneval = load_tasks("humaneval", None)
    assert len(humaneval) == 164 and "def has_close_elements" in humaneval[0].prompt
    program = humaneval[0].program("```python\n" + humaneval[0].problem["prompt"] +
                                   humaneval[0].problem["canonical_solution"] + "```")
    from dylora_moe.eval import run_program

    assert run_program(program).passed  # the canonical solution passes through our harness
    bigcode = load_tasks("humaneval", None, 2, "bigcode")
    assert [t.prompt for t in bigcode] == [t.problem["prompt"].strip() for t in humaneval[:2]]
    assert bigcode[0].format == "bigcode" and not bigcode[0].prompt.endswith("\n")


def test_mbpp_tasks_default_to_the_official_test_split(shared_file):
    recipe = load_recipe(None, ["--data.sources", f"[{{name: mbpp, path: {shared_file('mbpp.jsonl')}}}]"])
    tasks = load_tasks("mbpp", recipe)
    assert len(tasks) == 500 and {int(t.id.split("/")[1]) for t in tasks} == set(range(11, 511))
    assert "Your code should pass these tests" in tasks[0].prompt


def test_bench_measures_one_at_a_time_and_batched_generation(specialised, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_eval.py"), str(specialised), "--limit", "2",
                    "--n", "2", "--max_new_tokens", "16", "--out", str(out)], check=True, cwd=ROOT,
                   capture_output=True, text=True)
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["generation"]] == ["mixture", "base"]
    assert all(r["one_at_a_time_samples_per_s"] > 0 and r["batched_samples_per_s"] > 0 for r in report["generation"])
    assert report["execution"]["programs"] == 2 * 2 * 2 and report["execution"]["sandbox_programs_per_s"] > 0


def test_mbpp_pass_at_k_of_a_run_trained_on_the_random_split_is_flagged_contaminated():
    from dylora_moe.eval.command import contamination_warnings
    from dylora_moe.recipe import load_recipe

    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "codegemma-2b.yaml")
    clean = load_recipe(recipe, [])
    assert clean.data.mbpp_split == "official" and contamination_warnings(clean, ["mbpp"]) == []
    mixed = load_recipe(recipe, ["--mbpp_split", "random"])
    (warning,) = contamination_warnings(mixed, ["mbpp", "humaneval"])
    assert "mbpp_split='random'" in warning and "contaminated" in warning
    assert contamination_warnings(mixed, ["humaneval"]) == []
