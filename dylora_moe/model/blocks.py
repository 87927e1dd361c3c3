"""The base's decoder blocks, and what is done to them as a whole: torch.compile per
block, and non-reentrant gradient checkpointing."""
from __future__ import annotations

import torch
from torch import nn

# torch._dynamo compiles a block once per setting it meets, and past its limit (8 by
# default) further settings run eager, with a warning. The demo with evaluation met 9 in six
# steps: with and without grad (training, the routing pass), train and eval mode, experts on
# and off, packed rows and padded ones (no mask, a mask), a batch of one row, and the first
# block alone, whose input needs no grad (tests/test_compile.py).
RECOMPILE_LIMIT = 32


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks (model.layers, transformer.h, gpt_neox.layers, ...):
    the list of the block class the model names in `_no_split_modules` (what transformers'
    device maps and FSDP keep whole), else the longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no decoder blocks (nn.ModuleList) found")
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    named = [m for m in lists if type(m[0]).__name__ in block_classes]
    return max(named or lists, key=len)


def compile_blocks(model: nn.Module, **compile_kwargs) -> int:
    """torch.compile each decoder block in place (experts included: they live inside the
    blocks). Per block rather than the whole model: the blocks are identical, so one
    compiled graph serves them all (the no-grad routing pass gets its own), and the
    embeddings and the LM head stay eager. Shapes vary batch to batch, and the routing
    pass is shorter than the rows, hence dynamic=True. Returns the number compiled."""
    compile_kwargs.setdefault("dynamic", True)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    blocks = decoder_blocks(model)
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def enable_checkpointing(model: nn.Module) -> None:
    """Checkpoint the base's layers. Non-reentrant on purpose: the reentrant variant
    runs the forward under no_grad, cutting the gradient to experts and router."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
