"""Test programs: a completion and the task's own tests, as the sandbox runs them.

The sandbox runs `code`, then `tests`, in one namespace, and passes a program only when
the last test statement has completed (sandbox.py, _sandbox_runner.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Program:
    code: str         # the candidate: a completion, with whatever it needs before it
    tests: str = ""   # run after it, in the same namespace; "" = the code itself is the test


def mbpp_program(completion: str, tests: list[str], setup: str = "") -> Program:
    """MBPP: the solution, then test_setup_code (it builds inputs from the solution's own
    classes, e.g. tasks 367 and 927), then each `assert` of test_list."""
    checks = [setup.strip(), *[t.strip() for t in tests]]
    return Program(code=completion.strip() + "\n", tests="\n".join(c for c in checks if c) + "\n")


def humaneval_program(completion: str, problem: dict, prompt: str | None = None) -> Program:
    """HumanEval: the whole prompt (its imports and helper functions: check() of e.g.
    HumanEval/10, /32, /38, /50 calls them), then the completion, then check(entry_point).

    The completion may continue the prompt (the function's body, as a base model writes
    it) or write the whole entry-point function (as an instruction-tuned model does;
    helpers of its own included): then it follows the prompt and redefines it. `prompt`:
    the one the model continued, when it is not the problem's own (bigcode strips it)."""
    prompt = problem["prompt"] if prompt is None else prompt
    if defines_function(completion, problem["entry_point"]):
        code = prompt + "\n\n" + completion.strip("\n") + "\n"
    else:
        code = prompt + completion
    return Program(code=code, tests=f"{problem['test']}\ncheck({problem['entry_point']})\n")


def defines_function(code: str, name: str) -> bool:
    """Whether `code` has a top-level `def name(`."""
    return re.search(rf"^(async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def extract_code(text: str) -> str:
    """The code in a completion: the first fenced block if there is one, else the text."""
    if "```" in text:
        block = text.split("```", 2)[1]
        first, _, rest = block.partition("\n")
        return rest if first.strip().isalpha() or not first.strip() else block
    return text


def cut_at(text: str, stops) -> str:
    """`text` up to the first of the stop strings (generation may run past them)."""
    end = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            end = min(end, at)
    return text[:end]
