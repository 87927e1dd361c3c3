"""Test programs: a completion plus the task's own tests, ready for the sandbox."""
from __future__ import annotations


def mbpp_program(completion: str, tests: list[str], setup: str = "") -> str:
    """MBPP: setup code, the candidate solution, then each `assert` of test_list."""
    parts = [setup.strip(), completion.strip(), *[t.strip() for t in tests]]
    return "\n".join(p for p in parts if p) + "\n"


def humaneval_program(completion: str, problem: dict) -> str:
    """HumanEval: the completion (a whole function, as an instruction-tuned model writes
    it; the prompt's imports are kept), then the task's check() on its entry point."""
    imports = "\n".join(line for line in problem["prompt"].splitlines() if line.startswith(("import ", "from ")))
    return f"{imports}\n{completion.strip()}\n\n{problem['test']}\ncheck({problem['entry_point']})\n"


def extract_code(text: str) -> str:
    """The code in a completion: the first fenced block if there is one, else the text."""
    if "```" in text:
        block = text.split("```", 2)[1]
        first, _, rest = block.partition("\n")
        return rest if first.strip().isalpha() or not first.strip() else block
    return text
