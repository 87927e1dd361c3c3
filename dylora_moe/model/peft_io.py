"""Export one expert as a standard PEFT LoRA adapter directory.

Written by hand (LoraConfig.save_pretrained + a safetensors file) rather than through
get_peft_model, because that would inject layers into the shared base model in place.
The key layout is PEFT's: base_model.model.<module>.lora_{A,B}.weight.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from .inject import matches
from .layer import StackedLoRALinear, is_conv1d, is_linear_like


def export_expert(base_model, layers: dict[str, StackedLoRALinear], index: int, out_dir,
                  lora_alpha: float, lora_dropout: float, base_model_name_or_path: str | None,
                  gguf_file: str | None = None) -> Path:
    # Imported here: peft imports bitsandbytes, which on a CPU-only machine prints a
    # warning to stderr on import; every command that never exports would show it.
    from peft import LoraConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(layers.values()))
    tensors = {}
    for name, layer in layers.items():
        a, b = layer.expert_weights(index)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    config = LoraConfig(
        r=first.r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none",
        task_type="CAUSAL_LM", target_modules=_peft_targets(base_model, list(layers)),
        fan_in_fan_out=any(is_conv1d(layer.base_layer) for layer in layers.values()),
        base_model_name_or_path=base_model_name_or_path,
    )
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
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
