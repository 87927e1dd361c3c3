"""The offline demo: a tiny random Gemma-architecture model with 4 experts learns the two
generated Python task families of the `demo` data source (list/number functions and
string functions), printing loss and routing per source as it goes. No network, CPU.

It runs the real data pipeline (splits, local byte-level BPE tokenizer, interleaving,
prompt masking) and the real model; #4 moves it onto the Accelerate training loop.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .data import DataCollator, DataConfig, build_datasets, build_demo_tokenizer, load_examples
from .model import DyLoRAMoE, MoEConfig
from .model.tiny import random_causal_lm, tiny_config

SOURCES = [{"name": "demo", "family": "numbers"}, {"name": "demo", "family": "strings"}]
# A random base is weak: the demo adapts the MLPs too, and widens the init (HF's 0.02
# gives near-uniform logits through the tied embeddings).
DEMO_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(steps: int = 300, num_experts: int = 4, seed: int = 0, batch_size: int = 8, lr: float = 1e-2,
        output_dir: str | None = "runs/demo", log_every: int = 50) -> dict:
    torch.manual_seed(seed)
    data_cfg = DataConfig(sources=SOURCES, max_seq_length=256, seed=seed, demo_examples=600)
    examples = load_examples(data_cfg)
    tokenizer = build_demo_tokenizer(ex["prompt"] + ex["answer"] for s in examples.values() for ex in s["train"])
    bundle = build_datasets(data_cfg, tokenizer, examples)
    base = random_causal_lm(tiny_config("gemma", vocab_size=len(tokenizer), hidden_size=128, num_layers=2,
                                        intermediate_size=512, initializer_range=0.1), seed=seed)
    moe = DyLoRAMoE(base, MoEConfig(num_experts=num_experts, lora_r=8, lora_alpha=16, lora_dropout=0.0,
                                    target_modules=DEMO_TARGETS, temperature=0.5, balance_coefficient=0.01))
    trainable = sum(p.numel() for p in moe.trainable_parameters())
    print(f"data: {len(bundle.train)} train rows from {bundle.sources}, tokenizer of {len(tokenizer)} tokens")
    print(f"model: tiny Gemma ({sum(p.numel() for p in base.parameters()) - trainable:,} frozen params), "
          f"{num_experts} experts in {len(moe.experts)} layers ({trainable:,} trainable)")

    collate = DataCollator(tokenizer.pad_token_id)
    loader = DataLoader(bundle.train, batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(moe.trainable_parameters(), lr=lr)
    moe.train()
    step = 0
    while step < steps:
        for batch in loader:
            step += 1
            out = moe(**batch)
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            if step % log_every == 0 or step == 1:
                print(f"step {step:4d}  loss {out.loss.item():.3f}  lm {out.lm_loss.item():.3f}  "
                      f"balance {out.balance_loss.item():.2e}  "
                      + "  ".join(f"{name} {fmt(w)}" for name, w in gates_by_source(out, batch, bundle.sources)))
            if step == steps:
                break

    report = evaluate(moe, bundle, collate)
    prompt = examples["demo:numbers"]["validation"][0]["prompt"]
    ids = tokenizer(prompt, return_tensors="pt")
    generated = moe.generate(ids["input_ids"], attention_mask=ids["attention_mask"], max_new_tokens=40,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    completion = tokenizer.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    print("generate (numbers prompt) ->", repr(completion[:120]))
    if output_dir:
        out_dir = Path(output_dir)
        moe.save_pretrained(out_dir / "experts")
        tokenizer.save_pretrained(out_dir / "tokenizer")
        print(f"saved experts and tokenizer under {out_dir}/")
    return report


def gates_by_source(out, batch, sources):
    weights = out.routing_weights.mean(dim=1)  # (B, E)
    for i, name in enumerate(sources):
        rows = batch["source_id"] == i
        if rows.any():
            yield name, weights[rows].mean(dim=0)


@torch.no_grad()
def evaluate(moe, bundle, collate, batch_size: int = 32) -> dict:
    """Validation loss per source with eval (top-k) routing and with training's dense
    routing, plus how often each expert is chosen per source."""
    moe.eval()
    report = {}
    for name, dataset in bundle.validation.items():
        losses, dense_losses, usage = [], [], []
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
            out = moe(**batch)
            losses.append(out.lm_loss.item())
            usage.append(out.routing_weights.mean(dim=1))
            moe.router.train()  # the same batch with training's dense gates, for comparison
            dense_losses.append(moe(**batch).lm_loss.item())
            moe.router.eval()
        usage = torch.cat(usage).mean(dim=0)
        report[name] = {"loss": sum(losses) / len(losses), "dense_loss": sum(dense_losses) / len(dense_losses),
                        "usage": usage}
        print(f"eval {name:13s} lm top-{moe.config.top_k} {report[name]['loss']:.3f} "
              f"(dense {report[name]['dense_loss']:.3f})  expert usage {fmt(usage)}")
    moe.train()
    return report


def fmt(weights: torch.Tensor) -> str:
    return "[" + " ".join(f"{w:.2f}" for w in weights.tolist()) + "]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="runs/demo")


def main(args: argparse.Namespace) -> None:
    run(steps=args.steps, num_experts=args.num_experts, seed=args.seed, output_dir=args.output_dir)
