"""Find the target Linears of a base model and wrap each in a StackedLoRALinear."""
from __future__ import annotations

from torch import nn

from .config import DEFAULT_TARGET_MODULES, MoEConfig
from .layer import GateSlot, StackedLoRALinear, is_linear_like


def matches(name: str, targets) -> bool:
    """PEFT's rule: a target is a module's full name or a dotted suffix of it."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets) -> list[str]:
    targets = list(targets) if targets is not None else list(DEFAULT_TARGET_MODULES)
    found = [n for n, m in model.named_modules() if matches(n, targets) and is_linear_like(m)]
    if found:
        return found
    have = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear_like(m)})
    raise ValueError(f"MoEConfig.target_modules={targets}: no Linear-like module of "
                     f"{type(model).__name__} matches; its Linear-like modules are named {have}")


def inject_experts(model: nn.Module, config: MoEConfig, slot: GateSlot) -> dict[str, StackedLoRALinear]:
    """Replace each target layer in place; returns {module name: stacked layer}."""
    if any(isinstance(m, StackedLoRALinear) for m in model.modules()):
        raise ValueError("base model already holds DyLoRA-MoE experts; pass a plain base model")
    layers = {}
    for name in find_targets(model, config.target_modules):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = StackedLoRALinear(getattr(parent, leaf), config.num_experts, config.lora_r,
                                  config.lora_alpha, config.lora_dropout, slot)
        setattr(parent, leaf, layer)
        layers[name] = layer
    return layers
