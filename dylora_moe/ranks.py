"""A function run on the main process, its result, or its error, reaching every rank:
so a failure there (a full disk, a bad checkpoint path) never leaves the other ranks
waiting in a collective. Used by the checkpoints and the run's start (train/run.py)."""
from __future__ import annotations

from typing import Callable, Optional

from accelerate.utils import broadcast_object_list

from .errors import UserError


def share(accelerator, fn: Callable[[], str]) -> str:
    """`fn` on the main process; its result (or its error) reaches every rank, so a
    failure there never leaves the others waiting in a collective."""
    result, error = "", None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return result
    box = [(result, _portable_error(error))]

    broadcast_object_list(box, from_process=0)
    result, shipped = box[0]
    if error is not None:
        raise error
    if shipped is not None:
        raise shipped
    return result


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _portable_error(error: Optional[BaseException]):
    """An error in a form every rank can unpickle and raise."""
    if error is None:
        return None
    if isinstance(error, OSError):
        return OSError(error.errno, error.strerror or str(error), error.filename)
    if isinstance(error, UserError):  # stays the user's: one line on every rank
        return UserError(str(error))
    if isinstance(error, ValueError):
        return ValueError(str(error))
    return RuntimeError(describe(error))
