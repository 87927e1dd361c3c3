"""Generation: routed by the prompt, or with the gates forced (one expert, a uniform mix, no experts).

`generate` is Hugging Face's, with the KV cache. With sequence routing the router runs
once on the prompt, in eval mode, and those gates serve every new token. This mixture routes
hard top-1 (gating "straight_through"), so the routed generation is one expert's.
`override_gates` and `experts_disabled` are what `dylora-moe generate --expert i /
--uniform / --base` use.
"""
import torch

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.tiny import random_causal_lm, tiny_config

base = random_causal_lm(tiny_config("llama", vocab_size=256, hidden_size=64, num_layers=2))
moe = DyLoRAMoE(base, MoEConfig(num_experts=3, lora_r=4, gating="straight_through", top_k=1)).eval()

# A fresh mixture has B = 0: every expert is still the base. Give the experts random
# weights so that they differ, as trained ones do.
torch.manual_seed(0)
with torch.no_grad():
    for layer in moe.experts.values():
        layer.lora_B.normal_(std=0.5)

prompt = torch.randint(3, 256, (1, 8))
settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)


def new_tokens(ids):
    return ids[0, prompt.shape[1]:].tolist()


# What the router picks for this prompt (hard top-1: one gate is 1).
with torch.no_grad():
    gates = moe(input_ids=prompt).routing_weights[0, 0]
chosen = int(gates.argmax())
print("gates:", [round(g, 2) for g in gates.tolist()], "-> expert", chosen)

routed = new_tokens(moe.generate(prompt, **settings))
print("routed:          ", routed)
for e in range(moe.config.num_experts):
    with moe.override_gates(torch.nn.functional.one_hot(torch.tensor(e), 3).float()):
        print(f"forced expert {e}:", new_tokens(moe.generate(prompt, **settings)))
with moe.override_gates(torch.full((3,), 1 / 3)):
    print("uniform mix:     ", new_tokens(moe.generate(prompt, **settings)))
with moe.experts_disabled():
    print("base, no experts:", new_tokens(moe.generate(prompt, **settings)))

with moe.override_gates(torch.nn.functional.one_hot(torch.tensor(chosen), 3).float()):
    same = new_tokens(moe.generate(prompt, **settings)) == routed
print(f"routed generation equals forced expert {chosen}: {same}")
