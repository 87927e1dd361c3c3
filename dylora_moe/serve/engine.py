"""Every call the server makes into the model, in one place: routing prompts, a prefill, a
decode step, and the batched KV cache whose rows join and leave between steps.

The scheduler (serve/scheduler.py) knows rows, tokens and gates; only this module knows how
the mixture takes its gates (`moe.set_gates`, (B, 1, E): one vector per row, so rows with
different mixtures share each forward), how the router is asked (`moe.route`, the call
`DyLoRAMoE.generate` makes on the prompt), and how transformers' cache is laid out. If the
model's routing changes (per-layer token routing, say), this is the module to change.

The cache is left-padded: every row's newest token sits in the last column, so a decode
step feeds one token per row. Positions come from the attention mask (a row's position is
its count of real tokens), exactly as transformers' `generate` computes them for
left-padded batches, so a row decodes the same tokens in any batch as alone.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..model.pooling import per_example_gates


@dataclass
class Batch:
    """Rows decoding together: one KV cache, left-padded to one width."""
    cache: DynamicCache
    mask: torch.Tensor   # (B, L) 1 on real tokens
    gates: torch.Tensor  # (B, E) fp32, each row's own mixture (routed in the layers: their mean on the prompt)
    routed: torch.Tensor  # (B,) bool: rows the layers' own routers route (router_input="layer")

    @property
    def size(self) -> int:
        return self.mask.shape[0]


class Engine:
    def __init__(self, moe, pad_id: int):
        self.moe = moe.eval()
        self.pad_id = pad_id
        self.num_experts = moe.config.num_experts
        self.device = next(moe.parameters()).device
        params = inspect.signature(moe.base_model.forward).parameters
        # transformers renamed `past_key_values` to `cache` (5.2x); accept both releases.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def in_layers(self) -> bool:
        return self.moe.config.router_input == "layer"

    @property
    def batches_routed_rows(self) -> bool:
        """Sequence routing fixes a row's gates from its prompt, and routers in the layers
        route each row's own tokens inside the pass, so routed rows batch like any other;
        token routing from one router re-routes every new token with a pass of its own and
        is served one request at a time through `moe.generate` (generate_one)."""
        return self.moe.config.routing == "sequence" or self.in_layers

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], fixed: Sequence[Optional[torch.Tensor]]):
        """Prompts (token ids) with their fixed gates, or None where the router decides.
        Returns (last-token logits (b, V) fp32, the rows as a Batch)."""
        ids, mask = self._left_padded(prompts)
        gates = torch.zeros(len(prompts), self.num_experts, device=self.device)
        routed = [i for i, g in enumerate(fixed) if g is None]
        for i, g in enumerate(fixed):
            if g is not None:
                gates[i] = g.to(self.device)
        flags = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        if routed and self.in_layers:
            flags[routed] = True
        elif routed:
            gates[routed] = self.route(ids[routed], mask[routed])
        cache = DynamicCache()
        logits = self._forward(ids, mask, gates, cache, routed=flags)
        if routed and self.in_layers:  # what the layers chose on the prompt, for the response and metrics
            chosen = per_example_gates(self.moe.last_routing(), mask)[:, 0]
            gates[routed] = chosen[routed].float()
        return logits, Batch(cache, mask, gates, flags)

    @torch.no_grad()
    def route(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The router's gates (b, E) for left-padded prompts, as `DyLoRAMoE.generate` routes
        them on its prefill: eval mode, the prompt's real tokens."""
        gates = self.moe.route(ids, mask, mask.bool(), _positions(mask))
        return gates[:, 0].float()

    @torch.no_grad()
    def decode(self, batch: Batch, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row its newest token; the cache and mask grow by one column.
        Returns the next-token logits (B, V) fp32."""
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        batch.mask = F.pad(batch.mask, (0, 1), value=1)
        return self._forward(ids, batch.mask, batch.gates, batch.cache, positions=batch.mask.sum(1, keepdim=True) - 1,
                             routed=batch.routed)

    def _forward(self, ids, mask, gates, cache, positions=None, routed=None) -> torch.Tensor:
        self.moe.set_row_gates(gates, routed)
        out = self.moe.base_model(input_ids=ids, attention_mask=mask,
                                  position_ids=_positions(mask) if positions is None else positions,
                                  use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1].float()

    def _left_padded(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ the batch's rows
    @staticmethod
    def merge(batch: Optional[Batch], newcomers: Batch) -> Batch:
        """One batch of both: the narrower is padded on the left (masked zeros)."""
        if batch is None or batch.size == 0:
            return newcomers
        width = max(batch.mask.shape[1], newcomers.mask.shape[1])
        merged = DynamicCache()
        old, new = _layers(batch.cache), _layers(newcomers.cache)
        for index, ((k1, v1), (k2, v2)) in enumerate(zip(old, new)):
            keys = torch.cat([_pad_seq(k1, width), _pad_seq(k2, width)])
            values = torch.cat([_pad_seq(v1, width), _pad_seq(v2, width)])
            merged.update(keys, values, index)
        mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (batch.mask, newcomers.mask)])
        return Batch(merged, mask, torch.cat([batch.gates, newcomers.gates]), torch.cat([batch.routed, newcomers.routed]))

    @staticmethod
    def select(batch: Batch, keep: Sequence[int]) -> Optional[Batch]:
        """Only the rows `keep`; columns no remaining row uses are cut from the left."""
        if not keep:
            return None
        index = torch.tensor(list(keep), dtype=torch.long, device=batch.mask.device)
        mask = batch.mask[index]
        start = int(mask.any(0).long().argmax())
        cache = DynamicCache()
        for layer, (keys, values) in enumerate(_layers(batch.cache)):
            cache.update(keys[index, :, start:], values[index, :, start:], layer)
        return Batch(cache, mask[:, start:], batch.gates[index], batch.routed[index])

    # ------------------------------------------------------------------ one at a time
    @torch.no_grad()
    def generate_one(self, prompt: Sequence[int], max_tokens: int, sample: Callable,
                     on_token: Callable[[int], bool]) -> None:
        """A routed request served alone through `moe.generate`, which re-routes every token
        (token routing). `sample(logits)` picks each token; `on_token(token)` takes it and
        says whether the request is done (end of text, a stop string, a deadline ...)."""
        ids, mask = self._left_padded([prompt])
        stream = _Feed(on_token)
        self.moe.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                          logits_processor=[_Picker(sample)], streamer=stream, pad_token_id=self.pad_id,
                          stopping_criteria=StoppingCriteriaList([stream]))


class _Picker:
    """A logits processor that makes greedy generation take the scheduler's choice."""

    def __init__(self, sample: Callable):
        self.sample = sample

    def __call__(self, input_ids, scores):
        choice = self.sample(scores[-1].float())
        out = torch.full_like(scores, float("-inf"))
        out[:, choice] = 0.0
        return out


class _Feed(BaseStreamer, StoppingCriteria):
    """Hands each new token to the scheduler and stops when it says so."""

    def __init__(self, on_token: Callable[[int], bool]):
        self.on_token, self.done, self.prompt_seen = on_token, False, False

    def put(self, value):
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        self.done = self.on_token(int(value.reshape(-1)[0])) or self.done

    def end(self):
        pass

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.done, dtype=torch.bool, device=input_ids.device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (padding: 1, as transformers does)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, width, D), zeros on the left."""
    return F.pad(t, (0, 0, width - t.shape[2], 0))
