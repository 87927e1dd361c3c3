"""Export one expert, or the whole mixture at fixed gates, as a standard PEFT LoRA adapter
directory.

Written by hand (LoraConfig.save_pretrained + a safetensors file) rather than through
get_peft_model, because that would inject layers into the shared base model in place.
The key layout is PEFT's: base_model.model.<module>.lora_{A,B}.weight.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from .inject import matches
from .layer import StackedLoRALinear, is_conv1d, is_linear_like


def export_expert(base_model, layers: dict[str, StackedLoRALinear], index: int, out_dir, scale: float,
                  lora_dropout: float, base: tuple) -> Path:
    """Expert `index` alone, as the mixture computes it at gate 1 on it: `scale` is what a
    gate of 1 is multiplied by (DyLoRAMoE.gate_scale), so PEFT's alpha / r is set to it.
    `base`: (base_model_name_or_path, GGUF file or None)."""
    tensors = {name: layer.expert_weights(index) for name, layer in layers.items()}
    r = next(iter(layers.values())).r
    return _write_adapter(base_model, layers, tensors, r, scale * r, lora_dropout, base, out_dir)


def export_mixture(base_model, layers: dict[str, StackedLoRALinear], gates, out_dir, scale: float,
                   base: tuple) -> Path:
    """The mixture at fixed gates g (E,) as ONE adapter of rank E*r: A stacked by rows, B
    side by side with expert e's columns times g_e. PEFT scales by alpha'/(E*r); alpha' =
    scale*E*r makes that the mixture's scale, so B'A'x = scale * sum_e g_e B_e A_e x exactly
    (what PEFT's `cat` combination of the experts at weights g computes; a `linear` merge,
    which averages the A and B matrices, would not). No dropout: the adapter is for inference."""
    first = next(iter(layers.values()))
    gates = torch.as_tensor(gates, dtype=torch.float32)
    if gates.shape != (first.num_experts,):
        raise UserError(f"gates: expected {first.num_experts} values, got {tuple(gates.shape)}")
    columns = gates.repeat_interleave(first.r)
    tensors = {name: (layer.lora_A, layer.lora_B * columns.to(layer.lora_B.device)) for name, layer in layers.items()}
    rank = first.num_experts * first.r
    return _write_adapter(base_model, layers, tensors, rank, scale * rank, 0.0, base, out_dir)


def _write_adapter(base_model, layers, tensors: dict, r: int, lora_alpha: float, lora_dropout: float,
                   base: tuple, out_dir) -> Path:
    base_model_name_or_path, gguf_file = base
    # Imported here: peft imports bitsandbytes, which on a CPU-only machine prints a
    # warning to stderr on import; every command that never exports would show it.
    from peft import LoraConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {}
    for name, (a, b) in tensors.items():
        weights[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        weights[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
        task_type="CAUSAL_LM", target_modules=_peft_targets(base_model, list(layers)),
        fan_in_fan_out=any(is_conv1d(layer.base_layer) for layer in layers.values()),
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(out))
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if gguf_file:
        write_gguf_note(out, base_model_name_or_path, gguf_file)
    return out


def write_gguf_note(out: Path, base, gguf_file: str) -> None:
    """adapter_config.json has no field for a GGUF base, and loading the folder alone would
    fail: say which file the adapter was trained on, and how to load it."""
    (out / "README.md").write_text(
        "# A LoRA adapter exported by DyLoRA-MoE\n\n"
        f"Trained on a GGUF base: the file `{gguf_file}` in `{base}`. Load that base first, then the adapter:\n\n"
        "```python\n"
        f"base = AutoModelForCausalLM.from_pretrained({base!r}, gguf_file={gguf_file!r})\n"
        "model = PeftModel.from_pretrained(base, adapter_dir)  # adapter_dir: this folder\n"
        "```\n")


def _peft_targets(base_model, wrapped: list[str]) -> list[str]:
    """Short leaf names when they select exactly the wrapped layers, else full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    candidates = {n.removesuffix(".base_layer") for n, m in base_model.named_modules()
                  if is_linear_like(m) and matches(n.removesuffix(".base_layer"), leaves)}
    return leaves if candidates == set(wrapped) else sorted(wrapped)
