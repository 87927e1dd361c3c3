"""DataConfig / SourceConfig: what to load, how to split, mix and tokenize it."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError
from ..fieldtypes import check_fields
from .demo_tasks import FAMILIES

SOURCE_NAMES = ("code_alpaca", "mbpp", "jsonl", "demo")
MAX_DEMO_EXAMPLES = 100_000  # per family: ~1 s to generate; the families repeat long before that
SEED_RANGE = (0, 2**32 - 1)


@dataclass
class SourceConfig:
    name: str                       # one of SOURCE_NAMES
    path: Optional[str] = None      # local file; None = the hub dataset (code_alpaca, mbpp)
    weight: float = 1.0             # relative sampling weight when interleaving
    family: Optional[str] = None    # demo only: "numbers" or "strings" (None = both)
    label: Optional[str] = None     # name carried to each batch for routing analytics

    def __post_init__(self):
        if self.name not in SOURCE_NAMES:
            raise UserError(f"data.sources: unknown source {self.name!r}; known sources are {list(SOURCE_NAMES)}")
        check_fields(self, f"data.sources[{self.name}]")
        if self.name == "jsonl" and not self.path:
            raise UserError("data.sources: source 'jsonl' needs a path to a local .json/.jsonl file")
        if self.name == "demo" and self.path:
            raise UserError(f"data.sources[demo].path={self.path!r}: the demo source is generated, it reads no file")
        if self.family is not None and (self.name != "demo" or self.family not in FAMILIES):
            raise UserError(f"data.sources[{self.name}].family={self.family!r}: only the demo source has families, "
                            f"one of {list(FAMILIES)}")
        if not isinstance(self.weight, (int, float)) or not 0 < self.weight < math.inf:
            raise UserError(f"data.sources[{self.name}].weight={self.weight!r}: expected a number > 0")
        if self.label is None:
            self.label = f"{self.name}:{self.family}" if self.family else self.name


@dataclass
class DataConfig:
    sources: list = field(default_factory=lambda: [SourceConfig("code_alpaca"), SourceConfig("mbpp")])
    interleaved_sampling: bool = True     # balanced draws across sources (weights), else concatenate
    stopping_strategy: str = "all_exhausted"  # interleave until every source was seen once
    # "official": MBPP's task_id ranges (train 601-974), so eval's pass@k on the test tasks
    # is clean; "random": a seeded 70/10/20 split, which trains on part of those tasks.
    mbpp_split: str = "official"
    training_subset: float = 100.0        # percent of each source's train split
    eval_subset: float = 100.0            # percent of each source's validation/test split
    max_seq_length: int = 1024
    overlong: str = "truncate"            # "truncate" or "drop" examples longer than max_seq_length
    train_on_prompt: bool = False         # False: prompt tokens get label -100
    packing: bool = False                 # several examples per row, no attention across them
    seed: int = 42
    demo_examples: int = 600              # per demo family
    # A row of a local file bigger than this is skipped (and counted) before it is parsed:
    # one huge row would otherwise take many GB in tokenization, only to be truncated.
    max_row_bytes: int = 1_000_000

    def __post_init__(self):
        if not isinstance(self.sources, list):
            raise UserError(f"data.sources={self.sources!r}: expected a list of sources")
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**_source_dict(s)) for s in self.sources]
        if not self.sources:
            raise UserError("data.sources: expected at least one source")
        labels = [s.label for s in self.sources]
        if len(set(labels)) != len(labels):
            raise UserError(f"data.sources: labels must be unique, got {labels}; set `label` to tell them apart")
        _choice(self, "stopping_strategy", ("first_exhausted", "all_exhausted"))
        _choice(self, "mbpp_split", ("random", "official"))
        _choice(self, "overlong", ("truncate", "drop"))
        for name in ("training_subset", "eval_subset"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 100:
                raise UserError(f"data.{name}={value!r}: expected a percentage in (0, 100]")
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 8:
            raise UserError(f"data.max_seq_length={self.max_seq_length!r}: expected an integer >= 8")
        check_fields(self, "data")
        if not 10 <= self.demo_examples <= MAX_DEMO_EXAMPLES:
            raise UserError(f"data.demo_examples={self.demo_examples!r}: expected an integer in [10, {MAX_DEMO_EXAMPLES}]")
        if self.max_row_bytes < 1:
            raise UserError(f"data.max_row_bytes={self.max_row_bytes!r}: expected an integer >= 1")
        if not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise UserError(f"data.seed={self.seed}: expected an integer in [0, 2**32 - 1]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _source_dict(s) -> dict:
    if isinstance(s, str):
        return {"name": s}
    if isinstance(s, dict):
        known = {f.name for f in dataclasses.fields(SourceConfig)}
        unknown = sorted(map(str, set(s) - known))
        if unknown:
            raise UserError(f"data.sources: unknown field(s) {unknown}; expected some of {sorted(known)}")
        if "name" not in s:
            raise UserError(f"data.sources: {s!r} has no name; expected one of {list(SOURCE_NAMES)}")
        return s
    raise UserError(f"data.sources: expected a source name or mapping, got {s!r}")


def _choice(cfg, name, options):
    if getattr(cfg, name) not in options:
        raise UserError(f"data.{name}={getattr(cfg, name)!r}: expected one of {list(options)}")
