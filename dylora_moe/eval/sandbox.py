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
"""
from __future__ import annotations

import json
import os
import secrets
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

from .programs import Program
from .slots import slot_uid

CHILD = Path(__file__).with_name("_sandbox_child.py")
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
MODES = ("namespaces", "userns", "none")
# Where a program without a private filesystem can leave files (mode none, as root).
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
GRACE_S = 5.0  # beyond the child's own deadline, before this process kills it itself
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
            raise ValueError(f"timeout {self.timeout_s}: expected seconds > 0")
        if self.isolation is not None and self.isolation not in MODES:
            raise ValueError(f"isolation {self.isolation!r}: expected one of {', '.join(MODES)}")


@dataclass
class Result:
    passed: bool
    error: str          # "" when passed; else one of ERRORS
    returncode: int | None  # the sandbox child's (see _sandbox_child.py), not the program's
    duration_s: float
    pid: int            # the sandbox child's process (and process group) id
    stdout: str
    stderr: str
    isolation: str = ""  # the mode it ran in
    uid: int | None = None  # the slot's uid it ran as (None: this process's own)
    detail: str = ""     # the runner's account of a failure (a traceback), not trusted


def run_program(program: Program | str, limits: Limits = Limits()) -> Result:
    """A str is a program with no separate tests: it passes if it runs to its end."""
    if isinstance(program, str):
        program = Program(code=program)
    mode = limits.isolation
    if mode is None:
        from .isolation import detect

        mode = detect().mode
    python, own_uid = interpreter()
    with slot_uid(needed=own_uid) as uid:
        workdir = _workdir(uid) if mode == "none" else ""
        try:
            return _run(program, limits, mode, uid, workdir, python)
        finally:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)


def run_many(programs: list, limits: Limits = Limits(), workers: int | None = None) -> list[Result]:
    """In parallel across cores (each program is its own process; threads only wait)."""
    if limits.isolation is None and programs:
        from .isolation import detect

        detect()  # probe once, before the threads start
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))


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


def _run(program: Program, limits: Limits, mode: str, uid: int | None, workdir: str, python: str) -> Result:
    token = secrets.token_hex(32).encode()
    token_r, token_w = os.pipe()
    os.write(token_w, token)
    os.close(token_w)
    verdict_r, verdict_w = os.pipe()
    config = {"mode": mode, "uid": uid, "gid": uid, "workdir": workdir, "timeout_s": limits.timeout_s,
              "env": CLEAN_ENV, "memory_bytes": limits.memory_mb * 2**20, "cpu_seconds": int(limits.timeout_s) + 1,
              "file_bytes": limits.max_file_mb * 2**20, "max_processes": limits.max_processes,
              "tmpfs_mb": limits.tmpfs_mb, "cleanup_dirs": list(WORLD_WRITABLE),
              "verdict_fd": verdict_w, "token_fd": token_r}
    job = json.dumps({"program": program.code, "tests": program.tests}).encode()
    start = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen([python, "-I", str(CHILD), json.dumps(config)], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, env=CLEAN_ENV, start_new_session=True,
                                    pass_fds=(verdict_w, token_r))
        finally:
            os.close(verdict_w)
            os.close(token_r)
        overdue = False
        try:
            proc.communicate(job, timeout=limits.timeout_s + GRACE_S)
        except subprocess.TimeoutExpired:
            overdue = True  # the child's own deadline failed: kill and clean up from here
        finally:
            _kill_group(proc.pid)
            proc.wait()
        if overdue and mode == "none" and uid is not None:
            reap = {"uid": uid, "cleanup_dirs": list(WORLD_WRITABLE)}
            subprocess.run([python, "-I", str(CHILD), "--reap", json.dumps(reap)], env=CLEAN_ENV,
                           timeout=60, check=False)
        verdict = _read_all(verdict_r)
        duration = time.monotonic() - start
        stdout, stdout_size = _read_capped(out, limits.max_output_bytes)
        stderr, _ = _read_capped(err, limits.max_output_bytes)
    code = TIMEOUT if overdue else proc.returncode
    passed = verdict == b"pass " + token
    error = "" if passed else _classify(code, verdict, stdout_size, limits)
    detail = verdict.split(b"\n", 1)[1].decode("utf-8", "replace") if verdict.startswith(b"fail ") else ""
    return Result(passed=passed, error=error, returncode=code, duration_s=duration, pid=proc.pid,
                  stdout=stdout, stderr=stderr, isolation=mode, uid=uid, detail=detail)


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


def _read_all(fd: int, cap: int = 1 << 16) -> bytes:
    """What the runner wrote; a daemon of the program may still hold the write end, so
    never wait for end-of-file."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    try:
        while size < cap:
            try:
                chunk = os.read(fd, cap - size)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _read_capped(f, cap: int) -> tuple[str, int]:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace"), size


def _classify(code: int | None, verdict: bytes, stdout_size: int, limits: Limits) -> str:
    if code == SETUP_FAILED:
        return "sandbox"
    if code == TIMEOUT or code == 128 + signal.SIGXCPU:
        return "timeout"
    if code == 128 + signal.SIGXFSZ or stdout_size >= limits.max_file_mb * 2**20:
        return "output_limit"
    if verdict.startswith(b"fail "):
        kind = verdict[5:].split(b"\n", 1)[0].decode("ascii", "replace")
        return kind if kind in ERRORS else "exception"
    if code is not None and code > 128:
        return "crashed"
    return "exit"  # the runner ended without a verdict: the program left before its tests finished
