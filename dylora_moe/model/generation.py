"""Generation: HF `generate` on the base model with its KV cache, and the router run
where inference needs it, always in eval mode (the inference side of MoEConfig.gating):
on the prompt for sequence routing (the gates then stay fixed), on each new token for
token routing, inside the layers for routers in the layers."""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def generate(moe, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **gen_kwargs):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = moe.training
    moe.eval()
    router = GenerationRouting(moe)
    hook = moe.base_model.register_forward_pre_hook(router, with_kwargs=True)
    try:
        return moe.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)
    finally:
        hook.remove()
        moe.train(was_training)


class GenerationRouting:
    """A forward pre-hook on the base: sets the gates before each of generate's calls."""

    def __init__(self, moe):
        self.moe = moe
        self.cache = None  # the token-routed base_hidden pass's own KV cache (experts off)

    def __call__(self, module, args, kwargs):
        moe = self.moe
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")  # full length (past + new) or None
        position_ids = kwargs.get("position_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        prefill = cache is None or cache.get_seq_length() == 0
        new = input_ids.shape[1]
        new_mask = attention_mask[:, -new:].bool() if attention_mask is not None else torch.ones_like(
            input_ids, dtype=torch.bool)
        if moe.routes_in_layers:  # the layers route each new token themselves
            moe.route_in_layers()
            return None
        if moe.config.routing == "sequence":
            if prefill:  # the whole prompt; every later step keeps these gates
                moe.set_gates(moe.route(input_ids, attention_mask, new_mask, position_ids))
            return None
        # Token routing: route just the new tokens. The no-grad base_hidden pass keeps a KV
        # cache of its own (experts off), so it costs one token per step too.
        if prefill:
            from transformers import DynamicCache

            self.cache = DynamicCache() if moe.config.router_input == "base_hidden" else None
        moe.set_gates(moe.route(input_ids, attention_mask, new_mask, position_ids, cache=self.cache))
        return None
