"""The mixture's state on disk: what belongs to it (never the base), the folder
`save_pretrained` writes (moe_config.json + experts.safetensors) and loading it back."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn

from .admission import OPTIONAL_BUFFERS, PER_EXPERT_BUFFERS
from .config import MoEConfig

CONFIG_FILE = "moe_config.json"
WEIGHTS_FILE = "experts.safetensors"

_EXPERT_KEY = re.compile(r"(^|\.)lora_(A|B|router)$|^(module\.)?router\.")


def is_expert_key(key: str) -> bool:
    """State-dict keys that belong to the mixture (stacked experts, router), not the base."""
    return bool(_EXPERT_KEY.search(key))


def is_optional_key(key: str) -> bool:
    """Router state a model saved without dynamic experts or k-means init lacks; loading keeps the defaults."""
    owner, _, name = key.rpartition(".")
    return name in OPTIONAL_BUFFERS and owner.endswith("router")


def expert_state_dict(moe) -> dict[str, torch.Tensor]:
    """Everything that is not the base: stacked A/B per target layer, router, its buffers."""
    state = {}
    for name, layer in moe.experts.items():
        state[f"{name}.lora_A"] = layer.lora_A
        state[f"{name}.lora_B"] = layer.lora_B
        if layer.lora_router is not None:
            state[f"{name}.lora_router"] = layer.lora_router
    state["router.gate.weight"] = moe.router.gate.weight
    state["router.feature_center"] = moe.router.feature_center
    for name in PER_EXPERT_BUFFERS:  # maturity, steps, admission, novelty library
        state[f"router.{name}"] = getattr(moe.router, name)
    return state


def save_pretrained(moe, save_directory) -> Path:
    """Experts, router and config; never the base model (it is not ours to copy)."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    config = MoEConfig.from_dict(moe.config.to_dict())
    config.target_modules = list(moe.experts)  # exact layer names, so loading rebuilds the same
    config.extra = {**config.extra, "base_model_name_or_path": base_name(moe.base_model)}
    if gguf_file_of(moe.base_model):
        config.extra["base_gguf_file"] = gguf_file_of(moe.base_model)
    config.save(out / CONFIG_FILE)
    tensors = {k: v.detach().contiguous().cpu() for k, v in expert_state_dict(moe).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def check_folder(src: Path) -> None:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name}: missing; expected a directory written by "
                                    "DyLoRAMoE.save_pretrained")


def load_expert_state(moe, tensors: dict[str, torch.Tensor], source: str = "state") -> None:
    own = expert_state_dict(moe)
    missing = sorted(k for k in set(own) - set(tensors) if not is_optional_key(k))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source}: keys do not match this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key, target in own.items():
            if key not in tensors:  # optional state (maturity, admission) a folder may lack: keep the defaults
                continue
            if tensors[key].shape != target.shape:
                raise ValueError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(tensors[key])


def base_name(model: nn.Module) -> Optional[str]:
    return getattr(model.config, "_name_or_path", None) or None


def gguf_file_of(model: nn.Module) -> Optional[str]:
    """The GGUF file a base was loaded from (transformers records it in the config's
    quantization_config), or None: adapters and saved mixtures name it beside the folder."""
    quant = getattr(model.config, "quantization_config", None)
    if isinstance(quant, dict):
        return quant.get("gguf_file") if quant.get("quant_method") == "gguf" else None
    return getattr(quant, "gguf_file", None) if getattr(quant, "quant_method", None) == "gguf" else None
