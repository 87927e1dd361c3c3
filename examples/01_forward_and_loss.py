"""A mixture on a tiny random base: one forward, the loss and the gates.

DyLoRAMoE wraps a frozen causal LM in place: E LoRA experts are stacked inside each
target Linear, so one base forward serves all of them. Runs offline on CPU in seconds.
"""
import torch

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.tiny import random_causal_lm, tiny_config

# Any Hugging Face causal LM works; a random Gemma-shaped one needs no download.
base = random_causal_lm(tiny_config("gemma", vocab_size=256, hidden_size=64, num_layers=2))
moe = DyLoRAMoE(base, MoEConfig(num_experts=4, lora_r=8))  # gating "dense": every expert, weighted

# Two rows: a 6-token prompt, then a 4-token answer. Labels are -100 on the prompt,
# so the loss counts the answer only, and sequence routing pools the prompt only.
torch.manual_seed(0)
input_ids = torch.randint(3, 256, (2, 10))
labels = input_ids.clone()
labels[:, :6] = -100

moe.train()  # every expert and the router get gradients
out = moe(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
out.loss.backward()  # loss = lm_loss + balance_coefficient * balance_loss

print(f"loss {out.loss.item():.4f} = lm_loss {out.lm_loss.item():.4f} "
      f"+ {moe.config.balance_coefficient} x balance_loss {out.balance_loss.item():.6f}")
print("routing_weights shape:", tuple(out.routing_weights.shape))  # (batch, 1, experts) per sequence
print("gates of row 0:", [round(g, 3) for g in out.routing_weights[0, 0].tolist()])

# Only the experts and the router train; the base stays frozen.
trainable = sum(p.numel() for p in moe.trainable_parameters())
frozen = sum(p.numel() for p in base.parameters() if not p.requires_grad)
print(f"trainable parameters: {trainable} (experts + router); frozen base parameters: {frozen}")
layer = next(iter(moe.experts.values()))
print("one stacked layer:", layer)

moe.eval()  # inference routes exactly as training did (dropout aside)
with torch.no_grad():
    inferred = moe(input_ids=input_ids, labels=labels).routing_weights
print("eval gates equal training gates:", torch.equal(inferred, out.routing_weights.detach()))

# Sparse routing, also the same in training and inference: top-1 at weight p_i (Switch).
sparse = DyLoRAMoE(random_causal_lm(base.config), MoEConfig(num_experts=4, lora_r=8, gating="top_k", top_k=1)).eval()
with torch.no_grad():
    gates = sparse(input_ids=input_ids, labels=labels).routing_weights
print("top_k gating, non-zero gates per row:", (gates > 0).sum(-1).flatten().tolist())
