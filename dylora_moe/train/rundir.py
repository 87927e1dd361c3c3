"""The output directory of a run: checked before anything is read, held by one run at a
time, and its metrics.jsonl kept to one history.

    check_output_dir(run_dir, resume)     a file, not writable, already a run: one line, nothing written
    lock = RunLock(run_dir).acquire()     a second run in the same dir is refused, naming the holder
    separate_attempts(metrics, step)      records of an abandoned attempt are moved aside, not mixed in
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..checkpoint import complete_checkpoints
from ..errors import UserError

logger = logging.getLogger(__name__)
LOCK_FILE = ".lock"
DIRECTORIES = ("checkpoints", "plots", "tokenizer", "base_model", "final")
FILES = ("metrics.jsonl", "recipe.yaml", LOCK_FILE)


def check_output_dir(run_dir: Path, resume: Optional[str], probe_lock: bool = True) -> None:
    """Before any data is read: the output dir can hold a run (a directory, writable, its
    parts of the right kind), no other run holds it, and, for a fresh run, it does not
    already hold one. probe_lock: off on all but the process that will take the lock (the
    others would see it taken)."""
    run_dir = Path(run_dir)
    where = f"train.output_dir={str(run_dir)!r}"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{where}: is a file; expected a directory (or a path that does not exist yet)")
    for name in DIRECTORIES:
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise UserError(f"{where}: {run_dir / name} is a file; expected a directory (move it away)")
    for name in FILES:
        if (run_dir / name).exists() and not (run_dir / name).is_file():
            raise UserError(f"{where}: {run_dir / name} is a directory; expected a file (move it away)")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{where}: {existing} is a file, so no directory can be created under it")
    for folder in (existing, run_dir / "checkpoints"):
        if folder.is_dir():
            probe_writable(folder, where)
    holder = lock_holder(run_dir) if probe_lock else None
    if holder:
        raise UserError(f"{where}: in use by another training run ({holder}); wait for it to finish or choose "
                        "another --output_dir")
    if resume:
        return
    if complete_checkpoints(run_dir / "checkpoints") or (run_dir / "final").exists():
        raise UserError(f"{where} already holds a run (checkpoints or final/); resume it "
                        "with --resume_from_checkpoint auto, or choose another --output_dir")


def probe_writable(folder: Path, where: str) -> None:
    """Create and remove a file: the only test that holds for root, read-only mounts and ACLs."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{where}: cannot write in {folder} ({e.strerror}); choose a writable --output_dir") from None


class RunLock:
    """One training run per output dir: an exclusive flock on <output_dir>/.lock.

    fcntl.flock, not a pid file and not the `filelock` package: the kernel drops a flock
    when its holder dies, even by kill -9, so a stale lock never blocks a restart; and
    `filelock` truncates the lock file on every attempt, which would erase the line that
    names the holder (pid, host, start time) for the run that is refused."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise UserError(f"train.output_dir={str(self.path.parent)!r}: in use by another training run "
                            f"({holder or 'holder unknown'}); wait for it to finish or choose another "
                            "--output_dir") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            # e.g. some network/FUSE mounts: a second run in this dir cannot be detected there
            logger.warning("%s: this filesystem does not support locks (%s); make sure no other run uses this "
                           "output dir", self.path, e.strerror)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def lock_holder(run_dir: Path) -> Optional[str]:
    """Who holds the run dir's lock (its line), or None when nobody does. Takes nothing."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd) or "holder unknown"
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def separate_attempts(path: Path, resumed_step: Optional[int]) -> Optional[Path]:
    """Keep metrics.jsonl to the history this run continues. A fresh start moves an
    abandoned attempt's file aside whole; a resume from step s moves aside the records
    an interrupted attempt logged after s (it trains those steps again). Nothing is
    deleted. Returns where the moved records went, if anywhere."""
    path = Path(path)
    if not path.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if resumed_step is None:
        aside = path.with_name(f"metrics-abandoned-{stamp}.jsonl")
        os.replace(path, aside)
        logger.warning("%s was left by an earlier attempt that saved no checkpoint: moved to %s", path, aside)
        return aside
    keep, move = [], []
    for line in path.read_text(errors="replace").splitlines():
        (keep if _step(line) is not None and _step(line) <= resumed_step else move).append(line)
    if not move:
        return None
    aside = path.with_name(f"metrics-after-step-{resumed_step}-{stamp}.jsonl")
    aside.write_text("\n".join(move) + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    logger.warning("%s: %d record(s) an interrupted attempt logged after step %d moved to %s", path, len(move),
                   resumed_step, aside)
    return aside


def _step(line: str) -> Optional[int]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None
