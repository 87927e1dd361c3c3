"""The router: a linear gate hidden -> E over normalised routing features, and how its
probabilities become the experts' gates (`gate_weights`, one function for training and
inference).

Pure functions for pooling and the balance loss live here too, so the wrapper only
decides *what* to route on, not *how*.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DynamicHybridRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, temperature: float = 1.0,
                 mature: bool = True, gating: str = "dense", noise: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.temperature = num_experts, top_k, temperature
        self.gating, self.noise = gating, noise
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=0.02)
        # Per-expert maturity: any immature expert (e.g. one just added) keeps routing
        # dense even in eval, so it is never starved by top-k before it has learnt.
        self.register_buffer("expert_maturity", torch.full((num_experts,), mature, dtype=torch.bool))
        # Dynamic experts, all saved with the model: optimizer steps each expert has
        # trained; its admission a in [0, 1], a prior on its gate (softmax(logits/T + log a)),
        # 0 for an expert just added so the mixture is unchanged at that moment, rising to 1
        # as it matures; and the novelty library: per expert, the mean pooled embedding of
        # the examples it trained on (a count of 0 = no entry yet).
        self.register_buffer("expert_steps", torch.zeros(num_experts, dtype=torch.long))
        self.register_buffer("expert_admission", torch.ones(num_experts))
        self.register_buffer("expert_centroids", torch.zeros(num_experts, hidden_size))
        self.register_buffer("centroid_counts", torch.zeros(num_experts, dtype=torch.long))
        # Subtracted from the normalised features before the gate (zeros: none). A k-means
        # init centres them on the training data, so the rows can point at clusters.
        self.register_buffer("feature_center", torch.zeros(hidden_size))

    @property
    def sparse(self) -> bool:
        """dense_train_top_k_eval only: top-k in eval once every expert is mature."""
        return not self.training and bool(self.expert_maturity.all())

    @property
    def infers_as_trained(self) -> bool:
        """Whether eval-mode gates are the training gates (without training's noise)."""
        return self.gating != "dense_train_top_k_eval" or not bool(self.expert_maturity.all())

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
        gating = self.gating
        if gating == "dense_train_top_k_eval":
            gating = "top_k_renormalised" if self.sparse else "dense"
        return gate_weights(logits, gating, self.top_k, self.noise if self.training else 0.0)

    @torch.no_grad()
    def init_from_clusters(self, features: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
        """Point expert e's row at the e-th spherical k-means cluster of `features` (N, H),
        routing features of training units as the router sees them. The features are
        normalised as in `logits` and centred on their mean (kept in feature_center), so
        a unit at a typical distance from the centre gets logit `scale` * cos(unit, centroid).
        Returns the cluster sizes."""
        x = F.layer_norm(features.float(), features.shape[-1:])
        center = x.mean(dim=0)
        x = x - center
        centroids, assignment = spherical_kmeans(F.normalize(x, dim=-1), self.num_experts, seed)
        self.feature_center.copy_(center)
        self.gate.weight.copy_(centroids * (scale / x.norm(dim=-1).mean().clamp_min(1e-6)))
        return torch.bincount(assignment, minlength=self.num_experts)


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


def gate_weights(logits: torch.Tensor, gating: str, top_k: int, noise: float = 0.0) -> torch.Tensor:
    """Router logits (..., E) -> expert weights (..., E), the same function in training and
    inference (noise > 0 only in training). See MoEConfig.gating for the modes.
    "top_k_renormalised" is the inference half of dense_train_top_k_eval."""
    probs = logits.softmax(dim=-1)
    if gating == "dense":
        return probs
    choice = logits if noise == 0 else logits + noise * _gumbel(logits)
    kept = torch.zeros_like(probs).scatter(-1, choice.topk(top_k, dim=-1).indices, 1.0)
    if gating == "straight_through":
        # The value is exactly the hard choice (p - p.detach() is exactly 0); the gradient is p's.
        return kept / top_k + (probs - probs.detach())
    if gating == "top_k_renormalised" or top_k > 1:  # Mixtral: p renormalised over the kept
        weights = probs * kept
        return weights / weights.sum(dim=-1, keepdim=True)
    if gating == "top_k":  # top-1 at p_i itself (Switch Transformer): the router learns through it
        return probs * kept
    raise ValueError(f"gating {gating!r}: expected one of dense, top_k, straight_through")


def _gumbel(like: torch.Tensor) -> torch.Tensor:
    uniform = torch.rand_like(like).clamp_(torch.finfo(like.dtype).tiny, 1.0)
    return -torch.log(-torch.log(uniform))


def spherical_kmeans(points: torch.Tensor, k: int, seed: int, iterations: int = 100):
    """k-means on the unit sphere (cosine similarity) of unit-norm `points` (N, H), seeded
    k-means++ style from `seed`, so every rank and every rerun finds the same clusters.
    Returns (unit centroids (k, H), assignment (N,)). Written out rather than taken from
    scikit-learn: twenty lines, on whatever device the features are, with no new dependency."""
    generator = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    for _ in range(1, k):
        nearest = (points @ points[chosen].T).max(dim=1).values
        weight = (1.0 - nearest).clamp_min(0.0).cpu() ** 2
        weight = weight if weight.sum() > 0 else torch.ones(n)
        chosen.append(int(torch.multinomial(weight, 1, generator=generator)))
    centroids = points[chosen].clone()
    for _ in range(iterations):
        assignment = (points @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        empty = torch.bincount(assignment, minlength=k) == 0
        updated = torch.where(empty.unsqueeze(1), centroids, F.normalize(sums, dim=-1))
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids, (points @ centroids.T).argmax(dim=1)


# The router's per-expert buffers (an entry or row per expert, saved with the model);
# growth and pruning slice them with the experts (model/growth.py).
PER_EXPERT_BUFFERS = ("expert_maturity", "expert_steps", "expert_admission", "expert_centroids", "centroid_counts")
# Buffers a model saved without dynamic experts or k-means init lacks; loading keeps their defaults.
OPTIONAL_BUFFERS = PER_EXPERT_BUFFERS[1:] + ("feature_center",)


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


def per_example_gates(gates: torch.Tensor, attention_mask: torch.Tensor,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each example's mean gates, (B, S, E): S = 1 for unpacked rows, the packed examples
    of a row otherwise (zeros where a row holds fewer; segment_validity says which).
    gates (B, U, E) per sequence (U = 1), per packed example (U = S) or per token (U = T);
    token gates are averaged over the example's real tokens, never its padding."""
    if gates.shape[1] == 1 or (segment_ids is not None and gates.shape[1] != segment_ids.shape[1]):
        return gates  # already one unit per example
    if segment_ids is None:
        return masked_mean(gates, attention_mask[:, -gates.shape[1]:])
    return segment_mean(gates, attention_mask, segment_ids, int(segment_ids.max()) + 1)


def segment_validity(segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(B, S) True where row b really has a segment s (rows hold different counts)."""
    per_row = segment_ids.max(dim=1, keepdim=True).values + 1
    return torch.arange(num_segments, device=segment_ids.device).unsqueeze(0) < per_row


def balance_loss(gates: torch.Tensor, unit_mask: torch.Tensor | None, kind: str = "mse") -> torch.Tensor:
    """Load-balancing loss over the routed units (sequences or tokens).

    gates: (B, U, E) with U = 1 (sequence), S (packed segments) or T (tokens);
    unit_mask: (B, U) which units are real, ignored when U = 1.
    "mse": MSE(mean gate per expert, 1/E). "switch": E * sum_e f_e * P_e
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
