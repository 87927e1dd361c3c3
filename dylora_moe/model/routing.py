"""What the router routes on, and the no-grad routing pass (docs/design.md, "Routing").

The router sees one unit per sequence (its prompt pooled), per packed example, or per
token; `routing_mask` says which tokens count, `unit_features` builds the features:
the input embeddings, or the base's final hidden states from a pass with the experts off.
"""
from __future__ import annotations

import inspect

import torch

from .loss import IGNORE_INDEX
from .packing import packed_prefixes
from .pooling import masked_mean, segment_mean


def routing_mask(routing: str, attention_mask: torch.Tensor, labels=None, prompt_mask=None) -> torch.Tensor:
    """Which tokens the router looks at.

    Sequence routing pools over the prompt only, so training routes on exactly what
    generation sees. The prompt is `prompt_mask` when given, else the attended tokens
    without a label; a row with neither falls back to all its attended tokens.
    Token routing routes every attended token.
    """
    attended = attention_mask.bool()
    if routing == "token":
        return attended
    if prompt_mask is not None:
        return prompt_mask.bool() & attended
    if labels is None:
        return attended
    prompt = attended & (labels == IGNORE_INDEX)
    empty = ~prompt.any(dim=1, keepdim=True)
    return torch.where(empty, attended, prompt)


def unit_count(routing: str, input_ids: torch.Tensor, segment_ids=None) -> int:
    """Routed units per row: 1 per sequence, S per packed row (its examples), T per token."""
    if routing == "token":
        return input_ids.shape[1]
    return 1 if segment_ids is None else int(segment_ids.max()) + 1


def unit_features(moe, input_ids, attention_mask, unit_mask, units: int, position_ids=None, cache=None,
                  segment_ids=None) -> torch.Tensor:
    """What the router sees: (B, 1, H) pooled per sequence, (B, S, H) per packed
    segment (S = `units`), (B, T, H) per token."""
    sequence = moe.config.routing == "sequence"
    if sequence and segment_ids is not None:
        return packed_features(moe, input_ids, unit_mask, position_ids, segment_ids, units)
    features = token_features(moe, input_ids, attention_mask, unit_mask, position_ids, cache,
                              packed=segment_ids is not None)
    if sequence:
        return masked_mean(features, unit_mask[:, : features.shape[1]])
    return features


def packed_features(moe, input_ids, unit_mask, position_ids, segment_ids, units: int) -> torch.Tensor:
    """Pooled features (B, S, H) of each packed segment. The base_hidden pass runs on
    the segments' prompts only (packing.packed_prefixes), not on the whole rows."""
    if moe.config.router_input == "base_hidden":
        order, valid, position_ids = packed_prefixes(unit_mask, segment_ids, position_ids)
        input_ids = input_ids.gather(1, order)
        unit_mask = unit_mask.gather(1, order) & valid
        segment_ids = torch.where(valid, segment_ids.gather(1, order), -1)
    features = token_features(moe, input_ids, None, unit_mask, position_ids, packed=True)
    return segment_mean(features, unit_mask, segment_ids, units)


def token_features(moe, input_ids, attention_mask, unit_mask, position_ids=None, cache=None,
                   packed: bool = False) -> torch.Tensor:
    """Per-token features (B, T', H): the embeddings, or the base's final hidden states
    with the experts off. `packed`: rows hold several examples, so the pass cannot stop
    at the last prompt token of the batch."""
    if moe.config.router_input == "embeddings":
        return moe.base_model.get_input_embeddings()(input_ids)
    if moe.config.routing == "sequence" and cache is None and not packed:
        # A causal model's hidden state at a prompt token depends only on the tokens
        # before it, so the routing pass can stop at the last prompt token.
        last = int(unit_mask.any(dim=0).nonzero().max()) + 1 if unit_mask.any() else 1
        input_ids = input_ids[:, :last]
        attention_mask = attention_mask[:, :last] if attention_mask is not None else None
        position_ids = position_ids[:, :last] if position_ids is not None else None
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": cache is not None}
    if cache is not None:
        kwargs[cache_kwarg(moe.decoder)] = cache
    with torch.no_grad(), moe.experts_disabled():
        return moe.decoder(**kwargs).last_hidden_state


@torch.no_grad()
def training_unit_features(moe, input_ids, attention_mask, labels) -> torch.Tensor:
    """The routing features of every routed unit of an unpacked training batch, (N, H):
    one row per sequence, or per attended token with token routing (router_init)."""
    mask = routing_mask(moe.config.routing, attention_mask, labels)
    units = unit_count(moe.config.routing, input_ids)
    features = unit_features(moe, input_ids, attention_mask, mask, units)
    if moe.config.routing == "sequence":
        return features.squeeze(1)
    return features[mask[:, : features.shape[1]]]


def cache_kwarg(decoder) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); accept both releases.
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
