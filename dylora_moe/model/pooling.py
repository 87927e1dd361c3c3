"""Pooling routing features or gates over the units of a batch: a row's prompt, each
packed example of a row (segment), or the real tokens of an example."""
from __future__ import annotations

import torch


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


def per_example_gates(gates: torch.Tensor, attention_mask: torch.Tensor,
                      segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each example's mean gates, (B, S, E): S = 1 for unpacked rows, the packed examples
    of a row otherwise (zeros where a row holds fewer; packing.segment_validity says which).
    gates (B, U, E) per sequence (U = 1), per packed example (U = S) or per token (U = T);
    token gates are averaged over the example's real tokens, never its padding."""
    if gates.shape[1] == 1 or (segment_ids is not None and gates.shape[1] != segment_ids.shape[1]):
        return gates  # already one unit per example
    if segment_ids is None:
        return masked_mean(gates, attention_mask[:, -gates.shape[1]:])
    return segment_mean(gates, attention_mask, segment_ids, int(segment_ids.max()) + 1)
