"""The offline demo: a tiny random Gemma-architecture model with 4 experts learns two
token-level task families, printing loss and routing as it goes. No network, ~10 s on CPU.

Issue #3/#4 replace the synthetic token tasks with the real data pipeline and training
loop; this stays as the smallest end-to-end picture of the model core.
"""
from __future__ import annotations

import argparse

import torch

from .model import DyLoRAMoE, MoEConfig
from .model.tiny import random_causal_lm, tiny_config

VOCAB = 128
FAMILIES = ("count", "mirror")  # two clearly different tasks, so experts can specialise


def make_batch(family: str, batch_size: int, generator: torch.Generator):
    """count:  [BOS, 3, a]          -> a+1 ... a+6      (numbers go up)
    mirror: [BOS, 4, x1 .. x6]   -> x6 ... x1        (reverse the prompt)"""
    rows, prompt_len = [], None
    for _ in range(batch_size):
        if family == "count":
            a = int(torch.randint(10, VOCAB - 10, (1,), generator=generator))
            prompt, answer = [1, 3, a], [a + i for i in range(1, 7)]
        else:
            xs = torch.randint(10, VOCAB, (6,), generator=generator).tolist()
            prompt, answer = [1, 4, *xs], xs[::-1]
        rows.append(prompt + answer + [2])  # EOS ends the answer and is learnt
        prompt_len = len(prompt)
    ids = torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# A random 2-layer model is a weak base: the demo adapts the MLPs too, and widens the
# init (HF's 0.02 gives near-uniform logits through the tied embeddings).
DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(steps: int = 200, num_experts: int = 4, seed: int = 0, batch_size: int = 8, lr: float = 1e-2) -> dict:
    torch.manual_seed(seed)
    base = random_causal_lm(tiny_config("gemma", vocab_size=VOCAB, hidden_size=64, num_layers=2,
                                        intermediate_size=256, initializer_range=0.1), seed=seed)
    moe = DyLoRAMoE(base, MoEConfig(num_experts=num_experts, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                    target_modules=DEMO_TARGETS, balance_coefficient=0.01))
    params = sum(p.numel() for p in moe.trainable_parameters())
    print(f"tiny Gemma ({sum(p.numel() for p in base.parameters()) - params:,} frozen params), "
          f"{num_experts} experts in {len(moe.experts)} layers ({params:,} trainable)")
    optimizer = torch.optim.AdamW(moe.trainable_parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    moe.train()
    for step in range(1, steps + 1):
        family = FAMILIES[step % 2]
        out = moe(**make_batch(family, batch_size, generator))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 40 in (0, 1) or step == 2:
            mean_gate = out.routing_weights.mean(dim=(0, 1))
            print(f"step {step:3d}  {family:6s}  loss {out.loss.item():.3f}  lm {out.lm_loss.item():.3f}  "
                  f"balance {out.balance_loss.item():.2e}  gates {fmt(mean_gate)}")

    moe.eval()
    usage, losses = {}, {}
    with torch.no_grad():
        for family in FAMILIES:
            batch = make_batch(family, 64, generator)
            out = moe(**batch)
            usage[family], losses[family] = out.routing_weights.mean(dim=(0, 1)), out.lm_loss.item()
            moe.router.train()  # the same batch with training's dense gates, for comparison
            dense = moe(**batch).lm_loss.item()
            moe.router.eval()
            print(f"eval {family:6s}  lm top-{moe.config.top_k} {losses[family]:.3f} (dense {dense:.3f})  "
                  f"expert usage {fmt(usage[family])}")
    sample = make_batch("count", 1, generator)["input_ids"][:, :3]
    generated = moe.generate(sample, max_new_tokens=7, do_sample=False, pad_token_id=0)
    print(f"generate count {sample[0].tolist()} -> {generated[0, 3:].tolist()}")
    return {"usage": usage, "eval_loss": losses}


def fmt(weights: torch.Tensor) -> str:
    return "[" + " ".join(f"{w:.2f}" for w in weights.tolist()) + "]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> None:
    run(steps=args.steps, num_experts=args.num_experts, seed=args.seed)
