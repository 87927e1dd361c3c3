"""Dynamic experts: add one without changing the outputs, let it mature, prune another.

A new expert joins with admission 0, a prior on its gate that makes the gate exactly 0,
so the mixture computes the same function at that moment whatever the new weights.
Its admission then ramps to 1 over `maturity_steps` of its own optimizer steps.
"""
import torch

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.tiny import random_causal_lm, tiny_config

base = random_causal_lm(tiny_config("gemma", vocab_size=256, hidden_size=64, num_layers=2))
moe = DyLoRAMoE(base, MoEConfig(num_experts=4, lora_r=8, lora_dropout=0.0, maturity_steps=4))
torch.manual_seed(0)
with torch.no_grad():  # stand-in for training: experts that differ from the base
    for layer in moe.experts.values():
        layer.lora_B.normal_(std=0.1)
input_ids = torch.randint(3, 256, (2, 12))


def forward():
    with torch.no_grad():
        out = moe(input_ids=input_ids)
    return out.logits, out.routing_weights[0, 0]


moe.train()  # dense gates, so every expert's share is visible
before, _ = forward()
new = moe.add_expert("copy:1")  # or "zeros" (a fresh expert) or "mean"
after, gates = forward()
print(f"added expert {new}: {moe.config.num_experts} experts, mature {moe.router.expert_maturity.tolist()}")
print(f"max |logits after - before| = {(after - before).abs().max().item():.1e}")
print(f"gate of the new expert: {gates[new].item():.3f}")

# Each optimizer step counts for the experts that trained; the new one is admitted gradually.
for step in range(1, 5):
    matured = moe.advance_maturity()
    _, gates = forward()
    print(f"step {step}: admission {moe.router.expert_admission[new].item():.2f}, "
          f"gate {gates[new].item():.3f}, matured now {matured}")

# Pruning removes an expert and its router row; the others keep their weights, in order.
moe.prune_expert(0)
print(f"pruned expert 0: {moe.config.num_experts} experts left")
print("history:", [(h["event"], h["expert"]) for h in moe.config.extra["expert_history"]])
