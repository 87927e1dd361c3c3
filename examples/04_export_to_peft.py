"""Export one expert as a standard PEFT LoRA adapter and load it with peft.PeftModel.

With its gate at 1, expert i inside the mixture is exactly a plain LoRA (A_i, B_i), so
the adapter reproduces the mixture forced to that expert. Every run writes these
adapters too: final/peft_expert_<i>/.
"""
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.tiny import random_causal_lm, tiny_config

config = tiny_config("gemma", vocab_size=256, hidden_size=64, num_layers=2)
moe = DyLoRAMoE(random_causal_lm(config, seed=0), MoEConfig(num_experts=4, lora_r=8)).eval()
torch.manual_seed(0)
with torch.no_grad():  # stand-in for training: experts that differ from the base
    for layer in moe.experts.values():
        layer.lora_B.normal_(std=0.1)

expert = 2
input_ids = torch.randint(3, 256, (2, 12))
with torch.no_grad(), moe.override_gates(torch.nn.functional.one_hot(torch.tensor(expert), 4).float()):
    mixture_logits = moe(input_ids=input_ids).logits

with tempfile.TemporaryDirectory() as tmp:
    adapter = moe.export_expert(expert, Path(tmp) / f"peft_expert_{expert}")
    print("adapter files:", sorted(p.name for p in adapter.iterdir()))
    # A second copy of the same base (same seed, same weights): DyLoRAMoE changed the first in place.
    peft_model = PeftModel.from_pretrained(random_causal_lm(config, seed=0), str(adapter)).eval()
    print("PEFT config: r =", peft_model.peft_config["default"].r,
          "targets =", sorted(peft_model.peft_config["default"].target_modules))
    with torch.no_grad():
        peft_logits = peft_model(input_ids=input_ids).logits

difference = (peft_logits - mixture_logits).abs().max().item()
print(f"max |PEFT logits - mixture forced to expert {expert}| = {difference:.2e}")
print("same function:", difference < 1e-4)
