"""How the router's probabilities become the experts' gates: one function, the same in
training and inference (noise > 0 only in training). See MoEConfig.gating."""
from __future__ import annotations

import torch

from ..errors import UserError
from .config import GATINGS


def gate_weights(logits: torch.Tensor, gating: str, top_k: int, noise: float = 0.0) -> torch.Tensor:
    """Router logits (..., E) -> expert weights (..., E).

    "dense": p = softmax(logits). "top_k": p on the top_k experts, 0 elsewhere, for every
    top_k (Switch Transformer: not renormalised, so the router learns through the kept p).
    "straight_through": 1/top_k on the top_k experts, with p's gradient."""
    if gating not in GATINGS:
        raise UserError(f"MoEConfig.gating={gating!r}: expected one of {GATINGS}")
    probs = logits.softmax(dim=-1)
    if gating == "dense":
        return probs
    choice = logits if noise == 0 else logits + noise * _gumbel(logits)
    kept = torch.zeros_like(probs).scatter(-1, choice.topk(top_k, dim=-1).indices, 1.0)
    if gating == "straight_through":
        # The value is exactly the hard choice (p - p.detach() is exactly 0); the gradient is p's.
        return kept / top_k + (probs - probs.detach())
    return probs * kept


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand_like(like).clamp_(torch.finfo(like.dtype).tiny, 1.0)
    return -torch.log(-torch.log(uniform))
