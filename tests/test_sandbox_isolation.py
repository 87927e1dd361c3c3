"""Isolation modes: every mode gives the same verdicts; root without CAP_SYS_ADMIN and a
machine with no namespaces at all are simulated for real (setpriv, a seccomp filter);
and as root, nothing of a sample survives it, nor can it touch another sample or the host."""
import json
import os
import random
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import sandbox_cases
from no_namespaces import supported as seccomp_supported
from test_sandbox import processes_with

from dylora_moe.eval import Limits, run_many, run_program
from dylora_moe.eval.isolation import PROBE

CASES_SCRIPT = Path(__file__).with_name("sandbox_cases.py")
NO_NAMESPACES = Path(__file__).with_name("no_namespaces.py")
MODES = ["namespaces", "userns", "none"]


@lru_cache(maxsize=None)
def works(mode: str) -> bool:
    if mode == "namespaces" and os.geteuid() != 0:
        return False
    return run_program(PROBE, Limits(timeout_s=30, isolation=mode)).passed


def need(mode: str, uid_reaping: bool = False) -> None:
    if not works(mode):
        pytest.skip(f"isolation mode {mode} is not available here")
    if uid_reaping and mode == "none" and os.geteuid() != 0:
        pytest.skip("without namespaces, only root can give a sample a uid of its own to clean up by")


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_same_verdicts(mode):
    need(mode)
    programs = [p for p, _ in sandbox_cases.CASES.values()]
    limits = Limits(timeout_s=sandbox_cases.LIMITS.timeout_s, memory_mb=sandbox_cases.LIMITS.memory_mb, isolation=mode)
    results = run_many(programs, limits)
    assert sandbox_cases.outcomes(results) == sandbox_cases.expected()
    assert {r.isolation for r in results} == {mode}


def run_cases(prefix: list[str]) -> tuple[dict, str]:
    done = subprocess.run(prefix + [sys.executable, str(CASES_SCRIPT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_root_without_cap_sys_admin_runs_programs_in_a_user_namespace():
    """Docker's default capabilities: before, every program failed ("Permission denied")."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    if not works("userns"):
        pytest.skip("no user namespaces here")
    report, stderr = run_cases(["setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin"])
    assert report["mode"] == "userns" and report["missing"] == []
    assert report["outcomes"] == report["again"] == sandbox_cases.expected()
    assert "NOT isolated" not in stderr


def test_no_namespaces_at_all_gives_the_same_verdicts_and_says_so_once():
    """Docker's default seccomp profile: not even a user namespace can be made."""
    if not seccomp_supported():
        pytest.skip("the seccomp filter is written for Linux x86_64 / aarch64")
    report, stderr = run_cases([sys.executable, str(NO_NAMESPACES)])
    assert report["mode"] == "none"
    assert report["outcomes"] == report["again"] == sandbox_cases.expected()
    warnings = [line for line in stderr.splitlines() if "NOT isolated" in line]
    assert len(warnings) == 1, stderr[-3000:]
    assert "the network" in warnings[0] and "the filesystem" in warnings[0] and "'none'" in warnings[0]


def marker() -> str:
    return f"{random.randrange(100, 999)}.{random.randrange(10**6):06d}"


@pytest.mark.parametrize("mode", MODES)
def test_a_setsid_daemon_does_not_outlive_its_sample(mode):
    need(mode, uid_reaping=True)
    mark = marker()
    program = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        os.execv('/bin/sleep', ['sleep', '{mark}'])\n    os._exit(0)\ntime.sleep(0.5)\n"
               "print('daemon started')\n")
    result = run_program(program, Limits(timeout_s=10, isolation=mode))
    assert result.passed and "daemon started" in result.stdout
    assert processes_with(mark) == []


@pytest.mark.parametrize("mode", MODES)
def test_a_sample_cannot_signal_another_sample_or_the_host(mode):
    need(mode, uid_reaping=True)
    host = subprocess.Popen(["sleep", "60"])
    try:
        killer = ("import os, signal, time\nseen = set()\nend = time.time() + 2\nwhile time.time() < end:\n"
                  "    pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n    seen.update(pids)\n"
                  f"    for pid in pids + [{host.pid}]:\n        if pid != os.getpid():\n"
                  "            try:\n                os.kill(pid, signal.SIGKILL)\n            except OSError:\n"
                  "                pass\n    try:\n        os.kill(-1, signal.SIGKILL)\n    except OSError:\n"
                  "        pass\n    time.sleep(0.05)\nprint(len(seen))\n")
        victim = "import time\ntime.sleep(3)\nprint('still here')\n"
        attacker, target = run_many([killer, victim], Limits(timeout_s=15, isolation=mode), workers=2)
        assert target.passed and "still here" in target.stdout, target
        assert host.poll() is None  # the host process survived
        assert attacker.passed
        if mode != "none":
            assert int(attacker.stdout.strip()) <= 3  # it saw only its own PID namespace
    finally:
        host.kill()
        host.wait()


@pytest.mark.parametrize("mode", MODES)
def test_nothing_written_outside_its_dir_survives(mode):
    need(mode, uid_reaping=True)
    mark = "dylora-escape-" + marker()
    paths = [f"{d}/{mark}" for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock")] + [f"/{mark}"]
    program = (f"import os\nwrote = []\nfor path in {paths!r}:\n    try:\n        os.makedirs(path + '.d')\n"
               "        open(path, 'w').write('x')\n        wrote.append(path)\n    except OSError:\n        pass\n"
               "open('mine.txt', 'w').write('ok')\nprint(wrote)\n")
    result = run_program(program, Limits(timeout_s=10, isolation=mode))
    assert result.passed
    if mode != "none" or os.geteuid() == 0:
        assert "/tmp/" in result.stdout  # it could write there (its private /tmp, or the host's)
    leftovers = [p for p in paths for q in (p, p + ".d") if os.path.exists(q)]
    assert leftovers == []
