"""The sandbox server: one long-lived interpreter per worker, which forks a fresh process
for every program instead of starting a new interpreter (the start-up was most of a
short program's cost).

    python -I _sandbox_server.py --serve           jobs in, results out: one JSON line each
    python -I _sandbox_server.py --reap UID DIRS   kill UID's processes, remove its files

A job is {"config": ..., "job": {"program", "tests"}, "max_output": bytes}. For each, the
server makes the pipes, forks a process that closes everything of the server (the program
must never reach this protocol) and runs _sandbox_child.supervise_job, only then makes
the verdict token (so no copy of it is in the forked memory) and puts it in the token
pipe, waits, and replies {"code", "passed", "verdict", "stdout", "stdout_size", "stderr"}.
Free of project imports: loads its siblings by path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


child = _load("_sandbox_child")


def serve() -> None:
    requests, replies = sys.stdin.buffer, sys.stdout
    for line in iter(requests.readline, b""):
        request = json.loads(line)
        reply = run_job(request["config"], request["job"], request["max_output"])
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def run_job(config: dict, job: dict, max_output: int) -> dict:
    token_r, token_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:
            try:
                _become_job(out.fileno(), err.fileno(), keep=(verdict_w, token_r))
                child.supervise_job(config, job, verdict_w, token_r)
            except BaseException:  # noqa: BLE001 - a bug of the sandbox: its traceback goes to the job's stderr
                traceback.print_exc()
            finally:
                os._exit(child.SETUP_FAILED)  # never back into the server's loop
        # Made after the fork, so no copy of it is in the program's memory: only in the pipe.
        token = os.urandom(32).hex().encode()
        os.write(token_w, token)
        for fd in (token_w, token_r, verdict_w):
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever is left in its process group
        except OSError:
            pass
        verdict = _read_available(verdict_r)
        stdout, stdout_size = _capped(out, max_output)
        stderr, _ = _capped(err, max_output)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
    passed = verdict == b"pass " + token
    return {"code": code, "passed": passed, "verdict": "" if passed else verdict.decode("utf-8", "replace"),
            "stdout": stdout, "stdout_size": stdout_size, "stderr": stderr}


def _become_job(out: int, err: int, keep: tuple) -> None:
    """In the forked process: a session of its own, stdin from /dev/null, stdout/stderr to
    the job's files, and no other descriptor of the server."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in _open_fds():
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _open_fds() -> list[int]:
    try:
        return [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 1024))


def _read_available(fd: int, cap: int = 1 << 16) -> bytes:
    """What the runner wrote; a daemon of the program may still hold the write end (mode
    none, not root), so never wait for end-of-file."""
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


def _capped(f, cap: int) -> tuple[str, int]:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    return f.read(cap).decode("utf-8", errors="replace"), size


def main() -> None:
    if sys.argv[1] == "--reap":
        child.reap(int(sys.argv[2]), sys.argv[3:])
    else:
        serve()


if __name__ == "__main__":
    main()
