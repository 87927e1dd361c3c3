"""Programs whose verdict must not depend on the isolation mode, and a script that runs
them wherever it is started (under setpriv, or with no namespaces at all) and prints
what it found as JSON.

    python tests/sandbox_cases.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dylora_moe.eval import Limits, Program  # noqa: E402

RIGHT = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
LIMITS = Limits(timeout_s=2, memory_mb=512)

# name -> (program, the error it must get; "" = it passes)
CASES = {
    "right answer": (Program(RIGHT, TESTS), ""),
    "wrong answer": (Program("def add(a, b):\n    return a - b\n", TESTS), "assertion"),
    "right, then sys.exit(0)": (Program(RIGHT + "import sys\nsys.exit(0)\n", TESTS), "exit"),
    "wrong, then os._exit(0)": (Program("def add(a, b):\n    return 0\nimport os\nos._exit(0)\n", TESTS), "exit"),
    # the exit codes the sandbox itself uses for a timeout and for a broken sandbox
    "os._exit(124)": (Program("import os\nos._exit(124)\n"), "exit"),
    "os._exit(125)": (Program("import os\nos._exit(125)\n"), "exit"),
    "exception": (Program("def add(a, b):\n    return a + c\n", TESTS), "exception"),
    "infinite loop": (Program("while True:\n    pass\n"), "timeout"),
    "3 GiB": (Program("x = bytearray(3 * 2**30)\n"), "memory"),
    "setup after the solution": (Program("class Node:\n    def __init__(self, v):\n        self.v = v\n"
                                         "def value(n):\n    return n.v\n", "root = Node(3)\nassert value(root) == 3\n"), ""),
    "files in its own dir": (Program("open('a.txt', 'w').write('hi')\nassert open('a.txt').read() == 'hi'\n"), ""),
    "imports after dropping privileges": (Program("import socket, decimal, heapq, json\n"
                                                  "assert heapq.nsmallest(1, [3, 1]) == [1]\n"), ""),
}


def expected() -> dict:
    return {name: error for name, (_, error) in CASES.items()}


def outcomes(results) -> dict:
    return {name: r.error for name, r in zip(CASES, results)}


def main() -> None:
    from dylora_moe.eval import run_many
    from dylora_moe.eval.isolation import detect

    first = run_many([p for p, _ in CASES.values()], LIMITS)
    again = run_many([p for p, _ in CASES.values()], LIMITS)  # a second batch: no second warning
    print(json.dumps({"mode": detect().mode, "missing": list(detect().missing),
                      "outcomes": outcomes(first), "again": outcomes(again)}))


if __name__ == "__main__":
    main()
