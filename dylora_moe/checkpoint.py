"""Checkpoints that survive preemption: write to a temporary folder, marker last, rename.

    checkpoints/checkpoint-<step>/        accelerator.save_state (sharded under ZeRO)
        portable/                         experts + router + config (DyLoRAMoE.save_pretrained),
                                          each expert as a PEFT adapter, the tokenizer
        COMPLETE                          JSON marker, written last: only marked folders are trusted

The marker lists every file of the checkpoint with its size and sha256, what it was
trained on (base model name and config hash, expert shapes: identity.py) and the run
it belongs to. `auto` verifies the newest checkpoint against its marker before resuming
it; a truncated, missing or corrupted file, or an unreadable marker, makes it fall back
to the previous good checkpoint, with a warning that names what was wrong. A marker
without a file list (written before markers had one) is trusted by itself.

A checkpoint name that already exists (left by another run) is never reused; a run only
ever deletes checkpoints of its own run (keep_last): those it wrote, and on a restart
those of the run it continues.

On a Cloud Storage FUSE mount (/gcs/, Vertex) a folder rename is a copy that can be cut
short, and the marker could arrive before the files it vouches for: there the checkpoint
is written in place, marker last, and the marker alone decides.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError
from .ranks import describe, share

logger = logging.getLogger(__name__)
MARKER = "COMPLETE"
PREFIX = "checkpoint-"
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Problem:
    """Why a folder cannot be resumed. `unsealed`: it has no marker at all, a save that
    was interrupted (not a checkpoint: skipped quietly); anything else is a checkpoint
    that was sealed and is now damaged (named in a warning)."""
    why: str
    unsealed: bool = False

    def __str__(self) -> str:
        return self.why


def read_marker(path: Path) -> Optional[dict]:
    marker, _ = load_marker(path)
    return marker


def load_marker(path: Path) -> tuple[Optional[dict], Optional[Problem]]:
    """(marker, None) or (None, what is wrong with it)."""
    file = Path(path) / MARKER
    try:
        text = file.read_text()
    except FileNotFoundError:
        return None, Problem(f"no {MARKER} marker (an interrupted save)", unsealed=True)
    except (OSError, UnicodeDecodeError) as e:
        return None, Problem(f"{MARKER} marker unreadable ({e})")
    try:
        marker = json.loads(text)
    except json.JSONDecodeError:
        return None, Problem(f"{MARKER} marker unreadable (not valid JSON)")
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        return None, Problem(f"{MARKER} marker unreadable (no step in it)")
    return marker, None


def checkpoint_folders(root) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")]


def complete_checkpoints(root) -> list[tuple[dict, Path]]:
    """Marked checkpoints under `root`, oldest first (by step, then write time)."""
    found = []
    for path in checkpoint_folders(root):
        marker = read_marker(path)
        if marker is not None:
            found.append((marker, path))
    return sorted(found, key=lambda item: (item[0]["step"], item[0].get("written_at", 0)))


def latest_checkpoint(root) -> Optional[Path]:
    """The newest marked checkpoint (not verified: see verified_latest)."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def file_manifest(folder: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file in a checkpoint folder but the marker."""
    folder = Path(folder)
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MARKER:
            out[path.relative_to(folder).as_posix()] = [path.stat().st_size, _sha256(path)]
    return out


def verify(path: Path) -> Optional[Problem]:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    marker, problem = load_marker(path)
    if problem:
        return problem
    files = marker.get("files")
    if files is None:
        return None  # a marker without a file list: trusted by itself
    for name, (size, digest) in files.items():
        file = Path(path) / name
        if not file.is_file():
            return Problem(f"{name} is missing")
        actual = file.stat().st_size
        if actual != size:
            return Problem(f"{name} is {actual} bytes, its marker says {size} (truncated)" if actual < size else
                           f"{name} is {actual} bytes, its marker says {size}")
        if _sha256(file) != digest:
            return Problem(f"{name} does not match its sha256 (corrupted)")
    return None


def verified_latest(root) -> Optional[Path]:
    """The newest checkpoint under `root` that verifies. Each one that cannot be resumed
    is named in a warning with what is wrong with it. None when there is no checkpoint
    at all (a folder without marker is an interrupted save, not a checkpoint); an error
    when every checkpoint is broken (starting over would silently drop them)."""
    problems = []
    for path in checkpoint_folders(root):
        _, problem = load_marker(path)
        if problem and problem.unsealed:
            logger.info("%s skipped: %s", path, problem)
        elif problem:
            problems.append((path, problem))
    for _, path in reversed(complete_checkpoints(root)):
        problem = verify(path)
        if problem is None:
            for bad, why in problems:
                logger.warning("%s cannot be resumed: %s", bad, why)
            if any(_name_step(bad) >= _name_step(path) for bad, _ in problems):
                logger.warning("resuming from %s instead", path)
            return path
        problems.append((path, problem))
    if problems:
        raise UserError(f"train.resume_from_checkpoint=auto: no checkpoint in {root} can be resumed ("
                        + "; ".join(f"{p.name}: {why}" for p, why in problems) + "); move them away to start over")
    return None


def _name_step(path: Path) -> int:
    """The step in a folder's name (checkpoint-<step>[-n]), -1 when there is none."""
    head = path.name[len(PREFIX):].split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def resolve_resume(value: Optional[str], root) -> Optional[Path]:
    """`auto` -> the newest checkpoint that verifies (or None for a fresh start); a path ->
    that checkpoint, which must be complete and intact."""
    if not value:
        return None
    if value == "auto":
        return verified_latest(root)
    path = Path(value)
    if not path.is_dir():
        raise UserError(f"train.resume_from_checkpoint={value!r}: no such checkpoint folder")
    if read_marker(path) is None and checkpoint_folders(path):
        raise UserError(f"train.resume_from_checkpoint={value!r}: a folder of checkpoints, not one; name one of them, "
                        "or use auto (the newest good one of --output_dir)")
    problem = verify(path)
    if problem:
        raise UserError(f"train.resume_from_checkpoint={value!r}: not a complete checkpoint ({problem})")
    return path


def adopt_run_assets(checkpoint: Path, run_dir: Path) -> list[str]:
    """Resuming another run's checkpoint into a new output dir: take that run's locally
    built tokenizer and tiny random base (the experts were trained with exactly those;
    building new ones would give another vocabulary). Returns what was copied."""
    source = Path(checkpoint).resolve().parents[1]
    copied = []
    for name in ("tokenizer", "base_model"):
        if (source / name).is_dir() and not (Path(run_dir) / name).exists() and source != Path(run_dir).resolve():
            shutil.copytree(source / name, Path(run_dir) / name)
            copied.append(name)
    return copied


def lineage(root, resumed: Optional[Path]) -> tuple[str, list[Path]]:
    """(this run's id, the checkpoints under `root` it may rotate). A fresh run, or one
    branching off an older checkpoint (a newer good one exists), gets a new id and owns
    nothing yet. A run continuing the newest good checkpoint of this output dir carries
    on its id, and owns that checkpoint and the older ones of the same run."""
    if resumed is None:
        return uuid.uuid4().hex, []
    marker = read_marker(resumed) or {}
    run_id = marker.get("run")
    in_root = Path(resumed).resolve().parent == Path(root).resolve()
    newer = [p for m, p in complete_checkpoints(root) if m["step"] > marker.get("step", 0)]
    if not run_id or not in_root or newer:
        return uuid.uuid4().hex, []
    owned = [p for m, p in complete_checkpoints(root) if m.get("run") == run_id and m["step"] <= marker["step"]]
    return run_id, owned


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permission...); nothing else changed."""


class CheckpointManager:
    def __init__(self, accelerator, root, keep_last: int, save_kwargs: dict, run_id: Optional[str] = None,
                 owned: Optional[list] = None, identity: Optional[Callable[[], dict]] = None,
                 gather: Callable = contextlib.nullcontext):
        self.accelerator, self.root, self.keep_last = accelerator, Path(root), keep_last
        self.save_kwargs = save_kwargs
        self.run_id = run_id or uuid.uuid4().hex
        # The only ones rotation may delete: written by this run (or the run it continues).
        self.written: list[Path] = list(owned or [])
        self.identity = identity or (lambda: {})
        # Entered by every rank around the portable copy: with a sharded base it gathers
        # the experts (the main process writes them whole). Not around save_state, which
        # saves each rank's partition.
        self.gather = gather
        self.in_place = str(self.root.resolve()).startswith("/gcs/")

    def save(self, step: int, write_portable, extra: dict) -> Path:
        """All ranks call this. `write_portable(dir)` runs on the main process only. A
        failed write (disk full...) removes what it wrote and raises CheckpointWriteError
        on every rank; earlier checkpoints are untouched."""
        acc = self.accelerator
        final = Path(share(acc, lambda: str(self._free_name(step))))
        tmp = final if self.in_place else final.with_name(final.name + ".tmp")
        previous = self.written[-1].name if self.written else None
        try:
            share(acc, lambda: self._begin(tmp))
            everyone(acc, lambda: acc.save_state(str(tmp), **self.save_kwargs))
            with self.gather():
                share(acc, lambda: self._seal(tmp, final, step, write_portable, extra))
        except CheckpointWriteError:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as e:  # noqa: BLE001 - a write failure becomes one line, anything else is re-raised
            failure = write_failure(e, final, previous)
            if acc.is_main_process and failure is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if failure is None:
                raise
            raise failure from e
        acc.wait_for_everyone()
        return final

    def _begin(self, tmp: Path) -> str:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an interrupted write of this very name
        tmp.mkdir(parents=True)
        return ""

    def _seal(self, tmp: Path, final: Path, step: int, write_portable, extra: dict) -> str:
        # Fault-injection seam for the kill -9 / Ctrl-C tests: hold the write open for a while
        # (at every save, or only at DYLORA_TEST_CHECKPOINT_DELAY_STEP).
        if os.environ.get("DYLORA_TEST_CHECKPOINT_DELAY_STEP", str(step)) == str(step):
            time.sleep(float(os.environ.get("DYLORA_TEST_CHECKPOINT_DELAY_S", "0")))
        write_portable(tmp / "portable")
        marker = {"step": step, "written_at": time.time(), "run": self.run_id, **self.identity(), **extra,
                  "files": file_manifest(tmp)}
        _write_synced(tmp / MARKER, json.dumps(marker, indent=1))
        if not self.in_place:
            os.replace(tmp, final)  # atomic on a local filesystem
            _fsync_dir(final.parent)
        self.written.append(final)
        self._rotate()
        logger.info("saved checkpoint %s", final)
        return ""

    def _free_name(self, step: int) -> Path:
        name = self.root / f"{PREFIX}{step}"
        n = 1
        while name.exists():  # another run's checkpoint: never overwritten
            name = self.root / f"{PREFIX}{step}-{n}"
            n += 1
        return name

    def _rotate(self) -> None:
        while len(self.written) > self.keep_last:
            old = self.written.pop(0)
            shutil.rmtree(old, ignore_errors=True)
            logger.info("removed old checkpoint %s (keep_last=%d)", old, self.keep_last)


def write_failure(error: BaseException, final: Path, previous: Optional[str]) -> Optional[CheckpointWriteError]:
    """A write error while saving `final` as one line, or None when it is not one.
    torch.save and safetensors report a full disk as RuntimeError / SafetensorError, not
    OSError, so their messages are read too."""
    text = str(error)
    if isinstance(error, OSError) and error.errno is not None:
        code, reason, where = error.errno, error.strerror, error.filename
    elif "No space left" in text or "StorageFull" in text or "file write failed" in text:
        code, reason, where = errno.ENOSPC, "No space left on device", None
    else:
        return None
    kept = f"{previous} is intact" if previous else "no earlier checkpoint of this run"
    return CheckpointWriteError(code, f"{reason} while saving {final.name} (nothing of it kept; {kept})",
                                where or str(final.parent))


def everyone(accelerator, fn: Callable[[], object]) -> None:
    """`fn` on every rank; if it fails on any, it fails on all (the others raise a
    CheckpointWriteError naming the rank's error) instead of some waiting forever."""
    error = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - re-raised below
        error = e
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        errors = [e for e in gather_object([None if error is None else describe(error)]) if e is not None]
        if error is None and errors:
            raise CheckpointWriteError(errno.EIO, f"another rank failed to save: {errors[0]}")
    if error is not None:
        raise error


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
