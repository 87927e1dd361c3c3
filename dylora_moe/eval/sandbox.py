"""Run untrusted (model-written) Python programs, each in its own sandboxed process.

Every program gets: a wall-clock timeout after which its whole process group is killed,
CPU / address-space / file-size / open-file / process-count limits, a fresh working
directory, an environment with nothing inherited (no tokens or keys), and its output
captured to at most `max_output_bytes`. Where the OS allows (running as root on Linux):
no network (a private, unconfigured network namespace), private empty /tmp, /var/tmp and
/dev/shm, and an unprivileged user (nobody), so it cannot write outside its directory.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 64
    max_output_bytes: int = 64 * 1024
    max_file_mb: int = 16
    isolate: bool | None = None  # None = whenever the OS allows it


@dataclass
class Result:
    passed: bool
    error: str          # "" when passed; else timeout | memory | output_limit | assertion | exception | crashed
    returncode: int | None
    duration_s: float
    pid: int            # the program's process (and process group) id
    stdout: str
    stderr: str


def run_program(source: str, limits: Limits = Limits()) -> Result:
    isolate = can_isolate() if limits.isolate is None else limits.isolate
    workdir = tempfile.mkdtemp(prefix="dylora-sandbox-")
    python, drop = interpreter()
    config = {"workdir": workdir, "isolate": isolate, "env": CLEAN_ENV, "python": python, "drop_to": drop,
              "memory_bytes": limits.memory_mb * 2**20, "cpu_seconds": int(limits.timeout_s) + 1,
              "file_bytes": limits.max_file_mb * 2**20, "max_processes": limits.max_processes}
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-I", str(CHILD), json.dumps(config)], stdin=subprocess.PIPE,
                                stdout=out, stderr=err, env=CLEAN_ENV, start_new_session=True)
        timed_out = False
        try:
            proc.communicate(source.encode("utf-8", errors="replace"), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)
            proc.wait()
        duration = time.monotonic() - start
        stdout, stdout_size = _read_capped(out, limits.max_output_bytes)
        stderr, _ = _read_capped(err, limits.max_output_bytes)
    shutil.rmtree(workdir, ignore_errors=True)
    error = _classify(proc.returncode, timed_out, stderr, stdout_size, limits)
    return Result(passed=not error, error=error, returncode=proc.returncode, duration_s=duration, pid=proc.pid,
                  stdout=stdout, stderr=stderr)


def run_many(sources: list[str], limits: Limits = Limits(), workers: int | None = None) -> list[Result]:
    """In parallel across cores (each program is its own process; threads only wait)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))


@lru_cache(maxsize=1)
def interpreter() -> tuple[str, int | None]:
    """(python to run programs with, uid to drop to or None). As root, programs run as
    `nobody`, which needs a Python every user may execute: ours if it is, else the
    system's python3 (programs only need the standard library)."""
    ours = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return ours, None
    for candidate in (ours, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate and _world_executable(os.path.realpath(candidate)):
            return os.path.realpath(candidate), 65534
    return ours, None  # no such Python: programs keep root's uid (still namespaced and limited)


def _world_executable(path: str) -> bool:
    parts = Path(path).parents
    return all(os.stat(p).st_mode & 0o001 for p in parts) and bool(os.stat(path).st_mode & 0o001)


@lru_cache(maxsize=1)
def can_isolate() -> bool:
    """Namespaces and mounts need root on Linux: probe once with a harmless program."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    try:
        return run_program("print('ok')", Limits(timeout_s=10, isolate=True)).stdout.strip() == "ok"
    except OSError:
        return False


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the program and every child it forked
    except (ProcessLookupError, PermissionError):
        pass


def _read_capped(f, cap: int) -> tuple[str, int]:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace"), size


def _classify(code, timed_out, stderr, stdout_size, limits) -> str:
    if timed_out or code == -signal.SIGXCPU:
        return "timeout"
    if code == 0:
        return ""
    if code == -signal.SIGXFSZ or stdout_size >= limits.max_file_mb * 2**20:
        return "output_limit"
    if "MemoryError" in stderr:
        return "memory"
    if "AssertionError" in stderr:
        return "assertion"
    if code is not None and code < 0:
        return "crashed"
    return "exception"
