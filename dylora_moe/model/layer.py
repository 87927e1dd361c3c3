"""The stacked expert layer: E LoRA experts living inside one target Linear.

For a frozen base layer W and experts (A_e, B_e), stack A = [A_1; ...; A_E] (E*r x in)
and B = [B_1 ... B_E] (out x E*r). With gates g (batch, 1 or T, E):

    y = W x + (alpha / r) * B · ((A · dropout(x)) ⊙ repeat_each(g, r))

i.e. one LoRA of rank E*r with the gate applied in the middle: every expert is served by
the same base call and two small matmuls (docs/design.md). The base layer is only *called*,
never read, so nn.Linear, GPT-2's Conv1D and bitsandbytes 4/8-bit layers all work.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


class GateSlot:
    """The gates of the current forward pass, shared by every stacked layer of a model.

    The wrapper writes them once per forward (already repeated r times per expert,
    multiplied by the mixture's scale, which every layer shares, and cast to the
    activation dtype), so 70+ layers don't each redo that work, nor scale their outputs.
    They stay set after the forward on purpose: non-reentrant gradient checkpointing
    re-runs the layers during backward and must see the same gates.

    With routers in the layers (MoEConfig.router_input="layer") each layer computes its
    own gates from its input instead: `router` maps (input, the layer's router weight) to
    gates (..., E), `scale` is the mixture's scale, every layer's gates are kept in
    `recorded` (the wrapper's balance loss and statistics read them), and `routed_rows`
    (B, 1, 1), when set, says which rows route so; the others keep `expanded`.
    """

    def __init__(self) -> None:
        self.expanded: Optional[torch.Tensor] = None  # (batch, 1 or T, E*r); None = experts off
        self.enabled: bool = True
        self.in_layers: bool = False
        self.router = None
        self.scale: Optional[torch.Tensor] = None
        self.routed_rows: Optional[torch.Tensor] = None
        self.recorded: list[torch.Tensor] = []

    def active(self) -> Optional[torch.Tensor]:
        return self.expanded if self.enabled else None

    def route_here(self, x: torch.Tensor, weight: torch.Tensor, r: int, fixed: torch.Tensor) -> torch.Tensor:
        """One layer's own gates for its input x, expanded and scaled like `expanded`."""
        gates = self.router(x, weight)
        self.recorded.append(gates)
        expanded = (gates.repeat_interleave(r, dim=-1) * self.scale).to(fixed.dtype)
        if self.routed_rows is None:
            return expanded
        return torch.where(self.routed_rows, expanded, fixed)


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like layer, reading no weight data."""
    if isinstance(layer, nn.Linear):  # includes bitsandbytes Linear4bit / Linear8bitLt
        return layer.in_features, layer.out_features
    if is_conv1d(layer):  # GPT-2 style: weight is stored transposed, (in, out)
        return layer.weight.shape[0], layer.nf
    raise TypeError(f"{type(layer).__name__} is not a Linear-like layer")


def is_conv1d(layer: nn.Module) -> bool:
    return isinstance(layer, Conv1D)


def is_linear_like(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or is_conv1d(layer)


class StackedLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, num_experts: int, r: int, alpha: float,
                 dropout: float, slot: GateSlot, router: bool = False):
        super().__init__()
        in_features, out_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.num_experts, self.r, self.scaling = num_experts, r, alpha / r
        self.in_features, self.out_features = in_features, out_features
        device = _device_of(base_layer)
        # Adapters stay fp32 whatever the base dtype (as PEFT does): the optimizer updates
        # are small relative to the weights; autocast runs the matmuls in bf16 anyway.
        self.lora_A = nn.Parameter(torch.empty(num_experts * r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, num_experts * r, device=device))
        # Same distribution as PEFT's default A (kaiming-uniform, a=sqrt(5)) for each
        # expert; B = 0 so a fresh mixture is exactly the base model.
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.lora_A, -bound, bound)
        # This layer's own router (MoEConfig.router_input="layer"): one row per expert,
        # read from the layer's input, as MixLoRA and LoRAMoE route.
        self.lora_router = None
        if router:
            self.lora_router = nn.Parameter(torch.empty(num_experts, in_features, device=device))
            nn.init.normal_(self.lora_router, std=0.02)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._slot = slot  # a plain object, not a submodule: nothing to save

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        gates = self._slot.active()  # already scaled (GateSlot)
        if gates is None:
            return y
        if self.lora_router is not None and self._slot.in_layers:
            gates = self._slot.route_here(x, self.lora_router, self.r, gates)
        x = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            # A bf16 base with fp32 adapters and no autocast. Under autocast the matmul
            # casts x itself, and an fp32 copy of it would only be cast straight back.
            x = x.to(self.lora_A.dtype)
        delta = F.linear(F.linear(x, self.lora_A) * gates, self.lora_B)
        return y + delta.to(y.dtype)

    def expert_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_i, B_i): views of expert i's slice of the stacks."""
        s = slice(i * self.r, (i + 1) * self.r)
        return self.lora_A[s], self.lora_B[:, s]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"r={self.r}, scaling={self.scaling:g}, router={self.lora_router is not None}")


def _device_of(layer: nn.Module) -> torch.device:
    for p in layer.parameters():
        return p.device
    return torch.device("cpu")
