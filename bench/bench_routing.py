"""What the routing pass costs, on rows shaped like instruction data: padded rows vs
packed rows, router on the input embeddings (no extra pass) vs on a no-grad base pass
(`router_input=base_hidden`, the recipes' default). For packed rows that pass runs on each
example's prompt only (`packed_prefixes`); the "whole rows" variant runs it on every token
of the row, for comparison in the same run.

    python bench/bench_routing.py                         # CPU, small shape, ~1 min
    python bench/bench_routing.py --shape codegemma-2b    # GPU, bf16, 1024-token rows

Examples have seeded random lengths with `--prompt_fraction` of each in the prompt (the
Alpaca template makes prompts ~60% of Code Alpaca's characters, ~70% of MBPP's).
Throughput counts real tokens (no padding), so padded and packed rows compare directly.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import warnings
from pathlib import Path

import torch

import dylora_moe.model.routing as routing_module
from bench_moe import SHAPES, _device_name, timed_step
from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.data import DataCollator, PackingCollator
from dylora_moe.model.tiny import random_causal_lm

VARIANTS = [  # (rows, router_input, routing pass over whole packed rows?)
    ("padded", "embeddings", False),
    ("padded", "base_hidden", False),
    ("packed", "embeddings", False),
    ("packed", "base_hidden", False),
    ("packed", "base_hidden", True),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--examples", type=int, default=16, help="examples per step")
    p.add_argument("--prompt_fraction", type=float, default=0.6)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved sweeps over the variants (median reported)")
    p.add_argument("--out", help="JSON path (default bench/results/routing-<shape>-<device>.json)")
    return p.parse_args(argv)


def make_rows(n, seq, prompt_fraction, vocab):
    """n examples of seeded lengths between seq/8 and seq/2 tokens."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(2, seq // 8), max(3, seq // 2) + 1, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(3, vocab, (length,), generator=g).tolist(),
             "prompt_len": max(1, min(length - 1, round(prompt_fraction * length))), "source_id": 0}
            for length in lengths]


@contextlib.contextmanager
def routing_pass_over_whole_rows(enabled):
    """Stand-in for packed_prefixes that keeps every token: the routing pass before."""
    if not enabled:
        yield
        return

    def keep_all(unit_mask, segment_ids, position_ids):
        batch, width = segment_ids.shape
        order = torch.arange(width, device=segment_ids.device).expand(batch, width)
        return order, torch.ones_like(unit_mask, dtype=torch.bool), position_ids

    original, routing_module.packed_prefixes = routing_module.packed_prefixes, keep_all
    try:
        yield
    finally:
        routing_module.packed_prefixes = original


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else (lambda: torch.autocast(device.type, enabled=False))
    shape = SHAPES[args.shape]
    config, seq = shape["config"](), shape["seq"]
    with torch.device(device):
        base = random_causal_lm(config, dtype=dtype)
    rows = make_rows(args.examples, seq, args.prompt_fraction, config.vocab_size)
    batches = {"padded": DataCollator(0)(rows), "packed": PackingCollator(0, seq)(rows)}
    batches = {k: {n: t.to(device) for n, t in b.items() if n != "source_id"} for k, b in batches.items()}
    real_tokens = sum(len(r["input_ids"]) for r in rows)
    print(f"shape {args.shape}: {args.examples} examples, {real_tokens} tokens, prompts {args.prompt_fraction:.0%}; "
          f"padded {tuple(batches['padded']['input_ids'].shape)}, packed {tuple(batches['packed']['input_ids'].shape)}; "
          f"{dtype}, {device} ({_device_name(device)})")
    times, routed = {v: [] for v in VARIANTS}, {}
    for round_ in range(args.rounds):
        for variant in VARIANTS:
            seconds, routed[variant] = measure(base, variant, batches, args, device, autocast, warmup=round_ == 0)
            times[variant] += seconds
    reference = statistics.median(times[VARIANTS[0]])
    results = []
    for (layout, router_input, whole), seconds in times.items():
        step = statistics.median(seconds)
        name = f"{layout}, {router_input}" + (", pass over whole rows (before)" if whole else "")
        tokens = routed[(layout, router_input, whole)]
        results.append(dict(name=name, rows=layout, router_input=router_input, routing_pass_whole_rows=whole,
                            step_s=step, tokens_per_s=real_tokens / step, vs_first=step / reference,
                            routing_pass_tokens=tokens))
        print(f"{name:48s} {real_tokens / step:9.0f} tok/s  {step * 1e3:8.1f} ms  x{step / reference:5.2f}  "
              f"routing pass {tokens:6d} tokens")
    out = Path(args.out or f"bench/results/routing-{args.shape}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(shape=args.shape, examples=args.examples, real_tokens=real_tokens, prompt_fraction=args.prompt_fraction,
                experts=args.experts, dtype=str(dtype), device=_device_name(device), torch=torch.__version__)
    out.write_text(json.dumps(dict(meta=meta, rows=results), indent=2) + "\n")
    print(f"wrote {out}")
    return results


def measure(base, variant, batches, args, device, autocast, warmup):
    layout, router_input, whole = variant
    moe = DyLoRAMoE(base, MoEConfig(num_experts=args.experts, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                                    router_input=router_input))
    moe.train()
    opt = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-4)
    # Tokens the no-grad routing pass feeds one base Linear, counted over all the steps.
    routed = []
    hook = next(iter(moe.experts.values())).base_layer.register_forward_hook(
        lambda m, args_, out: routed.append(args_[0].shape[:-1].numel()) if not torch.is_grad_enabled() else None)
    try:
        with routing_pass_over_whole_rows(whole):
            seconds = [timed_step(moe, batches[layout], opt, device, autocast) for _ in range(int(warmup) + args.steps)]
    finally:
        hook.remove()
        moe.unload()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return seconds[int(warmup):], sum(routed) // len(seconds)


if __name__ == "__main__":
    main()
