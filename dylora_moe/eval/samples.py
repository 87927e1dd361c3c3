"""samples.jsonl: one line per executed sample, and resuming from it.

Every line carries the key of the settings it was made with (weights, base, task set,
prompt format, decoding, execution limits). A later eval into the same folder reuses
only lines of its own key; lines of any other key are moved to samples.stale.jsonl, so
samples scored with other weights or settings are never reported as this run's.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class SampleStore:
    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key
        self.done: dict[tuple, dict] = {}
        self.stale = 0
        self._load()

    def _load(self) -> None:
        if not self.path.is_file():
            return
        keep, stale = [], []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
                sample_key = (record["variant"], record["task_id"], record["sample"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill: that sample runs again
            if record.get("settings") == self.key:
                keep.append(line)
                self.done[sample_key] = record
            else:
                stale.append(line)
        if stale:
            with open(self.path.with_name("samples.stale.jsonl"), "a") as f:
                f.write("\n".join(stale) + "\n")
            self.path.write_text("".join(line + "\n" for line in keep))
            self.stale = len(stale)

    def missing(self, variant: str, task_id: str, n: int) -> list[int]:
        return [s for s in range(n) if (variant, task_id, s) not in self.done]

    def add(self, records: list[dict]) -> None:
        """Appends (flushed per call: a killed eval resumes after the last batch)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for record in records:
                record = {**record, "settings": self.key}
                f.write(json.dumps(record) + "\n")
                self.done[(record["variant"], record["task_id"], record["sample"])] = record

    def counts(self, variant: str, task_ids) -> tuple[list[int], list[int]]:
        """(samples, correct) per task of `task_ids` that has any sample of `variant`."""
        per_task = {}
        for (v, task_id, _), record in self.done.items():
            if v == variant and task_id in task_ids:
                entry = per_task.setdefault(task_id, [0, 0])
                entry[0] += 1
                entry[1] += int(record["passed"])
        return [e[0] for e in per_task.values()], [e[1] for e in per_task.values()]
