"""Which exceptions are the user's to fix, and how each reads as one line.

A bad recipe value, a missing file, a full disk, a permission problem or a run that
diverged is something the user can act on: the command line shows one line naming the
field or file and exits 2. Code that finds such a mistake raises `UserError`; a plain
ValueError or RuntimeError is an invariant of ours that broke, a bug, and keeps its
traceback, so a report carries what is needed to fix it. DYLORA_TRACEBACK=1 shows the
traceback for every error.
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Optional

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class UserError(ValueError):
    """A mistake the user can fix (a recipe field, a flag, a file, the data, a checkpoint),
    its message one line naming what is wrong and what was expected. A ValueError, so
    `except ValueError` (and pytest.raises(ValueError)) keep catching it."""


# errno -> what the user should do about it (the strerror alone says what happened).
OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space (checkpoints already written are intact) and rerun; "
                  "training resumes with --resume_from_checkpoint auto",
    errno.EDQUOT: "the disk quota is exceeded: free space and rerun",
    errno.EACCES: "no permission: choose a path you can write (e.g. --output_dir)",
    errno.EPERM: "not permitted: choose a path you can write (e.g. --output_dir)",
    errno.EROFS: "a read-only filesystem: choose a writable --output_dir",
}


def one_line(error: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix, or None for a bug."""
    if isinstance(error, OSError):
        return _os_error(error)
    if isinstance(error, (UserError, FloatingPointError)):  # a bare ValueError is a bug: traceback
        return _first_line(error)
    if isinstance(error, MemoryError) or _is_out_of_memory(error):
        return ("out of memory (" + _first_line(error) + "); lower train.train_batch_size or data.max_seq_length, "
                "or see `dylora-moe plan` for what fits")
    if type(error).__name__ == "SafetensorError":
        where = _local_in_traceback(error, "filename")
        return f"{where + ': ' if where else ''}a damaged or cut-short .safetensors file ({_first_line(error)})"
    google = _google_api_error(error)
    if google is not None:
        return google
    return None


def guarded(main: Callable[[list], int], argv: list) -> int:
    """Run a command's main: known errors become `error: <one line>` and exit 2,
    Ctrl-C exits 130 with one line, anything else raises with its traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        _say("error: interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 - classified just below, a bug is re-raised untouched
        message = one_line(e)
        if message is None:
            raise
        if os.environ.get("DYLORA_TRACEBACK"):
            traceback.print_exc()
        _say(f"error: {message}")
        return EXIT_USAGE


def _say(line: str) -> None:
    """Write one line to stderr in a single write. Under `accelerate launch` every
    process prints the same error into one shared pipe, and Python's stderr is
    write-through there, so `print` (text, then newline: two writes) let another
    process's log line land between an error and its newline."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _os_error(error: OSError) -> str:
    if error.strerror is None:  # raised with a message of our own (e.g. FileNotFoundError("x: not found"))
        return _first_line(error)
    where = error.filename if error.filename is not None else ""
    if error.filename2 is not None:
        where = f"{where} -> {error.filename2}"
    text = f"{where}: {error.strerror}" if where else error.strerror
    hint = OS_HINTS.get(error.errno)
    return f"{text} ({hint})" if hint else text


def _local_in_traceback(error: BaseException, name: str) -> Optional[str]:
    """A variable of the innermost frame that has one: safetensors names no file in its errors."""
    found, tb = None, error.__traceback__
    while tb is not None:
        value = tb.tb_frame.f_locals.get(name)
        if isinstance(value, (str, os.PathLike)):
            found = os.fspath(value)
        tb = tb.tb_next
    return found


def _is_out_of_memory(error: BaseException) -> bool:
    if not isinstance(error, RuntimeError):
        return False
    try:
        import torch

        if isinstance(error, torch.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return "can't allocate memory" in str(error) or "CUDA out of memory" in str(error)


def _google_api_error(error: BaseException) -> Optional[str]:
    """Cloud calls (Vertex submit, Secret Manager): denied, not found, no credentials."""
    module = type(error).__module__ or ""
    if module.startswith("google.api_core.exceptions"):
        return f"Google Cloud: {_first_line(error)}"
    if module.startswith("google.auth.exceptions"):
        return f"Google Cloud credentials: {_first_line(error)} (run `gcloud auth application-default login`)"
    return None
