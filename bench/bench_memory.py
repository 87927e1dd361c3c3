"""Memory and throughput of one training step under the memory-saving settings:
base precision (bf16 or NF4 4-bit), gradient checkpointing, chunked LM loss, at E=4 and 8.

    python bench/bench_memory.py                        # CPU, small shape, fp32 vs 4-bit (~2 min)
    python bench/bench_memory.py --shape codegemma-2b   # GPU: + largest micro-batch in 24 / 80 GB

Per setting it reports the peak memory of a step at the shape's batch, tokens/s, and on
a GPU the model-FLOPs utilisation and the largest micro-batch that fits each budget:
predicted from the peak at two batch sizes (memory grows linearly with the batch), then
checked by running a step at that batch under a hard cap of the budget
(torch.cuda.set_per_process_memory_fraction), stepping down until it fits.
The budget counts tensors only: the CUDA context (~0.5 GB) comes on top on a real card.
Writes JSON (bench/results/memory-<shape>-<device>.json) after every setting, so a run cut
short still leaves its rows.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench_moe import SHAPES, _device_name, make_batch, timed_step
from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.quantized import quantization_config
from dylora_moe.model.tiny import random_causal_lm

BUDGETS_GIB = (24, 80)
PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16, the datasheet figure MFU is quoted against


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--experts", default="4,8")
    p.add_argument("--bases", default="full,4bit", help="full = bf16 on GPU (fp32 on CPU); 4bit = NF4")
    p.add_argument("--batch", type=int, help="micro-batch for the throughput row (default: the shape's)")
    p.add_argument("--seq", type=int)
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement")
    p.add_argument("--max_batch_cap", type=int, default=128, help="largest micro-batch the budget search tries")
    p.add_argument("--compile", action="store_true", help="add rows with torch.compile'd decoder blocks")
    p.add_argument("--router_input", choices=["base_hidden", "embeddings"], default="base_hidden",
                   help="base_hidden (the recipes' default) adds a no-grad routing pass over each row's prompt half")
    p.add_argument("--time_budget_s", type=float, default=0, help="stop starting new settings after this long")
    p.add_argument("--out", help="JSON path")
    return p.parse_args(argv)


def settings(bases, experts, compile_rows):
    # Most telling first (a run cut short by --time_budget_s keeps those): the defaults
    # (chunked loss on, no checkpointing), then checkpointing, then the plain loss.
    for (ckpt, chunked), base, e in itertools.product(((False, True), (True, True), (False, False), (True, False)),
                                                      bases, experts):
        yield dict(base=base, experts=e, checkpointing=ckpt, chunked_loss=chunked, compile=False)
    if compile_rows:
        yield dict(base=bases[0], experts=experts[0], checkpointing=False, chunked_loss=True, compile=True)


def save_random_base(config, device, dtype, tmp) -> Path:
    path = Path(tmp) / "base"
    with torch.device(device):  # random init is much faster on the GPU
        random_causal_lm(config, dtype=dtype).save_pretrained(path)
    _free(device)
    return path


def load_base(path, kind, device, dtype):
    """The saved random weights as a plain or a 4-bit base, loaded the way users load
    them: from_pretrained (with BitsAndBytesConfig for 4-bit). One base on the device at
    a time, so each peak holds only its own weights."""
    from transformers import AutoModelForCausalLM

    extra = {"quantization_config": quantization_config(4, dtype)} if kind == "4bit" else {}
    place = {"": "cuda:0" if device.type == "cuda" else "cpu"}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=place, **extra)


def _free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def set_checkpointing(base, on: bool):
    if on:
        return  # enabled through the mixture (non-reentrant), see wrap()
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        if hasattr(base, name):
            getattr(base, name)()
            return


def wrap(base, s, chunk_tokens, r=16):
    moe = DyLoRAMoE(base, MoEConfig(num_experts=s["experts"], lora_r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                    router_input=s["router_input"],
                                    loss_chunk_tokens=chunk_tokens if s["chunked_loss"] else 0))
    if s["checkpointing"]:
        moe.gradient_checkpointing_enable()
    if s["compile"]:
        moe.compile_base()
    return moe


def step_peak(moe, batch, device, autocast, steps, opt):
    """(median seconds per step, peak GiB during the steps)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [timed_step(moe, batch, opt, device, autocast) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else cpu_peak_gib(moe, batch, autocast)
    return statistics.median(times), peak


def cpu_peak_gib(moe, batch, autocast):
    """On CPU torch keeps no peak counter; count the bytes saved for backward (the part
    of the peak these settings change), as bench_moe does."""
    from bench_moe import saved_activation_bytes

    return saved_activation_bytes(moe, batch, autocast) / 2**30


def try_step(moe, batch, device, autocast, opt):
    """(seconds, peak GiB) of a step (the second of two: the first pays for new
    shapes), or None when it runs out of memory."""
    try:
        step_peak(moe, batch, device, autocast, 1, opt)
        return step_peak(moe, batch, device, autocast, 1, opt)
    except torch.OutOfMemoryError:
        return None


def largest_batch(moe, vocab, seq, device, autocast, opt, peak_at, budget_gib, cap, tries=4):
    """Largest micro-batch whose step fits in budget_gib, checked under a hard memory cap.

    Memory is not linear in the batch everywhere: the chunked loss's logits grow only
    until a chunk is full (4096 label tokens), so a prediction from small batches is
    too low. Each step that fits becomes a new point for the next, larger prediction;
    one that does not fit steps down. The batch reported is the largest that ran."""
    points = sorted(peak_at)
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    torch.cuda.empty_cache()  # the cap applies to what the allocator holds, cached blocks included
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib / total))
    best, failed = None, cap + 1
    guess = first_guess = _predict(points[-2:], budget_gib, cap)
    try:
        for _ in range(tries):
            guess = min(guess, failed - 1)
            if guess < 1 or (best is not None and guess <= best["batch"]):
                break
            result = try_step(moe, make_batch(vocab, guess, seq, device), device, autocast, opt)
            if result is None:
                opt.zero_grad(set_to_none=True)  # outside the except block: the traceback held the step's tensors
                torch.cuda.empty_cache()
                failed, guess = guess, int(guess * 0.85)
                continue
            seconds, peak = result
            best = dict(batch=guess, peak_gib=peak, tokens_per_s=guess * seq / seconds, capped=guess == cap)
            if guess == cap or peak > 0.9 * budget_gib:
                break
            points = sorted(points + [(guess, peak)])
            guess = _predict(points[-2:], budget_gib, cap)
        return dict(best or dict(batch=0), predicted=first_guess)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def _predict(points, budget_gib, cap) -> int:
    """Batch at which the line through the last two (batch, peak) points meets the budget."""
    (b1, p1), (b2, p2) = points
    slope = (p2 - p1) / (b2 - b1)
    if slope <= 0:
        return cap
    return max(0, min(cap, int(b2 + (budget_gib - p2) / slope)))


def measure(base, s, args, config, device, autocast):
    vocab, seq, batch = config.vocab_size, args.seq, args.batch
    # The default chunk (4096 tokens) only matters at large vocabularies and batches;
    # small shapes get chunks of a quarter of the batch's tokens so the effect shows.
    moe = wrap(base, s, None if vocab >= 32000 else max(1, batch * seq // 4))
    moe.train()
    opt = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-4)
    try:
        data = make_batch(vocab, batch, seq, device)  # seeded: the same rows every setting
        step_peak(moe, data, device, autocast, 1, opt)  # warm-up
        seconds, peak = step_peak(moe, data, device, autocast, args.steps, opt)
        row = dict(s, batch=batch, seq=seq, step_s=seconds, tokens_per_s=batch * seq / seconds, peak_gib=peak)
        if device.type == "cuda":
            row["mfu"] = mfu(args.base_params, row["tokens_per_s"])
            row["mfu_with_routing_pass"] = mfu(args.base_params, row["tokens_per_s"], routed_fraction(moe, data))
            _, peak1 = step_peak(moe, make_batch(vocab, 1, seq, device), device, autocast, 1, opt)
            for budget in BUDGETS_GIB:
                row[f"max_batch_{budget}gb"] = largest_batch(moe, vocab, seq, device, autocast, opt,
                                                             [(1, peak1), (batch, peak)], budget, args.max_batch_cap)
    except torch.OutOfMemoryError:
        row = dict(s, batch=batch, seq=seq, oom=True)
    finally:
        opt.zero_grad(set_to_none=True)
        moe.unload()
        set_checkpointing(base, False)
        for module in base.modules():  # undo compile_base: later settings run eager
            module._compiled_call_impl = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def mfu(base_params: int, tokens_per_s: float, routed_fraction: float = 0.0) -> float:
    """Model-FLOPs utilisation: 4 N FLOPs per token (forward 2N, backward 2N for the
    input gradients only: the base is frozen, so no weight gradients), against the
    dense bf16 peak. Attention's sequence-length term and the experts are left out.
    `routed_fraction`: tokens the no-grad routing pass (router_input=base_hidden) runs
    per trained token; it adds 2N each. The MFU goal (docs/benchmarks.md) counts 4N only."""
    return (4 + 2 * routed_fraction) * base_params * tokens_per_s / (PEAK_BF16_TFLOPS * 1e12)


def routed_fraction(moe, batch) -> float:
    """Tokens of the routing pass per token of the batch: 0 with the router on the
    embeddings; else the prompt columns up to the last prompt token (unpacked rows)."""
    if moe.config.router_input != "base_hidden":
        return 0.0
    prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()
    return (int(prompt.any(dim=0).nonzero().max()) + 1) / batch["labels"].shape[1]


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    args.batch, args.seq = args.batch or shape["batch"], args.seq or shape["seq"]
    config = shape["config"]()
    bases_wanted = args.bases.split(",")
    tmp = tempfile.TemporaryDirectory()
    path = save_random_base(config, device, dtype, tmp.name)
    args.base_params = _count_params(config)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else (lambda: torch.autocast(device.type, enabled=False))
    print(f"shape {args.shape}: batch {args.batch} x {args.seq}, {dtype}, {device} ({_device_name(device)})",
          flush=True)
    out = Path(args.out or f"bench/results/memory-{args.shape}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(shape=args.shape, batch=args.batch, seq=args.seq, router_input=args.router_input, dtype=str(dtype),
                device=_device_name(device), torch=torch.__version__, python=platform.python_version(),
                base_params=args.base_params)
    rows = []
    experts = [int(e) for e in args.experts.split(",")]
    for i, kind in enumerate(bases_wanted):
        base = load_base(path, kind, device, dtype)
        deadline = start + args.time_budget_s * (i + 1) / len(bases_wanted) if args.time_budget_s else None
        for s in settings([kind], experts, args.compile):
            if deadline and time.time() > deadline:
                print(f"time budget for the {kind} base spent: next", flush=True)
                break
            rows.append(measure(base, dict(s, router_input=args.router_input), args, config, device, autocast))
            print(format_row(rows[-1]), flush=True)
            out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        del base
        _free(device)
    tmp.cleanup()
    print(f"wrote {out}")
    return rows


def _count_params(config) -> int:
    """The base's parameter count, from a weightless (meta-device) copy."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def format_row(row):
    name = (f"{row['base']:5s} E={row['experts']} ckpt={'on ' if row['checkpointing'] else 'off'} "
            f"chunked={'on ' if row['chunked_loss'] else 'off'}{' compiled' if row['compile'] else ''}")
    if row.get("oom"):
        return f"{name}  OOM at batch {row['batch']}"
    what = "peak" if "mfu" in row else "saved-act"
    text = f"{name}  {row['tokens_per_s']:9.0f} tok/s  {what} {row['peak_gib'] * 1024:9.1f} MiB"
    if "mfu" in row:
        text += f"  MFU {row['mfu'] * 100:4.1f}% ({row['mfu_with_routing_pass'] * 100:4.1f}% with the routing pass)"
    for budget in BUDGETS_GIB:
        fit = row.get(f"max_batch_{budget}gb")
        if fit:
            text += f"  max-batch@{budget}GB {fit['batch']}{'+' if fit.get('capped') else ''}"
    return text


if __name__ == "__main__":
    main()
