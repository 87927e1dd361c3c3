"""One sandboxed program's process tree: isolate, limit, supervise (see _sandbox_server.py,
which forks a fresh process for each program and calls supervise_job in it).

Process tree, by isolation mode (sandbox.py picks the mode):
  namespaces  (root)  this supervisor unshares mount/UTS/IPC/PID/network namespaces, forks
                      the namespace's init, which mounts, then forks the runner; the runner
                      drops to the slot's uid.
  userns      (root without CAP_SYS_ADMIN, or any user)  this supervisor first becomes the
                      slot's uid (when root), then unshares a user namespace with the others;
                      its init mounts; the runner gives up every capability.
  none        this supervisor forks the runner, which drops to the slot's uid (when root).
In the namespace modes the whole tree dies with init (the kernel kills a PID namespace
whose init exits), so no daemon outlives the sample; every mount is read-only but fresh
tmpfs on the world-writable dirs (/tmp/work is the program's dir), gone with the
namespace. In mode none, every process of the slot's uid is killed afterwards and its
files in the world-writable dirs removed.

Exit status: 0 the runner exited (the verdict pipe says how), 128+N the runner was killed
by signal N, 124 timeout, 125 the supervisor or init could not set the sandbox up (why: on
stderr). The runner's own exit code is never passed on: it is the program's to choose, so
the runner reports a setup failure, or a deadline that passed before the program could
start, on the verdict pipe instead.
Free of project imports; loads its siblings by path.
"""
from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT, SETUP_FAILED = 124, 125


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ns = load("_sandbox_ns")
runner = load("_sandbox_runner")


def supervise_job(config: dict, job: dict, verdict_fd: int, token_fd: int) -> None:
    """In a fresh process of the server: isolate, start the tree, supervise it; ends
    the process with the exit status described above."""
    # The clock starts with the job, so a deadline that passes while the sandbox is being
    # set up is a timeout however the scheduler orders these processes.
    config = {**config, "deadline": time.monotonic() + config["timeout_s"]}
    fds = _hide_fds(verdict_fd, token_fd)
    mode = config["mode"]
    try:
        if mode == "namespaces":
            ns.unshare(ns.PRIVATE)
        elif mode == "userns":
            if config["uid"] is not None:
                _become(config["uid"], config["gid"])
            outside = os.geteuid(), os.getegid()
            ns.unshare(ns.CLONE_NEWUSER | ns.PRIVATE)
            ns.map_to(*outside)
    except OSError as e:
        _setup_failed(str(e), fds)
    pid = os.fork()
    if pid == 0:
        if mode == "none":
            start_runner(config, job, config["workdir"], fds)
        init(config, job, fds)
    os._exit(supervise(pid, config))


def init(config: dict, job: dict, fds) -> None:
    """PID 1 of the new namespaces: mount, start the runner, pass its status on."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    try:
        work = private_filesystem(config)
    except OSError as e:
        _setup_failed(str(e), fds)
    pid = os.fork()
    if pid == 0:
        start_runner(config, job, work, fds)
    _, status = os.waitpid(pid, 0)
    os._exit(encode(status))


def private_filesystem(config: dict) -> str:
    """Everything read-only, then empty tmpfs on the world-writable dirs and a /proc of
    this PID namespace; the program's dir is /tmp/work. Setup notes go to stderr."""
    ns.mount(None, "/", None, ns.MS_REC | ns.MS_PRIVATE)
    writable = ns.make_read_only()
    ns.private_tmpfs(config["tmpfs_mb"])
    ns.fresh_proc()
    if writable:
        print(f"sandbox: still writable: {', '.join(writable)}", file=sys.stderr, flush=True)
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    if config["mode"] == "namespaces" and config["uid"] is not None:
        os.chown(work, config["uid"], config["gid"])
    return work


def start_runner(config: dict, job: dict, work: str, fds) -> None:
    """In the runner process: limits, then no privilege left, then the program."""
    try:
        os.setpgid(0, 0)  # its own group: in mode none the supervisor kills it whole
        os.chdir(work)
        set_limits(config)
        if config["mode"] == "userns":
            ns.drop_capabilities()
        elif config["uid"] is not None:
            _become(config["uid"], config["gid"])
        ns.no_new_privs()
    except OSError as e:
        _setup_failed(f"runner setup: {e}", fds)
    except BaseException:  # noqa: BLE001 - a bug of the sandbox: it keeps its traceback
        _setup_failed("runner setup: " + traceback.format_exc(), fds)
    if time.monotonic() >= config["deadline"]:
        _verdict(fds, "timeout", "the deadline passed before the program started")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update({**config["env"], "HOME": work, "TMPDIR": work})
    runner.run(job["program"], job["tests"], *fds)


def set_limits(config: dict) -> None:
    both = lambda n: (n, n)  # noqa: E731
    resource.setrlimit(resource.RLIMIT_AS, both(config["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_CPU, both(config["cpu_seconds"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, both(config["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, both(64))
    resource.setrlimit(resource.RLIMIT_CORE, both(0))
    resource.setrlimit(resource.RLIMIT_NPROC, both(config["max_processes"]))


def supervise(pid: int, config: dict) -> int:
    """Wait for the child (init, or the runner in mode none) until the deadline; then
    leave nothing of the sample running. Returns the exit status to report."""
    code = _wait_until(pid, config["deadline"])
    if code is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        code = TIMEOUT
    elif config["mode"] == "none":
        code = encode(code)
    else:
        code = _passed_on(code)
    if config["mode"] == "none":
        _kill_group(pid)
        if config["uid"] is not None:
            reap(config["uid"], config["cleanup_dirs"])
    return code


def _wait_until(pid: int, deadline: float) -> int | None:
    """The child's wait status, or None once the deadline passed with it still running.
    Synchronous on purpose: an exception raised from a SIGALRM handler could land before
    the wait's `try` and end this process as a broken sandbox instead of a timeout."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)  # also catches an exit before the block
            if done:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            signal.sigtimedwait({signal.SIGCHLD}, remaining)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def reap(uid: int, dirs: list) -> None:
    """Kill every process of `uid` (a setsid daemon included) and remove what it wrote
    in the world-writable dirs. Run as root, for a uid only sandboxed programs use."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(uid)
            # kill(-1) from `uid` reaches exactly the processes `uid` may signal: its own.
            for _ in range(100):
                os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)
    for top in dirs:
        _remove_owned(top, uid)


def _remove_owned(top: str, uid: int) -> None:
    try:
        entries = list(os.scandir(top))
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid == uid:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            elif entry.is_dir(follow_symlinks=False) and st.st_mode & 0o002:
                _remove_owned(entry.path, uid)  # another world-writable dir inside
        except OSError:
            continue


def encode(status: int) -> int:
    """A runner's wait status as this process's exit code (see the module doc)."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 0


def _passed_on(status: int) -> int:
    """init's exit code is already encoded; init itself killed means a timeout elsewhere."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    return 128 + os.WTERMSIG(status)


def _become(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _hide_fds(verdict_fd: int, token_fd: int) -> tuple[int, int]:
    """Move the two pipes to random high descriptors (above the program's open-file limit,
    so none of its own files lands next to them), not inherited by anything it execs.
    os.urandom, not `random`: the program shares this interpreter's modules."""
    top = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    low = 100 if top > 200 else 64
    taken = {verdict_fd, token_fd}
    chosen = []
    while len(chosen) < 2:
        fd = low + int.from_bytes(os.urandom(2), "little") % (top - low)
        if fd not in taken:
            taken.add(fd)
            chosen.append(fd)
    verdict, token = chosen
    os.dup2(verdict_fd, verdict, inheritable=False)
    os.dup2(token_fd, token, inheritable=False)
    os.close(verdict_fd)
    os.close(token_fd)
    return verdict, token


def _setup_failed(message: str, fds) -> None:
    """Why on stderr, then on the verdict pipe. Exit code 125 counts only where no program
    code runs (the supervisor, init); from the runner only the verdict does."""
    try:
        os.write(2, f"sandbox: {message}\n".encode("utf-8", "replace"))  # fd 2: sys.stderr may be anything
    finally:
        _verdict(fds, "sandbox", message, SETUP_FAILED)


def _verdict(fds, kind: str, detail: str, code: int = 1) -> None:
    """A failure, told the way the runner tells one (see _sandbox_runner.py), then exit."""
    try:
        os.write(fds[0], f"fail {kind}\n{detail}".encode("utf-8", "replace"))
    finally:
        os._exit(code)

