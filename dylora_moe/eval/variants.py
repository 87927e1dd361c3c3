"""Which mixture a user asked for: the router, one expert, an equal mix, the base, or gates
of their own. `generate` (--expert/--uniform/--base), `eval --compare` and `serve` (the
`model` field) all name a variant and turn it into gates here, so the three agree.

    resolve("routed", 4)    -> gates None: the router decides from the prompt
    resolve("expert-2", 4)  -> (0, 0, 1, 0)
    resolve("uniform", 4)   -> (0.25, 0.25, 0.25, 0.25)
    resolve("base", 4)      -> (0, 0, 0, 0): every expert's delta is exactly zero
    custom([3, 1, 0, 0], 4) -> (0.75, 0.25, 0, 0), validated and normalised
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import UserError

# "mixture" is what eval has always called the routed variant (its samples are keyed by it).
ROUTED = ("routed", "mixture")
_EXPERT = re.compile(r"expert-(\d+)")


@dataclass(frozen=True)
class Variant:
    name: str
    gates: Optional[tuple[float, ...]] = None  # None: the router decides from the prompt

    @property
    def routed(self) -> bool:
        return self.gates is None

    @property
    def is_base(self) -> bool:
        return self.gates is not None and not any(self.gates)

    def tensor(self) -> torch.Tensor:
        """The fixed gates as an (E,) fp32 tensor (routed variants have none)."""
        if self.gates is None:
            raise ValueError(f"variant {self.name!r} is routed: its gates come from the router")
        return torch.tensor(self.gates, dtype=torch.float32)


def names(num_experts: int) -> list[str]:
    """Every variant of a mixture of `num_experts`, routed first."""
    return ["routed", *(f"expert-{i}" for i in range(num_experts)), "uniform", "base"]


def resolve(name: str, num_experts: int) -> Variant:
    """The gates a variant name stands for; ValueError naming the choices otherwise."""
    if name in ROUTED:
        return Variant(name)
    if name == "uniform":
        return Variant(name, (1.0 / num_experts,) * num_experts)
    if name == "base":
        return Variant(name, (0.0,) * num_experts)
    match = _EXPERT.fullmatch(name)
    if match and int(match.group(1)) < num_experts:
        index = int(match.group(1))
        return Variant(name, tuple(float(e == index) for e in range(num_experts)))
    raise UserError(f"variant {name!r}: expected one of routed, expert-0..expert-{num_experts - 1}, uniform, base")


def custom(gates: Sequence[float], num_experts: int, name: str = "gates") -> Variant:
    """Gates a user gave: E finite values >= 0 with a positive sum, normalised to sum 1."""
    values = [float(g) for g in gates]
    if len(values) != num_experts:
        raise UserError(f"{name}: expected {num_experts} values (one per expert), got {len(values)}")
    if not all(math.isfinite(g) for g in values):
        raise UserError(f"{name}: expected finite numbers, got {values}")
    if any(g < 0 for g in values):
        raise UserError(f"{name}: expected values >= 0, got {values}")
    total = sum(values)
    if not total > 0:
        raise UserError(f"{name}: expected a positive sum (all zeros is the base: use the base variant)")
    return Variant(name, tuple(g / total for g in values))


def gate_context(moe, variant: Variant):
    """Around `moe.generate` or a forward: fixed gates replace the router; the base
    variant switches the experts off (the same output as zero gates, without their cost)."""
    if variant.routed:
        return contextlib.nullcontext()
    if variant.is_base:
        return moe.experts_disabled()
    return moe.override_gates(variant.tensor())
