"""Test programs: a completion plus the task's own tests, ready for the sandbox."""
from __future__ import annotations


def mbpp_program(completion: str, tests: list[str], setup: str = "") -> str:
    """MBPP: setup code, the candidate solution, then each `assert` of test_list."""
    parts = [setup.strip(), completion.strip(), *[t.strip() for t in tests]]
    return "\n".join(p for p in parts if p) + "\n"
