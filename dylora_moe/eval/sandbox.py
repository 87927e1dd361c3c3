"""Run untrusted (model-written) programs, each in its own sandboxed process tree.

A program passes only if its code and then every one of its tests ran to the end: the
runner inside the sandbox says so on a pipe, with a token it reads only after the last
test (_sandbox_runner.py); the exit code means nothing, so exit(), sys.exit(0),
os._exit(0), unittest.main() and the like all fail.

Every program gets: a wall-clock timeout, CPU / address-space / file-size / open-file /
process-count limits, a fresh working directory, an environment with nothing inherited
(no tokens or keys), output captured up to `max_output_bytes`, no way to gain privilege
(no_new_privs), and, as root, a uid of its own (slots.py), so concurrent programs
cannot signal each other. Isolation beyond that depends on what the OS allows
(isolation.py picks the strongest mode that works, once, and says what is missing):
  namespaces / userns: no network, its own PID namespace (it sees and can signal only its
      own processes; all of them die with the sample), every mount read-only except
      fresh tmpfs on /tmp, /var/tmp, /dev/shm and /run/lock (gone with the sample);
  none: no network or filesystem isolation; as root, every process of its uid is killed
      afterwards and its files in those world-writable dirs are removed.
Programs run through sandbox servers (_sandbox_server.py, one per worker, kept for the
life of this process), which fork a fresh process tree per program (_sandbox_child.py).
"""
from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import UserError
from .programs import Program
from .slots import slot_uid

SERVER = Path(__file__).with_name("_sandbox_server.py")
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
MODES = ("namespaces", "userns", "none")
# Where a program without a private filesystem can leave files (mode none, as root).
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
GRACE_S = 5.0  # beyond a program's own deadline (its supervisor's), before its server is killed from here
TIMEOUT, SETUP_FAILED = 124, 125
ERRORS = ("timeout", "memory", "output_limit", "assertion", "exception", "exit", "crashed", "sandbox")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 64
    max_output_bytes: int = 64 * 1024
    max_file_mb: int = 16
    tmpfs_mb: int = 64
    isolation: str | None = None  # one of MODES; None = the strongest this OS allows

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise UserError(f"timeout {self.timeout_s}: expected seconds > 0")
        if self.isolation is not None and self.isolation not in MODES:
            raise UserError(f"isolation {self.isolation!r}: expected one of {', '.join(MODES)}")


@dataclass
class Result:
    passed: bool
    error: str          # "" when passed; else one of ERRORS
    returncode: int | None  # the sandbox child's (see _sandbox_child.py), not the program's
    duration_s: float
    pid: int            # the sandbox server that ran it (_sandbox_server.py)
    stdout: str
    stderr: str
    isolation: str = ""  # the mode it ran in
    uid: int | None = None  # the slot's uid it ran as (None: this process's own)
    detail: str = ""     # the runner's account of a failure (a traceback), not trusted


def run_program(program: Program | str, limits: Limits = Limits()) -> Result:
    """A str is a program with no separate tests: it passes if it runs to its end."""
    return run_many([program], limits, workers=1)[0]


def run_many(programs: list, limits: Limits = Limits(), workers: int | None = None) -> list[Result]:
    """In parallel across cores: one sandbox server per worker (threads only wait)."""
    if not programs:
        return []
    mode = limits.isolation
    if mode is None:
        from .isolation import detect

        mode = detect().mode
    workers = max(1, min(workers or os.cpu_count() or 1, len(programs)))
    pool = _shared_servers()
    with ThreadPoolExecutor(max_workers=workers) as threads:
        return list(threads.map(lambda p: _run_one(pool, p, limits, mode), programs))


@lru_cache(maxsize=1)
def _shared_servers() -> "_Servers":
    """Servers stay up between calls (an eval calls once per batch); they end with this process."""
    pool = _Servers(interpreter()[0])
    atexit.register(pool.close)
    return pool


def _run_one(pool: "_Servers", program: Program | str, limits: Limits, mode: str) -> Result:
    if isinstance(program, str):
        program = Program(code=program)
    with slot_uid(needed=interpreter()[1]) as uid:
        workdir = _workdir(uid) if mode == "none" else ""
        try:
            return _run(pool, program, limits, mode, uid, workdir)
        finally:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)


@lru_cache(maxsize=1)
def interpreter() -> tuple[str, bool]:
    """(the Python that runs programs, whether they may get a uid of their own). A
    program imports from its interpreter's standard library after dropping to its uid,
    so as root that library must be readable by every user: ours if it is (a system or
    Docker Python), else the system's python3. Without one, programs keep root's uid
    (isolation.py says so)."""
    ours = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return ours, False
    for candidate in (ours, "/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3", path=CLEAN_ENV["PATH"])):
        if candidate and _usable_by_all(os.path.realpath(candidate)):
            return os.path.realpath(candidate), True
    return ours, False


def _usable_by_all(python: str) -> bool:
    if not _world_reachable(python, 0o005):
        return False
    try:
        stdlib = subprocess.run([python, "-I", "-S", "-c", "import os; print(os.path.dirname(os.__file__))"],
                                capture_output=True, text=True, timeout=30, env=CLEAN_ENV).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return bool(stdlib) and _world_reachable(stdlib, 0o005)


def _world_reachable(path: str, bits: int) -> bool:
    """Every directory above `path` searchable by others, and `path` itself with `bits` for others."""
    try:
        return all(os.stat(p).st_mode & 0o001 for p in Path(path).parents) and os.stat(path).st_mode & bits == bits
    except OSError:
        return False


def _config(limits: Limits, mode: str, uid: int | None, workdir: str) -> dict:
    """What the sandbox child needs of one job (_sandbox_child.py reads it)."""
    return {"mode": mode, "uid": uid, "gid": uid, "workdir": workdir, "timeout_s": limits.timeout_s,
            "env": CLEAN_ENV, "memory_bytes": limits.memory_mb * 2**20, "cpu_seconds": int(limits.timeout_s) + 1,
            "file_bytes": limits.max_file_mb * 2**20, "max_processes": limits.max_processes,
            "tmpfs_mb": limits.tmpfs_mb, "cleanup_dirs": list(WORLD_WRITABLE)}


def _run(pool: "_Servers", program: Program, limits: Limits, mode: str, uid: int | None, workdir: str) -> Result:
    request = {"config": _config(limits, mode, uid, workdir), "job": {"program": program.code, "tests": program.tests},
               "max_output": limits.max_output_bytes}
    start = time.monotonic()
    server = pool.get()
    try:
        reply = server.run(request, limits.timeout_s + GRACE_S)
    except _Overdue:
        reply = {"code": TIMEOUT, "passed": False, "verdict": "", "stdout": "", "stdout_size": 0, "stderr": ""}
        if mode == "none" and uid is not None:  # its supervisor died with the server: clean up from here
            subprocess.run([server.python, "-I", str(SERVER), "--reap", str(uid), *WORLD_WRITABLE], env=CLEAN_ENV,
                           timeout=60, check=False)
    finally:
        pool.put(server)
    duration = time.monotonic() - start
    code, verdict = reply["code"], reply["verdict"]
    error = "" if reply["passed"] else _classify(code, verdict, reply["stdout_size"], limits)
    detail = verdict.split("\n", 1)[1] if verdict.startswith("fail ") and "\n" in verdict else ""
    return Result(passed=reply["passed"], error=error, returncode=code, duration_s=duration, pid=server.pid,
                  stdout=reply["stdout"], stderr=reply["stderr"], isolation=mode, uid=uid, detail=detail)


class _Overdue(Exception):
    pass


class _Server:
    """One sandbox server process (_sandbox_server.py): a request line in, a reply line out."""

    def __init__(self, python: str):
        self.python = python
        self.proc = subprocess.Popen([python, "-I", str(SERVER), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=CLEAN_ENV, start_new_session=True)
        self.pid = self.proc.pid
        self._buffer = b""

    def run(self, request: dict, timeout_s: float) -> dict:
        try:
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            return json.loads(self._line(time.monotonic() + timeout_s))
        except (_Overdue, OSError, ValueError):
            self.kill()
            raise _Overdue() from None

    def _line(self, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise _Overdue()
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _Overdue()  # the server died
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        _kill_group(self.proc.pid)
        self.proc.wait()

    def close(self) -> None:
        try:
            self.proc.stdin.close()  # the server's loop ends at end of input
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc.stdout.close()


class _Servers:
    """Servers started on demand, one per concurrently running program; a killed one is replaced."""

    def __init__(self, python: str):
        self.python, self.idle, self.all, self.lock = python, [], [], threading.Lock()

    def get(self) -> _Server:
        with self.lock:
            while self.idle:
                server = self.idle.pop()
                if server.alive:
                    return server
                self.all.remove(server)
                server.close()
        server = _Server(self.python)
        with self.lock:
            self.all.append(server)
        return server

    def put(self, server: _Server) -> None:
        with self.lock:
            self.idle.append(server)

    def close(self) -> None:
        for server in self.all:
            server.close()


def _workdir(uid: int | None) -> str:
    path = tempfile.mkdtemp(prefix="dylora-sandbox-")
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # the child and every process still in its group
    except (ProcessLookupError, PermissionError):
        pass


def _classify(code: int | None, verdict: str, stdout_size: int, limits: Limits) -> str:
    if code == SETUP_FAILED:
        return "sandbox"
    if code == TIMEOUT or code == 128 + signal.SIGXCPU:
        return "timeout"
    if code == 128 + signal.SIGXFSZ or stdout_size >= limits.max_file_mb * 2**20:
        return "output_limit"
    if verdict.startswith("fail "):
        kind = verdict[5:].split("\n", 1)[0]
        return kind if kind in ERRORS else "exception"
    if code is not None and code > 128:
        return "crashed"
    return "exit"  # the runner ended without a verdict: the program left before its tests finished
