"""The router (DESIGN §3): a linear gate hidden -> E, dense while training, sparse in eval.

Pure functions for pooling and the balance loss live here too, so the wrapper only
decides *what* to route on, not *how*.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DynamicHybridRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1,
                 temperature: float = 2.0, mature: bool = True):
        super().__init__()
        self.num_experts, self.top_k, self.temperature = num_experts, top_k, temperature
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        # Per-expert maturity: any immature expert (e.g. one just added) keeps routing
        # dense even in eval, so it is never starved by top-k before it has learnt.
        self.register_buffer("expert_maturity", torch.full((num_experts,), mature, dtype=torch.bool))
        # Dynamic experts (#8), all saved with the model: optimizer steps each expert has
        # trained; its admission a in [0, 1], a prior on its gate (softmax(logits/T + log a)),
        # 0 for an expert just added so the mixture is unchanged at that moment, rising to 1
        # as it matures; and the novelty library: per expert, the mean pooled embedding of
        # the examples it trained on (a count of 0 = no entry yet).
        self.register_buffer("expert_steps", torch.zeros(num_experts, dtype=torch.long))
        self.register_buffer("expert_admission", torch.ones(num_experts))
        self.register_buffer("expert_centroids", torch.zeros(num_experts, hidden_size))
        self.register_buffer("centroid_counts", torch.zeros(num_experts, dtype=torch.long))

    @property
    def sparse(self) -> bool:
        return not self.training and bool(self.expert_maturity.all())

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        # Gate math in fp32 whatever autocast says: a bf16 softmax over near-equal logits
        # flips top-k choices. Features are normalised (no parameters) so the temperature
        # means the same for embeddings and final hidden states of any scale.
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()
            x = F.layer_norm(x, x.shape[-1:])
            return F.linear(x, self.gate.weight.float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (..., hidden) -> gates (..., E), fp32, each row summing to 1."""
        # log(1) = 0 leaves admitted experts bitwise as they were; log(0) = -inf gives an
        # expert just added a gate of exactly 0 (the others renormalise over the same sum).
        logits = self.logits(features) / self.temperature + self.expert_admission.float().log()
        if not self.sparse:
            return logits.softmax(dim=-1)
        top = logits.topk(self.top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(dim=-1))


    @torch.no_grad()
    def advance(self, trained: torch.Tensor, maturity_steps: int) -> list[int]:
        """One optimizer step done: count it for the experts that trained (bool (E,)).
        An immature expert's admission ramps linearly to 1 over `maturity_steps` of its
        own steps, and it matures when it gets there. Returns the experts that matured now."""
        trained = trained.to(self.expert_steps.device)
        self.expert_steps += trained.long()
        ramp = (self.expert_steps.float() / maturity_steps).clamp(max=1.0)
        growing = trained & ~self.expert_maturity
        self.expert_admission.copy_(torch.where(growing, torch.maximum(self.expert_admission.float(), ramp),
                                                self.expert_admission.float()))
        matured = growing & (self.expert_steps >= maturity_steps)
        self.expert_maturity |= matured
        return matured.nonzero().flatten().tolist()

    @torch.no_grad()
    def mark_mature(self, index: int) -> None:
        self.expert_maturity[index] = True
        self.expert_admission[index] = 1.0


# Router buffers a model saved before #8 lacks; loading keeps their defaults (above).
OPTIONAL_BUFFERS = ("expert_steps", "expert_admission", "expert_centroids", "centroid_counts")


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of each row: (B, T, H), (B, T) -> (B, 1, H)."""
    m = mask.to(features.dtype).unsqueeze(-1)
    return (features * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def segment_mean(features: torch.Tensor, mask: torch.Tensor, segment_ids: torch.Tensor,
                 num_segments: int) -> torch.Tensor:
    """Mean over the masked positions of each packed segment: -> (B, S, H).
    segment_ids (B, T) numbers the examples of a row 0..S-1 and is -1 on padding."""
    batch, _, hidden = features.shape
    weight = (mask.bool() & (segment_ids >= 0)).to(features.dtype)
    index = segment_ids.clamp_min(0)
    sums = features.new_zeros(batch, num_segments, hidden).scatter_add_(
        1, index.unsqueeze(-1).expand(-1, -1, hidden), features * weight.unsqueeze(-1))
    counts = features.new_zeros(batch, num_segments).scatter_add_(1, index, weight)
    return sums / counts.clamp_min(1.0).unsqueeze(-1)


def packed_prefixes(unit_mask: torch.Tensor, segment_ids: torch.Tensor, position_ids: torch.Tensor):
    """The tokens a packed row's routing pass needs: each segment's tokens up to its last
    pooled one, moved to the front of the row in order (a causal model's hidden state
    there depends on nothing later, so the answers can go). Returns the positions kept
    (B, W), a validity mask (B, W) and position_ids (B, W) for the compacted rows, whose
    tail restarts at 0 so that, like the collator's padding, it is a sequence of its own.
    With Alpaca-style prompts at ~60% of the tokens this drops ~40% of the pass."""
    batch, width = segment_ids.shape
    cols = torch.arange(width, device=segment_ids.device).expand(batch, width)
    segment = segment_ids.clamp_min(0)
    pooled = unit_mask.bool() & (segment_ids >= 0)
    last = torch.full((batch, int(segment_ids.max()) + 1), -1, device=cols.device).scatter_reduce(
        1, segment, torch.where(pooled, cols, -1), "amax")
    keep = (segment_ids >= 0) & (cols <= last.gather(1, segment))
    counts = keep.sum(dim=1, keepdim=True)
    kept = max(int(counts.max()), 1)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :kept]
    slot = torch.arange(kept, device=cols.device).expand(batch, kept)
    valid = slot < counts
    positions = torch.where(valid, position_ids.gather(1, order), slot - counts)
    return order, valid, positions


def expand_segments(gates: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Per-segment gates (B, S, E) -> per-token gates (B, T, E); padding gets zeros (base only)."""
    index = segment_ids.clamp_min(0).unsqueeze(-1).expand(-1, -1, gates.shape[-1])
    return gates.gather(1, index) * (segment_ids >= 0).unsqueeze(-1).to(gates.dtype)


def segment_validity(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(B, S) True where row b really has a segment s (rows hold different counts)."""
    per_row = segment_ids.max(dim=1, keepdim=True).values + 1
    return torch.arange(num_segments, device=segment_ids.device).unsqueeze(0) < per_row


def balance_loss(gates: torch.Tensor, unit_mask: torch.Tensor | None, kind: str = "mse") -> torch.Tensor:
    """Load-balancing loss over the routed units (sequences or tokens).

    gates: (B, U, E) with U = 1 (sequence), S (packed segments) or T (tokens);
    unit_mask: (B, U) which units are real, ignored when U = 1.
    "mse": MSE(mean gate per expert, 1/E), the original's. "switch": E * sum_e f_e * P_e
    (Switch Transformer), f = share of units whose top expert is e, P = mean gate.
    """
    num_experts = gates.shape[-1]
    flat = gates.reshape(-1, num_experts).float()
    if gates.shape[1] > 1 and unit_mask is not None:
        flat = flat[unit_mask.reshape(-1).bool()]
    if flat.numel() == 0:
        return gates.new_zeros((), dtype=torch.float32)
    mean_gate = flat.mean(dim=0)
    if kind == "mse":
        return F.mse_loss(mean_gate, torch.full_like(mean_gate, 1.0 / num_experts))
    share = F.one_hot(flat.argmax(dim=-1), num_experts).float().mean(dim=0)
    return num_experts * (share * mean_gate).sum()
