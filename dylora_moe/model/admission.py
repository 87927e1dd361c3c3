"""Growth bookkeeping: the router's per-expert buffers and how they move.

An expert added by growth joins immature with admission 0, a prior on its gate
(softmax(logits / T + log a)), so the mixture is unchanged at that moment; each optimizer
step it trains raises its admission linearly to 1 over `maturity_steps` of its own steps,
and it matures when it gets there (model/growth.py says why B = 0 alone is not enough).
The buffers live on the router, whose forward reads the admission, and are saved with
it under `router.<name>`; the novelty library (expert_centroids, centroid_counts) is
train/novelty.py's.
"""
from __future__ import annotations

import torch
from torch import nn

# The router's per-expert buffers (an entry or row per expert, saved with the model);
# growth and pruning slice them with the experts (model/growth.py).
PER_EXPERT_BUFFERS = ("expert_maturity", "expert_steps", "expert_admission", "expert_centroids", "centroid_counts")
# Buffers a model saved without dynamic experts or k-means init lacks; loading keeps their defaults.
OPTIONAL_BUFFERS = PER_EXPERT_BUFFERS[1:] + ("feature_center",)


def register_buffers(router: nn.Module, num_experts: int, hidden_size: int) -> None:
    """Every initial expert mature and fully admitted, no steps, an empty novelty library
    (a count of 0 = no entry yet: per expert, the mean pooled embedding of its examples)."""
    router.register_buffer("expert_maturity", torch.ones(num_experts, dtype=torch.bool))
    router.register_buffer("expert_steps", torch.zeros(num_experts, dtype=torch.long))
    router.register_buffer("expert_admission", torch.ones(num_experts))
    router.register_buffer("expert_centroids", torch.zeros(num_experts, hidden_size))
    router.register_buffer("centroid_counts", torch.zeros(num_experts, dtype=torch.long))


@torch.no_grad()
def advance(router: nn.Module, trained: torch.Tensor, maturity_steps: int) -> list[int]:
    """One optimizer step done: count it for the experts that trained (bool (E,)).
    An immature expert's admission ramps linearly to 1 over `maturity_steps` of its
    own steps, and it matures when it gets there. Returns the experts that matured now."""
    trained = trained.to(router.expert_steps.device)
    router.expert_steps += trained.long()
    ramp = (router.expert_steps.float() / maturity_steps).clamp(max=1.0)
    growing = trained & ~router.expert_maturity
    router.expert_admission.copy_(torch.where(growing, torch.maximum(router.expert_admission.float(), ramp),
                                              router.expert_admission.float()))
    matured = growing & (router.expert_steps >= maturity_steps)
    router.expert_maturity |= matured
    return matured.nonzero().flatten().tolist()


@torch.no_grad()
def mark_mature(router: nn.Module, index: int) -> None:
    """Mature and fully admitted now."""
    router.expert_maturity[index] = True
    router.expert_admission[index] = 1.0
