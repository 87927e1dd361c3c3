"""Packed rows (several examples per row, segment_ids numbering them, -1 on padding):
the routing pass's compacted rows, per-segment gates spread to tokens, and which
segments a row really holds."""
from __future__ import annotations

import torch


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
