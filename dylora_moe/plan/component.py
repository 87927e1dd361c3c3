"""One row of a memory plan: what it is, how many bytes, where it lives."""
from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30


@dataclass
class Component:
    key: str
    label: str
    bytes: float
    where: str = "gpu"            # "gpu" | "cpu"
    in_peak: bool = True          # False: shown, but overlaps a larger one in time

    @property
    def gib(self) -> float:
        return self.bytes / GiB
