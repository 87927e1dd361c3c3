"""The data sources: each turns raw rows into formatted Examples split by its own rules.

    code_alpaca  hub sahil280114/codealpaca (data/code_alpaca_20k.json) or a local file; 90/10
    mbpp         hub google-research-datasets/mbpp ("full") or a local mbpp.jsonl; 70/10/20
                 seeded, or the official task_id ranges
    jsonl        any local instruction/input/output file; 90/10
    demo         generated Python tasks (offline); 90/10
"""
from __future__ import annotations

from dataclasses import dataclass

import datasets  # called as datasets.load_dataset: tests stand in for the hub there

from ..errors import UserError
from .config import DataConfig, SourceConfig
from .demo_tasks import FAMILIES, demo_rows
from .formatting import instruction_example, mbpp_example
from .readers import BadRows, optional_string_list, optional_strings, read_rows, require_strings
from .splits import dedupe, fraction_split

CODE_ALPACA_HUB = ("sahil280114/codealpaca", "data/code_alpaca_20k.json")
MBPP_HUB = ("google-research-datasets/mbpp", "full")
TRAIN_VALIDATION = {"train": 0.9, "validation": 0.1}
MBPP_RANDOM = {"train": 0.7, "validation": 0.1, "test": 0.2}
# Official MBPP split by task_id (1-10 are the few-shot prompt examples: used by none).
MBPP_OFFICIAL = {"train": (601, 974), "validation": (511, 600), "test": (11, 510)}


@dataclass
class Loaded:
    """One source's examples by split, and what became of its rows on the way there."""
    splits: dict                # {split name: examples}
    origin: str                 # the file, hub dataset or generator the rows came from
    rows: int = 0               # usable rows read
    duplicates: int = 0         # exact duplicate prompts removed
    split_rule: str = ""        # how the rest was split, for messages


def load_source(source: SourceConfig, data: DataConfig) -> Loaded:
    """Examples by split for one configured source."""
    loaders = {"code_alpaca": _code_alpaca, "jsonl": _instruction_file, "mbpp": _mbpp, "demo": _demo}
    return loaders[source.name](source, data)


def _split(examples: list, where: str, fractions: dict, seed: int) -> Loaded:
    kept = dedupe(examples, where)
    rule = "/".join(f"{round(f * 100)}" for f in fractions.values()) + " " + "/".join(fractions)
    return Loaded(fraction_split(kept, fractions, seed), where, len(examples), len(examples) - len(kept), rule)


def validate_instruction_row(row: dict):
    return (require_strings(row, ("instruction", "output"), non_empty=("instruction", "output"))
            or optional_strings(row, ("input", "setup")) or optional_string_list(row, "tests"))


def validate_mbpp_row(row: dict):
    reason = require_strings(row, ("text", "code"), non_empty=("text", "code"))
    if reason is not None:
        return reason
    if not isinstance(row.get("task_id"), int):
        return "missing or non-integer 'task_id'"
    tests = row.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        return "'test_list' must be a non-empty list of strings"
    return optional_strings(row, ("test_setup_code",))


def _code_alpaca(source, data):
    if source.path:
        return _instruction_file(source, data)

    repo, file = CODE_ALPACA_HUB
    rows = _validated(_hub(source, repo, lambda: datasets.load_dataset(repo, data_files=file, split="train")),
                      validate_instruction_row, repo)
    return _split_instructions(rows, source, data, repo)


def _instruction_file(source, data):
    rows, _ = read_rows(source.path, validate_instruction_row, data.max_row_bytes)
    return _split_instructions(rows, source, data, source.path)


def _split_instructions(rows, source, data, where):
    examples = [instruction_example(row, source.label, str(i)) for i, row in enumerate(rows)]
    return _split(examples, str(where), TRAIN_VALIDATION, data.seed)


def _mbpp(source, data):
    if source.path:
        rows, _ = read_rows(source.path, validate_mbpp_row, data.max_row_bytes)
        where = source.path
    else:
        repo, config = MBPP_HUB
        where = repo
        # The hub copy is pre-split (train/test/validation/prompt): join and re-split by our rules.
        splits = _hub(source, repo, lambda: datasets.load_dataset(repo, config))
        rows = _validated(datasets.concatenate_datasets(list(splits.values())), validate_mbpp_row, repo)
    examples = [mbpp_example(row, source.label) for row in sorted(rows, key=lambda r: r["task_id"])]
    if data.mbpp_split == "official":
        by_id = {int(ex["id"]): ex for ex in examples}
        splits = {name: [by_id[i] for i in range(lo, hi + 1) if i in by_id] for name, (lo, hi) in MBPP_OFFICIAL.items()}
        rule = "official task_id ranges " + ", ".join(f"{n} {lo}-{hi}" for n, (lo, hi) in MBPP_OFFICIAL.items())
        return Loaded(splits, str(where), len(examples), len(examples) - len(by_id), rule)
    return _split(examples, str(where), MBPP_RANDOM, data.seed)


def _demo(source, data):
    families = [source.family] if source.family else list(FAMILIES)
    examples = []
    for family in families:
        rows = demo_rows(family, data.demo_examples, data.seed)
        examples += [instruction_example(row, source.label, f"{family}-{i}") for i, row in enumerate(rows)]
    return _split(examples, f"demo:{','.join(families)} (generated)", TRAIN_VALIDATION, data.seed)


def _hub(source, repo: str, load):
    """A hub dataset, or one line saying it cannot be had and what to do instead."""
    try:
        return load()
    except (OSError, ValueError) as e:  # offline, unreachable, not found: datasets raises these
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data.sources[{source.name}]: cannot load the hub dataset {repo} ({first}); "
                        f"or point the source at a local copy with path:") from None


def _validated(rows, validate, where) -> list[dict]:
    bad, good = BadRows(str(where)), []
    for i, row in enumerate(rows):
        reason = validate(row)
        if reason is None:
            good.append(row)
        else:
            bad.add(f"{where}[{i}]", reason)
    bad.log()
    if not good:
        raise UserError(f"{where}: no usable rows ({bad.total} skipped)")
    return good
