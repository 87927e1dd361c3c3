"""Read local .json / .jsonl files row by row, skipping and counting bad rows.

A bad row never stops a run: it is skipped, counted by reason, and the first few are
named (file:line) in the log. A row over `max_row_bytes` is skipped before it is parsed,
and one nested too deeply to parse is a bad row like any other. A missing file or one
with no usable row is an error.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from ..errors import UserError

logger = logging.getLogger(__name__)
MAX_NAMED = 5
DEFAULT_MAX_ROW_BYTES = 1_000_000


@dataclass
class BadRows:
    """Skipped rows of one file: counts per reason and the first few places."""
    path: str
    counts: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def add(self, where: str, reason: str) -> None:
        self.counts[reason] += 1
        if len(self.examples) < MAX_NAMED:
            self.examples.append(f"{where}: {reason}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def log(self) -> None:
        if self.total:
            logger.warning("%s: skipped %d bad row(s) %s; first: %s", self.path, self.total,
                           dict(self.counts), "; ".join(self.examples))


def read_rows(path, validate: Callable[[dict], Optional[str]],
              max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> tuple[list[dict], BadRows]:
    """Rows of a .json (a list of objects) or .jsonl (one object a line) file.

    `validate(row)` returns None for a usable row, else the reason to skip it.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a .json or .jsonl data file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    bad = BadRows(str(path))
    raw = path.read_bytes()
    rows = []
    for where, row, reason in _parse(path, raw, max_row_bytes):
        if reason is None:
            reason = validate(row) if isinstance(row, dict) else "not a JSON object"
        if reason is None and _has_undecodable(row):
            reason = "undecodable bytes"
        if reason is None:
            rows.append(row)
        else:
            bad.add(where, reason)
    bad.log()
    if not rows:
        raise UserError(f"{path}: no usable rows ({bad.total} skipped: {dict(bad.counts)})")
    return rows, bad


def _parse(path: Path, raw: bytes, max_row_bytes: int) -> Iterable[tuple[str, object, Optional[str]]]:
    too_big = f"over data.max_row_bytes={max_row_bytes}"
    if path.suffix == ".json" and raw.lstrip()[:1] == b"[":
        # A JSON array: undecodable bytes are kept as surrogates and the rows holding
        # them are skipped one by one, instead of losing the whole file.
        try:
            data = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise UserError(f"{path}: invalid JSON (nested too deeply to parse)") from None
        for i, row in enumerate(data):
            # Parsed with the file; skipped before anything formats or tokenizes it.
            yield f"{path}:[{i}]", row, too_big if _text_bytes(row, max_row_bytes) > max_row_bytes else None
        return
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if len(line) > max_row_bytes:
            yield where, None, too_big
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            yield where, None, "undecodable bytes"
            continue
        try:
            yield where, json.loads(text), None
        except json.JSONDecodeError:
            yield where, None, "invalid JSON"
        except RecursionError:
            yield where, None, "nested too deeply"


def _walk(value) -> Iterable[object]:
    """Every value inside `value`, without recursion (a row may nest thousands deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _text_bytes(value, limit: int) -> int:
    """About how many bytes `value` takes as JSON text (its strings), stopping past `limit`."""
    total = 0
    for item in _walk(value):
        total += len(item) if isinstance(item, str) else 8
        if total > limit:
            break
    return total


def _has_undecodable(value) -> bool:
    return any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in _walk(value))


def optional_strings(row: dict, fields) -> Optional[str]:
    """Listed fields, when present and not null, are strings."""
    for name in fields:
        if row.get(name) is not None and not isinstance(row[name], str):
            return f"field {name!r} is {type(row[name]).__name__}, expected a string"
    return None


def optional_string_list(row: dict, name: str) -> Optional[str]:
    """A field that, when present and not null, is a list of strings."""
    value = row.get(name)
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
        return f"field {name!r} must be a list of strings"
    return None


def require_strings(row: dict, fields, non_empty=()) -> Optional[str]:
    """The common check: listed fields present and strings; some of them non-empty."""
    for name in fields:
        if name not in row:
            return f"missing field {name!r}"
        if not isinstance(row[name], str):
            return f"field {name!r} is {type(row[name]).__name__}, expected a string"
    for name in non_empty:
        if not row[name].strip():
            return f"empty {name!r}"
    return None
