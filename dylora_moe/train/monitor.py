"""What the loop reports: routing statistics, per-expert gradient norms, metrics.jsonl,
Accelerate trackers and the expert-usage-by-source heat-map."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..model.packing import segment_validity
from ..model.pooling import per_example_gates


class RoutingStats:
    """Running sums over one logging window, on the device (local to a rank until `reduced`)."""

    def __init__(self, num_experts: int, num_sources: int, device):
        self.gate_sum = torch.zeros(num_experts, device=device, dtype=torch.float64)
        self.top1 = torch.zeros(num_experts, device=device, dtype=torch.float64)
        self.entropy = torch.zeros((), device=device, dtype=torch.float64)
        self.units = torch.zeros((), device=device, dtype=torch.float64)
        self.by_source = torch.zeros(num_sources, num_experts, device=device, dtype=torch.float64)
        self.source_units = torch.zeros(num_sources, device=device, dtype=torch.float64)

    @torch.no_grad()
    def add(self, gates: torch.Tensor, batch: dict, keep: Optional[torch.Tensor] = None) -> None:
        """gates (B, U, E) (one unit per sequence / packed example / token) of `batch`.
        `keep`: a bool on the device, False for a micro-batch whose loss was not finite.
        Masks, never boolean indexing or bincount: those read a size back to the host,
        and this runs every micro-batch."""
        segment_ids = batch.get("segment_ids")
        per_example = per_example_gates(gates.detach().double(), batch["attention_mask"], segment_ids)  # (B, S, E)
        num_experts = per_example.shape[-1]
        if segment_ids is not None:  # packed: one source per example, -1 where a row holds fewer
            valid = segment_validity(segment_ids, per_example.shape[1])
        else:
            valid = torch.ones(per_example.shape[:2], dtype=torch.bool, device=per_example.device)
        if keep is not None:
            valid = valid & keep
        weight = valid.to(per_example.dtype).unsqueeze(-1)  # (B, S, 1)
        per_unit = torch.where(valid.unsqueeze(-1), per_example, 0.0)  # a dropped unit's NaN must not reach the sums
        self.gate_sum += per_unit.sum(dim=(0, 1))
        self.top1 += (F.one_hot(per_example.argmax(-1), num_experts).double() * weight).sum(dim=(0, 1))
        self.entropy += -(per_unit.clamp_min(1e-12).log() * per_unit).sum()
        self.units += weight.sum()
        source_id = batch.get("source_id")
        if source_id is not None:
            index = (source_id if segment_ids is not None else source_id.unsqueeze(1)).clamp_min(0).reshape(-1)
            self.by_source.index_add_(0, index, per_unit.reshape(-1, num_experts))
            self.source_units.index_add_(0, index, weight.reshape(-1))

    def reduced(self, accelerator) -> dict:
        tensors = [self.gate_sum, self.top1, self.entropy.view(1), self.units.view(1), self.by_source.flatten(),
                   self.source_units]
        flat = accelerator.reduce(torch.cat([t.flatten() for t in tensors]), reduction="sum")
        e, s = len(self.gate_sum), len(self.source_units)
        gate_sum, top1, entropy, units = flat[:e], flat[e:2 * e], flat[2 * e], flat[2 * e + 1]
        by_source = flat[2 * e + 2: 2 * e + 2 + s * e].view(s, e)
        source_units = flat[2 * e + 2 + s * e:]
        n = max(units.item(), 1.0)
        return {"gate_mean": (gate_sum / n).tolist(), "usage_top1": (top1 / n).tolist(),
                "router_entropy": entropy.item() / n,
                "gate_mean_by_source": (by_source / source_units.clamp_min(1).unsqueeze(1)).tolist()}


def expert_grad_norms(moe, num_experts: int, is_deepspeed: bool) -> list[float]:
    """L2 norm of each expert's gradient over all its layers (A and B slices).

    Under ZeRO-2/3 `param.grad` is None or a partition: deepspeed's safe_get_full_grad
    assembles the full reduced gradient; under FSDP2 it is a DTensor shard, gathered
    (both collectives: every rank must call this)."""
    if is_deepspeed:
        from deepspeed.utils import safe_get_full_grad as full_grad
    else:
        from .sharding import full_grad
    squares = torch.zeros(num_experts, dtype=torch.float64)
    for layer in moe.experts.values():
        r = layer.r
        for param, axis in ((layer.lora_A, 0), (layer.lora_B, 1)):
            grad = full_grad(param)
            if grad is None:
                continue
            per_expert = grad.detach().double().unflatten(axis, (num_experts, r))
            dims = [d for d in range(per_expert.dim()) if d != axis]
            squares += per_expert.pow(2).sum(dim=dims).cpu()
    return squares.sqrt().tolist()


class MetricsLog:
    """metrics.jsonl on the main process (always), plus Accelerate trackers."""

    def __init__(self, accelerator, path: Path):
        self.accelerator, self.path = accelerator, Path(path)

    def log(self, record: dict, step: int) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")
        scalars = {k: v for k, v in flatten(record).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.accelerator.log(scalars, step=step)


def flatten(record: dict, sep: str = "/", prefix: str = "") -> dict:
    """Nested dicts (and lists of numbers) as one level of `a/b/0` keys: what trackers take."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, sep, name + sep))
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{name}{sep}{i}": v for i, v in enumerate(value)})
        else:
            out[name] = value
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
