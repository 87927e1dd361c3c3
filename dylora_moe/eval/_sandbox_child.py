"""Runs inside the sandbox's child process, before the untrusted program: isolate, limit,
drop privileges, then exec the program. Kept free of project imports (started with -I).

argv[1]: JSON limits. The program source arrives on stdin.
"""
import ctypes
import json
import os
import resource
import sys

CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
NOBODY = 65534


def isolate(libc) -> str:
    """As root: a private network namespace (loopback only, and down) and a private mount
    namespace with fresh tmpfs over /tmp, /var/tmp and /dev/shm; returns the work dir."""
    if libc.unshare(CLONE_NEWNS | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare failed")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making / private failed")
    for path in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(path) and libc.mount(b"tmpfs", path, b"tmpfs", 0, b"size=64m,mode=1777") != 0:
            raise OSError(ctypes.get_errno(), f"mounting tmpfs on {path.decode()} failed")
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    os.chown(work, NOBODY, NOBODY)
    return work


def main() -> None:
    limits = json.loads(sys.argv[1])
    source = sys.stdin.buffer.read()
    work = limits["workdir"]
    if limits["isolate"]:
        work = isolate(ctypes.CDLL(None, use_errno=True))
    os.chdir(work)
    with open("program.py", "wb") as f:
        f.write(source)
    soft_hard = lambda n: (n, n)  # noqa: E731
    resource.setrlimit(resource.RLIMIT_AS, soft_hard(limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_CPU, soft_hard(limits["cpu_seconds"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, soft_hard(limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, soft_hard(64))
    resource.setrlimit(resource.RLIMIT_CORE, soft_hard(0))
    resource.setrlimit(resource.RLIMIT_NPROC, soft_hard(limits["max_processes"]))
    if limits["drop_to"] is not None:  # limits on processes and files only bind an unprivileged user
        os.chown("program.py", NOBODY, NOBODY)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    python = limits["python"]
    os.execve(python, [python, "-I", "program.py"], limits["env"] | {"HOME": work, "TMPDIR": work})


if __name__ == "__main__":
    main()
