"""The load-balancing loss (Switch Transformer): E * sum_e f_e * P_e, f the share of
units whose top expert is e, P the mean gate. Its minimum, 1, is reached when both are
uniform; an expert nobody picks pulls it up through its P."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def balance_loss(gates: torch.Tensor, unit_mask: torch.Tensor | None) -> torch.Tensor:
    """gates: (B, U, E) with U = 1 (sequence), S (packed segments) or T (tokens);
    unit_mask: (B, U) which units are real, ignored when U = 1."""
    num_experts = gates.shape[-1]
    flat = gates.reshape(-1, num_experts).float()
    if gates.shape[1] > 1 and unit_mask is not None:
        flat = flat[unit_mask.reshape(-1).bool()]
    if flat.numel() == 0:
        return gates.new_zeros((), dtype=torch.float32)
    mean_gate = flat.mean(dim=0)
    share = F.one_hot(flat.argmax(dim=-1), num_experts).float().mean(dim=0)
    return num_experts * (share * mean_gate).sum()
