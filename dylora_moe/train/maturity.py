"""Maturity and freezing of experts during training.

After every optimizer step the experts that trained take one step of their own
(`DyLoRAMoE.advance_maturity`): an added expert's admission ramps up and it matures after
`moe.maturity_steps` of them. With `train.freeze_mature_experts`, a mature expert's A and B
stop changing (continual learning: new data trains only the new experts and the router,
whose every row keeps learning: it has to route the new data).

Freezing has two parts, and both are needed because the experts share stacked tensors
(a slice cannot be set requires_grad=False):
- a gradient hook zeroes the frozen experts' slices of every gradient before DDP or
  DeepSpeed reduce it, so they take no part in clipping or in the others' updates;
- after each optimizer step their slices are written back from a snapshot: Adam's
  momentum from earlier steps and decoupled weight decay would still move them. Under
  ZeRO the snapshot also goes into this rank's fragment of DeepSpeed's fp32 master
  copy, which is what the next step starts from.
With the base sharded (ZeRO-3, FSDP2) the experts are partitioned too: snapshots are
gathered, and the write-back goes through the backend (sharding.write_full). FSDP2
computes gradients for its gathered copy of each parameter, never for the DTensor
shard the model holds, so a hook on the shard would not fire: there the frozen slices
of the reduced gradients are zeroed before clipping (`mask_gradients`).
"""
from __future__ import annotations

import logging

import torch

from ..model.growth import expert_axes
from ..model.layer import StackedLoRALinear
from . import sharding

logger = logging.getLogger(__name__)


class ExpertFreezer:
    def __init__(self, moe, enabled: bool):
        self.enabled = enabled
        self.attach(moe)

    def attach(self, moe) -> None:
        """(Re)bind to the model's current tensors: at the start and after every growth."""
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        self.moe = moe
        # The experts' A and B; the routers keep learning (they must route the new data).
        self.axes = [a for a in expert_axes(moe) if isinstance(a.module, StackedLoRALinear)
                     and a.name in ("lora_A", "lora_B")]
        self.frozen = torch.zeros(moe.config.num_experts, dtype=torch.bool)
        self.snapshots: list[torch.Tensor | None] = [None] * len(self.axes)
        # FSDP2 shards (DTensor) never receive a gradient through autograd: mask_gradients instead.
        self._hooks = [a.get().register_hook(self._masker(i)) for i, a in enumerate(self.axes)
                       if not sharding.is_dtensor(a.get())] if self.enabled else []
        self.update()

    @property
    def trained(self) -> torch.Tensor:
        """Which experts the last optimizer step updated (bool per expert)."""
        return ~self.frozen

    def update(self) -> list[int]:
        """Freeze the experts that are mature now (when enabled); returns the newly frozen."""
        if not self.enabled:
            return []
        mature = self.moe.router.expert_maturity.detach().cpu().bool()
        new = (mature & ~self.frozen).nonzero().flatten().tolist()
        if not new:
            return []
        # Snapshot the exact fp32 values: under ZeRO the module copy may be bf16 and the
        # master copy lives, partitioned, in DeepSpeed's optimizer.
        for i, axis in enumerate(self.axes):
            full = full_fp32(axis.get())
            self.snapshots[i] = full if self.snapshots[i] is None else torch.where(
                self._mask(axis, self.frozen, full), self.snapshots[i], full)
        self.frozen |= mature
        if bool(self.frozen.all()):
            logger.warning("train.freeze_mature_experts: every expert is mature and frozen; only the router trains "
                           "(add experts: --num_experts, or grow_on_novelty)")
        return new

    @torch.no_grad()
    def restore(self) -> None:
        """After an optimizer step: put the frozen experts' slices back exactly."""
        if not bool(self.frozen.any()):
            return
        for axis, snapshot in zip(self.axes, self.snapshots):
            param = axis.get()
            if sharding.is_partitioned(param):
                current = full_fp32(param)
                mask = self._mask(axis, self.frozen, current)
                sharding.write_full(param, torch.where(mask, snapshot.to(current), current))
                continue
            mask = self._mask(axis, self.frozen, param)
            param.data.copy_(torch.where(mask, snapshot.to(param.device, param.dtype), param.data))
            _restore_zero_fragment(param, mask, snapshot)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the frozen experts' slices of the reduced FSDP2 gradients (DTensor shards),
        before clipping and the optimizer step; elsewhere the gradient hooks did it."""
        if not self.enabled or not bool(self.frozen.any()):
            return
        for axis in self.axes:
            grad = axis.get().grad
            if grad is None or not sharding.is_dtensor(grad):
                continue
            from torch.distributed.tensor import distribute_tensor

            keep = (~self._mask(axis, self.frozen, grad)).to(grad.dtype).expand(grad.shape).contiguous()
            grad.mul_(distribute_tensor(keep, grad.device_mesh, grad.placements))

    def _masker(self, index: int):
        axis = self.axes[index]

        def hook(grad):
            if not bool(self.frozen.any()):
                return None
            return grad * (~self._mask(axis, self.frozen, grad)).to(grad.dtype)
        return hook

    @staticmethod
    def _mask(axis, experts: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-expert flags broadcast over `like`, along the stacking axis."""
        flags = experts.to(like.device).repeat_interleave(axis.width)
        shape = [1] * like.dim()
        shape[axis.axis] = flags.numel()
        return flags.view(shape)


def full_fp32(param: torch.Tensor) -> torch.Tensor:
    """A detached fp32 copy of a parameter's exact value: under ZeRO DeepSpeed's master
    copy (a collective: every rank calls it, also one that owns none of it), under FSDP2
    the gathered shards, else the parameter itself (the module copy may be bf16 under ZeRO)."""
    if sharding.is_partitioned(param):
        return sharding.full_value(param).float()
    if hasattr(param, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().clone()
    return param.detach().float().clone()


def _restore_zero_fragment(param, mask: torch.Tensor, snapshot: torch.Tensor) -> None:
    """Write the frozen values into the part of DeepSpeed's fp32 master copy this rank
    owns (local; the same fragment safe_set_full_fp32_param writes)."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return
    address = mapping.lp_fragment_address
    part = slice(address.start, address.start + address.numel)
    fragment = mapping.get_hp_fragment()
    flat_mask = mask.expand_as(param).reshape(-1)[part].to(fragment.device)
    fragment.copy_(torch.where(flat_mask, snapshot.reshape(-1)[part].to(fragment), fragment))
