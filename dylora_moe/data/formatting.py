"""Prompt formats: text in, (prompt, answer) strings out. Nothing here tokenizes.

Every source becomes the same Example shape, so training, evaluation and generation all
see one format, and `prompt` is exactly what a user's request looks like at inference.
"""
from __future__ import annotations

from typing import Optional, TypedDict

# The template Code Alpaca was released with (Stanford Alpaca's), with and without input.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class Example(TypedDict):
    id: str            # stable within its source (row index or task_id)
    source: str        # the source label, carried to the batch
    prompt: str        # formatted prompt, ends where the answer starts
    answer: str        # the target text (EOS is added at tokenization)
    tests: list        # assert statements (MBPP, demo); [] when none
    setup: str         # code to run before the tests (MBPP test_setup_code)


def alpaca_prompt(instruction: str, input_text: Optional[str] = None) -> str:
    instruction, input_text = instruction.strip(), (input_text or "").strip()
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def instruction_example(row: dict, source: str, row_id: str) -> Example:
    return Example(id=row_id, source=source, prompt=alpaca_prompt(row["instruction"], row.get("input")),
                   answer=row["output"].strip(), tests=list(row.get("tests") or []), setup=row.get("setup") or "")


def mbpp_instruction(text: str, tests: list) -> str:
    """The task plus its tests: the tests fix the function's name and signature, which
    the problem text alone does not."""
    return f"{text.strip()}\nYour code should pass these tests:\n" + "\n".join(t.strip() for t in tests)


def mbpp_example(row: dict, source: str) -> Example:
    code = normalize_code(row["code"])
    return Example(id=str(row["task_id"]), source=source, prompt=alpaca_prompt(mbpp_instruction(row["text"], row["test_list"])),
                   answer=code, tests=list(row["test_list"]), setup=normalize_code(row.get("test_setup_code") or ""))


def normalize_code(code: str) -> str:
    """MBPP's reference code uses CRLF line ends and trailing spaces: train on clean text."""
    lines = code.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n")
