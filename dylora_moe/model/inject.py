"""Find the target Linears of a base model and wrap each in a StackedLoRALinear.

With target_modules None, the targets are every Linear-like layer inside the model's
attention blocks (modules whose class name says Attention): separate projections
(Llama/Gemma/Mistral q/k/v/o_proj, GPT-J/OPT q/k/v_proj + out_proj), fused ones
(Phi-3 qkv_proj, CodeGen qkv_proj, GPT-NeoX/Falcon/Bloom query_key_value, MPT Wqkv,
GPT-2 c_attn) and the output projection of each (o_proj, out_proj, dense, c_proj). A
list of names is only a fallback for models whose attention classes are named otherwise.
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import torch
from torch import nn

from ..errors import UserError
from .config import DEFAULT_TARGET_MODULES, MoEConfig
from .layer import GateSlot, StackedLoRALinear, is_linear_like, linear_shape

logger = logging.getLogger(__name__)
# Fused and output projections, for models whose attention class is not called *Attention*.
FALLBACK_TARGET_MODULES = DEFAULT_TARGET_MODULES + ("qkv_proj", "out_proj")
ADAPTER_BYTES = 4  # fp32 adapters, whatever the base dtype (layer.py)


def matches(name: str, targets) -> bool:
    """PEFT's rule: a target is a module's full name or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def attention_targets(model: nn.Module) -> list[str]:
    """Every Linear-like layer inside an attention block, in model order."""
    found = {}
    for name, module in model.named_modules():
        if "attention" not in type(module).__name__.lower() or is_linear_like(module):
            continue
        for sub, layer in module.named_modules(prefix=name):
            if sub != name and is_linear_like(layer):
                found[sub] = True
    return list(found)


def find_targets(model: nn.Module, targets) -> list[str]:
    if targets is None:
        found = attention_targets(model)
        if found:
            return found
        targets = list(FALLBACK_TARGET_MODULES)
    targets = list(targets)
    found = [n for n, m in model.named_modules() if matches(n, targets) and is_linear_like(m)]
    if found:
        return found
    have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear_like(m)})
    raise UserError(f"MoEConfig.target_modules={targets}: no Linear-like module of "
                    f"{type(model).__name__} matches; its Linear-like modules are named {have}")


def describe_targets(names: list[str]) -> str:
    """"q_proj x18, k_proj x18, ..." - what a run's experts sit on, for the log."""
    counts = Counter(n.rsplit(".", 1)[-1] for n in names)
    return ", ".join(f"{leaf} x{count}" for leaf, count in counts.items())


def check_adapter_size(model: nn.Module, names: list[str], config: MoEConfig) -> None:
    """Refuse, before allocating, adapters that cannot fit in this machine's memory (a
    typo like num_experts: 10000000 would otherwise allocate until the OS kills the run)."""
    layers = [model.get_submodule(n) for n in names]
    if any(getattr(layer, "weight", None) is not None and layer.weight.device.type == "meta" for layer in layers):
        return  # shapes only (the memory planner): nothing is allocated
    per_expert = sum(sum(linear_shape(layer)) for layer in layers) * config.lora_r
    needed = per_expert * config.num_experts * ADAPTER_BYTES
    available = _memory_bytes(layers[0])
    if available and needed > available:
        raise UserError(f"MoEConfig.num_experts={config.num_experts} x lora_r={config.lora_r} on {len(names)} "
                        f"modules: {per_expert * config.num_experts / 1e9:.2f}e9 adapter parameters "
                        f"({needed / 2**30:.1f} GiB in fp32) do not fit in this machine's "
                        f"{available / 2**30:.1f} GiB; lower num_experts or lora_r")


def _memory_bytes(layer: nn.Module) -> int:
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.device.type == "cuda":
        return torch.cuda.get_device_properties(weight.device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: no check


def inject_experts(model: nn.Module, config: MoEConfig, slot: GateSlot) -> dict[str, StackedLoRALinear]:
    """Replace each target layer in place; returns {module name: stacked layer}."""
    if any(isinstance(m, StackedLoRALinear) for m in model.modules()):
        raise ValueError("base model already holds DyLoRA-MoE experts; pass a plain base model")
    names = find_targets(model, config.target_modules)
    check_adapter_size(model, names, config)
    layers = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = StackedLoRALinear(getattr(parent, leaf), config.num_experts, config.lora_r,
                                  config.lora_alpha, config.lora_dropout, slot,
                                  router=config.router_input == "layer")
        setattr(parent, leaf, layer)
        layers[name] = layer
    logger.info("%d expert(s) on %d module(s) of %s: %s", config.num_experts, len(names), type(model).__name__,
                describe_targets(names))
    return layers
