"""Growing and pruning the experts of a DyLoRAMoE in place.

Every per-expert tensor stacks its experts along one axis: lora_A (E*r x in) by rows,
lora_B (out x E*r) by columns, each layer's own router (E x in, router_input="layer"),
the router's gate (E x hidden) and its per-expert buffers by rows. `expert_axes` lists them all, so growing, pruning, and widening an optimizer's
state (train/growth.py) are one slicing rule applied everywhere.

Why the outputs are unchanged when an expert is added, whatever its weights: B = 0 alone
is not enough, because the router's softmax would give the newcomer a share of every
gate and scale all the other experts' contributions down by it. So a new expert joins
with admission 0 (router.forward adds log(admission) to its logit): its gate is exactly
0 and the others' gates are the same softmax as before. Its admission then ramps to 1
over its first `maturity_steps` optimizer steps (admission.advance), so the mixture shifts
to it gradually instead of jumping at the first step.

Initial weights (`init`):
- "zeros": a fresh expert, as the constructor makes one: A kaiming-uniform, B = 0, a
  fresh router row. It starts as the base model. (B = 0: A gets no gradient on the
  expert's first step, as with any fresh LoRA.)
- "copy:i": expert i's A, B and router row: as it is admitted it behaves like expert i,
  then the two diverge (new data, or expert i frozen).
- "mean": the mean of every expert's A, B and router row.
The bookkeeping of a new expert (steps, maturity, novelty centroid) always starts empty.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .admission import PER_EXPERT_BUFFERS


@dataclass(frozen=True)
class ExpertAxis:
    module: nn.Module
    name: str            # a Parameter or buffer of `module`
    axis: int            # the dimension that stacks the experts
    width: int           # entries per expert along it: r for a LoRA stack, 1 for router rows
    fresh: Optional[Callable[[tuple, torch.Generator], torch.Tensor]] = None  # None: not learned, zeros

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def per_expert(self, t: torch.Tensor) -> torch.Tensor:
        """(.., E*width, ..) -> (.., E, width, ..): the experts on `axis`."""
        return t.unflatten(self.axis, (-1, self.width))

    def select(self, t: torch.Tensor, experts: list[int]) -> torch.Tensor:
        index = torch.tensor(experts, dtype=torch.long, device=t.device)
        return self.per_expert(t).index_select(self.axis, index).flatten(self.axis, self.axis + 1)


def expert_axes(moe) -> list[ExpertAxis]:
    """Every per-expert tensor of the mixture; learned ones in trainable_parameters order."""
    axes = []
    for layer in moe.experts.values():
        bound = 1.0 / math.sqrt(layer.in_features)  # the constructor's A (PEFT's kaiming-uniform)
        axes.append(ExpertAxis(layer, "lora_A", 0, layer.r,
                               lambda shape, g, b=bound: torch.empty(shape).uniform_(-b, b, generator=g)))
        axes.append(ExpertAxis(layer, "lora_B", 1, layer.r, lambda shape, g: torch.zeros(shape)))
        if layer.lora_router is not None:
            axes.append(ExpertAxis(layer, "lora_router", 0, 1,
                                   lambda shape, g: torch.empty(shape).normal_(0.0, 0.02, generator=g)))
    axes.append(ExpertAxis(moe.router.gate, "weight", 0, 1,
                           lambda shape, g: torch.empty(shape).normal_(0.0, 0.02, generator=g)))
    axes += [ExpertAxis(moe.router, name, 0, 1) for name in PER_EXPERT_BUFFERS]
    return axes


def parse_init(init: str, num_experts: int) -> tuple[str, Optional[int]]:
    """"zeros" | "mean" | "copy:i" -> (kind, i)."""
    if init in ("zeros", "mean"):
        return init, None
    match = re.fullmatch(r"copy:(\d+)", str(init))
    if match and int(match.group(1)) < num_experts:
        return "copy", int(match.group(1))
    raise ValueError(f"expert init {init!r}: expected 'zeros', 'mean' or 'copy:i' with i in 0..{num_experts - 1}")


def add_expert(moe, init: str = "zeros", seed: Optional[int] = None) -> int:
    """Append one expert to every per-expert tensor; returns its index.

    Random parts come from a generator seeded by `seed` (default: the new index), not
    from the global RNG: every rank of a distributed run draws the same expert, and the
    dropout stream is left as it was."""
    count = moe.config.num_experts
    kind, source = parse_init(init, count)
    generator = torch.Generator().manual_seed(count if seed is None else seed)
    for axis in expert_axes(moe):
        current = axis.get().detach()
        new = _new_slice(axis, current, kind, source, generator)
        _replace(axis, torch.cat([current, new.to(current)], dim=axis.axis))
    _set_count(moe, count + 1)
    return count


def prune_expert(moe, index: int) -> None:
    """Remove expert `index` from every per-expert tensor; the others keep their weights
    and order (experts after it move down by one)."""
    count = moe.config.num_experts
    if not 0 <= index < count:
        raise ValueError(f"expert index {index}: expected 0..{count - 1}")
    if count - 1 < moe.config.top_k:
        raise ValueError(f"cannot prune to {count - 1} expert(s): MoEConfig.top_k={moe.config.top_k} "
                         "needs at least that many")
    keep = [e for e in range(count) if e != index]
    for axis in expert_axes(moe):
        _replace(axis, axis.select(axis.get().detach(), keep))
    _set_count(moe, count - 1)


def _new_slice(axis: ExpertAxis, current, kind, source, generator) -> torch.Tensor:
    one = axis.select(current, [0])
    if axis.fresh is None:
        return torch.zeros_like(one)  # bookkeeping: no steps, immature, admission 0, no centroid
    if kind == "copy":
        return axis.select(current, [source]).clone()
    if kind == "mean":
        return axis.per_expert(current.float()).mean(dim=axis.axis)
    return axis.fresh(tuple(one.shape), generator)


def _replace(axis: ExpertAxis, value: torch.Tensor) -> None:
    old = axis.get()
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    setattr(axis.module, axis.name, value)  # a registered buffer stays registered


def _set_count(moe, count: int) -> None:
    for layer in moe.experts.values():
        layer.num_experts = count
    moe.router.num_experts = count
    moe.router.gate.out_features = count
    moe.config.num_experts = count
