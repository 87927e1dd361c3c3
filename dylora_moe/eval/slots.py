"""A distinct uid per concurrently running program, when running as root.

Programs of different slots cannot signal each other, and a slot's leftovers (processes,
files) can be found by its uid alone. The uids come from a range no login uses; each
is claimed with a lock file, so two evals on one machine never share one either.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import threading
from pathlib import Path

FIRST_UID = 1_500_000_000  # far above login uids and the usual subuid ranges
SLOTS = 65536

_lock = threading.Lock()
_in_use: set[int] = set()


def lock_dir() -> Path:
    path = Path(tempfile.gettempdir()) / "dylora-sandbox-slots"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


@contextlib.contextmanager
def slot_uid(needed: bool = True):
    """Yields a uid nothing else uses right now (also its gid), or None if not `needed`
    or not root (then programs keep this process's uid)."""
    if not needed or os.geteuid() != 0:
        yield None
        return
    uid, fd = _claim()
    try:
        yield uid
    finally:
        os.close(fd)  # releases the lock file
        with _lock:
            _in_use.discard(uid)


def _claim() -> tuple[int, int]:
    """The lowest free uid: the same few are reused, so their lock files stay few."""
    folder = lock_dir()
    for offset in range(SLOTS):
        uid = FIRST_UID + offset
        with _lock:
            if uid in _in_use:
                continue
            fd = os.open(folder / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _in_use.add(uid)
            return uid, fd
    raise RuntimeError(f"sandbox: all {SLOTS} uids from {FIRST_UID} are in use")
