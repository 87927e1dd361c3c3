"""Checkpoints that survive preemption: write to a temporary folder, marker last, rename.

    checkpoints/checkpoint-<step>/        accelerator.save_state (sharded under ZeRO)
        portable/                         experts + router + config (DyLoRAMoE.save_pretrained),
                                          each expert as a PEFT adapter, the tokenizer
        COMPLETE                          JSON marker, written last: only marked folders are trusted

A checkpoint name that already exists (left by another run) is never reused; a run only
ever deletes checkpoints it wrote itself (keep_last).

On a Cloud Storage FUSE mount (/gcs/, Vertex) a folder rename is a copy that can be cut
short, and the marker could arrive before the files it vouches for: there the checkpoint
is written in place, marker last, and the marker alone decides.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)
MARKER = "COMPLETE"
PREFIX = "checkpoint-"


def read_marker(path: Path) -> Optional[dict]:
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
        return marker if isinstance(marker, dict) and isinstance(marker.get("step"), int) else None
    except (OSError, json.JSONDecodeError):
        return None


def complete_checkpoints(root) -> list[tuple[dict, Path]]:
    """Marked checkpoints under `root`, oldest first (by step, then write time)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX) and not path.name.endswith(".tmp"):
            marker = read_marker(path)
            if marker is not None:
                found.append((marker, path))
    return sorted(found, key=lambda item: (item[0]["step"], item[0].get("written_at", 0)))


def latest_checkpoint(root) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(value: Optional[str], root) -> Optional[Path]:
    """`auto` -> the latest complete checkpoint (or None for a fresh start); a path -> that
    checkpoint, which must be complete."""
    if not value:
        return None
    if value == "auto":
        return latest_checkpoint(root)
    path = Path(value)
    if read_marker(path) is None:
        raise ValueError(f"train.resume_from_checkpoint={value!r}: not a complete checkpoint "
                         f"(no valid {MARKER} marker in it)")
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


class CheckpointManager:
    def __init__(self, accelerator, root, keep_last: int, save_kwargs: dict):
        self.accelerator, self.root, self.keep_last = accelerator, Path(root), keep_last
        self.save_kwargs = save_kwargs
        self.written: list[Path] = []  # by this process only: the only ones rotation may delete
        self.in_place = str(self.root.resolve()).startswith("/gcs/")

    def save(self, step: int, write_portable, extra: dict) -> Path:
        """All ranks call this. `write_portable(dir)` runs on the main process only."""
        acc = self.accelerator
        final = self._free_name(step) if acc.is_main_process else None
        final = Path(_broadcast_str(acc, str(final) if final else ""))
        tmp = final if self.in_place else final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)  # debris of an interrupted write of this very name
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), **self.save_kwargs)
        acc.wait_for_everyone()
        if acc.is_main_process:
            # Fault-injection seam for the kill -9 test: hold the write open for a while.
            time.sleep(float(os.environ.get("DYLORA_TEST_CHECKPOINT_DELAY_S", "0")))
            write_portable(tmp / "portable")
            marker = {"step": step, "written_at": time.time(), **extra}
            _write_synced(tmp / MARKER, json.dumps(marker, indent=2))
            if not self.in_place:
                os.replace(tmp, final)  # atomic on a local filesystem
                _fsync_dir(final.parent)
            self.written.append(final)
            self._rotate()
            logger.info("saved checkpoint %s", final)
        acc.wait_for_everyone()
        return final

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


def _broadcast_str(accelerator, value: str) -> str:
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


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
