"""The sandbox runs model-written code: it must pass what is correct, fail what is not,
and contain what is hostile. Plus pass@k against hand-computed values."""
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading

import pytest

from dylora_moe.eval import Limits, mbpp_program, pass_at_k, run_many, run_program
from dylora_moe.eval.sandbox import can_isolate

QUICK = Limits(timeout_s=5)


def mbpp_rows(shared_file):
    return [json.loads(line) for line in shared_file("mbpp.jsonl").read_text().splitlines() if line.strip()]


def plain_python_passes(program: str) -> bool:
    """Reference solutions are trusted code: run them as they are, outside the sandbox."""
    try:
        return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_reference_solutions_pass_and_wrong_ones_fail(shared_file):
    rows = mbpp_rows(shared_file)
    programs = [mbpp_program(r["code"], r["test_list"], r.get("test_setup_code", "")) for r in rows]
    plain = [plain_python_passes(p) for p in programs]
    sandboxed = run_many(programs, QUICK)
    passing_plain = {r["task_id"] for r, ok in zip(rows, plain) if ok}
    passing_sandboxed = {r["task_id"] for r, res in zip(rows, sandboxed) if res.passed}
    print(f"MBPP reference solutions: {len(passing_plain)}/{len(rows)} pass under plain Python, "
          f"{len(passing_sandboxed)} in the sandbox")
    assert len(passing_plain) >= 0.95 * len(rows)
    assert passing_sandboxed == passing_plain

    sample = random.Random(0).sample([r for r in rows if r["task_id"] in passing_plain], 60)
    wrong = []
    for r in sample:  # the tested function exists but returns something else
        name = re.match(r"\s*assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(", r["test_list"][0]).group(1)
        wrong.append(mbpp_program(f"def {name}(*args, **kwargs):\n    return 'wrong'", r["test_list"],
                                  r.get("test_setup_code", "")))
    assert not any(res.passed for res in run_many(wrong, QUICK))


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass\n", Limits(timeout_s=2))
    assert not result.passed and result.error == "timeout" and result.duration_s < 10


def test_fork_bomb_is_contained():
    program = ("import os, time\nfor _ in range(500):\n    if os.fork() == 0:\n        time.sleep(60)\n"
               "        os._exit(0)\nprint('all forked')\n")
    result = run_program(program, Limits(timeout_s=5, max_processes=32))
    assert not result.passed and "all forked" not in result.stdout
    assert _live_children_of(result) == []  # the whole process group was killed


def test_allocating_10_gib_fails_cleanly():
    result = run_program("x = bytearray(10 * 2**30)\nprint(len(x))\n", Limits(timeout_s=10, memory_mb=512))
    assert not result.passed and result.error == "memory"


def test_writing_outside_the_work_dir_leaves_the_host_untouched(tmp_path):
    target = tmp_path / "written-by-sandbox.txt"
    program = f"open({str(target)!r}, 'w').write('pwned')\nprint('wrote')\n"
    result = run_program(program, QUICK)
    assert not target.exists()
    if can_isolate():
        assert not result.passed  # as nobody, in a private mount namespace: nowhere to write
    home = run_program("import os\nopen('mine.txt', 'w').write('ok')\nprint(os.getcwd())\n", QUICK)
    assert home.passed and not (tmp_path / "mine.txt").exists()


def test_environment_secrets_are_not_inherited(monkeypatch):
    monkeypatch.setenv("DYLORA_TEST_SECRET", "hunter2-secret-value")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    result = run_program("import os\nprint(dict(os.environ))\n", QUICK)
    assert result.passed
    assert "hunter2" not in result.stdout and "hf_secret" not in result.stdout and "HF_TOKEN" not in result.stdout


def test_network_is_unreachable_where_the_os_allows():
    if not can_isolate():
        pytest.skip("no network namespace without root on Linux")
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


def test_results_classify_assertions_and_exceptions():
    assert run_program("assert 1 + 1 == 3\n", QUICK).error == "assertion"
    assert run_program("raise ValueError('x')\n", QUICK).error == "exception"
    ok = run_program("print(sum(range(10)))\n", QUICK)
    assert ok.passed and ok.error == "" and ok.stdout.strip() == "45"


def test_pass_at_k_against_hand_computed_values():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)            # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)         # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 3, 2) == 1.0                                  # n - c < k
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)


def _live_children_of(result, wait_s: float = 5.0) -> list[int]:
    """Processes still alive (not zombies) in the sandboxed program's process group."""
    import time

    deadline = time.time() + wait_s
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, pgrp = fields[0], int(fields[2])
            if pgrp == result.pid and state != "Z":
                alive.append(int(pid))
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)
