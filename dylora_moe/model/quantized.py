"""Quantized (bitsandbytes) bases: the QLoRA setting.

transformers loads the frozen base with `BitsAndBytesConfig`; its Linear layers become
bitsandbytes `Linear4bit` (NF4) or `Linear8bitLt` (LLM.int8). The stacked expert layer
only *calls* its base layer, so it wraps them unchanged and the base is never
dequantized into memory. This module holds the two things a quantized base needs
beyond that: the config, and one bitsandbytes CPU behaviour that must be switched off.
"""
from __future__ import annotations

import sys

import torch
from torch import nn


def quantization_config(bits: int, compute_dtype: torch.dtype, quant_storage: torch.dtype | None = None):
    """NF4 with double quantization (the QLoRA recipe) or LLM.int8. `quant_storage`: the
    dtype the packed 4-bit weights are stored in (default uint8); a floating dtype lets
    ZeRO-3 and FSDP2 shard them like the other weights."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_quant_storage=quant_storage or torch.uint8)
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"bits={bits!r}: expected 4 or 8")


def _bnb():
    """bitsandbytes if something already imported it, else None. A quantized model
    implies it was (transformers did, to build the layers); importing it for a plain
    model would cost a second and print its kernel warnings."""
    return sys.modules.get("bitsandbytes")


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes layers of a model, by name (empty when it is not quantized)."""
    bnb = _bnb()
    if bnb is None:
        return {}
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def keep_trainable_through(model: nn.Module) -> None:
    """Make every 4-bit layer safe to backpropagate through, on every device.

    TRAP (bitsandbytes 0.50, CPUs with AVX512-BF16): the first forward of a Linear4bit in
    eval mode without grad (our evaluation, or any no-grad pass) repacks its weight for a
    fast inference kernel, for good. That kernel has no autograd formula, so every later
    training forward backpropagates *nothing* through the base layer: the experts'
    gradients silently lose the base path (measured: 20-40% off on a tiny Llama, loss
    still falling). We switch the repacking off and undo any that already happened.
    """
    if _bnb() is None:
        return
    from bitsandbytes.nn.modules import Linear4bit, _convert_weight_packed_for_cpu_inverse

    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        state = getattr(module.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, state)
