"""The router: a linear gate hidden -> E over normalised routing features, and the
gating that turns its probabilities into the experts' gates (model/gating.py), one
function for training and inference.

It holds routing only. Its per-expert buffers (maturity, admission, the novelty
library) are registered here so that they save as `router.<name>`, but their rules are
model/admission.py's; the k-means start is model/kmeans.py, the balance loss
model/balance.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import admission
from .gating import gate_weights


class LinearRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, temperature: float = 1.0,
                 gating: str = "dense", noise: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.temperature = num_experts, top_k, temperature
        self.gating, self.noise = gating, noise
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        admission.register_buffers(self, num_experts, hidden_size)
        # Subtracted from the normalised features before the gate (zeros: none). A k-means
        # init centres them on the training data, so the rows can point at clusters.
        self.register_buffer("feature_center", torch.zeros(hidden_size))

    def logits(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        # Gate math in fp32 whatever autocast says: a bf16 softmax over near-equal logits
        # flips top-k choices. Features are normalised (no parameters) so the temperature
        # means the same for embeddings and final hidden states of any scale.
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()
            if weight is not None:  # a layer's own router: its input, not centred
                return F.linear(F.layer_norm(x, x.shape[-1:]), weight.float())
            x = F.layer_norm(x, x.shape[-1:]) - self.feature_center.float()
            return F.linear(x, self.gate.weight.float())

    def forward(self, features: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """features (..., hidden) -> gates (..., E), fp32. `weight`: a layer's own router
        rows (E, in) in place of the gate's (MoEConfig.router_input="layer"); the
        temperature, admission and gating are the mixture's either way."""
        # log(1) = 0 leaves admitted experts bitwise as they were; log(0) = -inf gives an
        # expert just added a gate of exactly 0 (the others renormalise over the same sum).
        logits = self.logits(features, weight) / self.temperature + self.expert_admission.float().log()
        return gate_weights(logits, self.gating, self.top_k, self.noise if self.training else 0.0)
