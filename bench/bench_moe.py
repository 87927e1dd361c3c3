"""Throughput and memory of one training step: plain PEFT LoRA (the floor), the
pass-per-expert reference (tests/reference.py) and stacked experts with each router
input, for E in {1, 2, 4, 8}, all on the same batch in the same run.

    python bench/bench_moe.py                          # CPU, small shape, ~1 min
    python bench/bench_moe.py --shape codegemma-2b     # GPU, bf16, batch 4 x 1024

Prints a table and writes JSON (bench/results/). Reported as ratios to the floor measured
in this run, never as absolute targets in tests.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.tiny import codegemma_2b_config, random_causal_lm, tiny_config

SHAPES = {
    # CodeGemma-2B's proportions (MLP 8x hidden, 1 KV head), shrunk for 2 CPU cores.
    "small": dict(config=lambda: tiny_config("gemma", vocab_size=8192, hidden_size=512, num_layers=4,
                                             num_heads=8, num_kv_heads=1, head_dim=64, intermediate_size=4096),
                  batch=2, seq=128),
    "tiny": dict(config=lambda: tiny_config("gemma", vocab_size=256), batch=2, seq=16),  # smoke test
    "codegemma-2b": dict(config=codegemma_2b_config, batch=4, seq=1024),
    # SmolLM2-135M's (configs/smollm2-135m.yaml): 30 thin layers, so a step is many small kernels
    "smollm2-135m": dict(config=lambda: tiny_config("llama", vocab_size=49152, hidden_size=576, num_layers=30,
                                                    num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                                                    max_positions=8192), batch=8, seq=384),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--experts", default="1,2,4,8", help="comma-separated expert counts")
    p.add_argument("--batch", type=int, help="micro-batch (default: the shape's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the shape's)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3,
                   help="sweeps over all variants, interleaved so machine noise hits them alike (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant in the first round")
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--skip_logits_above", type=int, default=8, help="skip the N-pass loop for larger E")
    p.add_argument("--out", help="JSON path (default bench/results/<shape>-<device>.json)")
    return p.parse_args(argv)


def variants(expert_counts, skip_logits_above):
    yield dict(name="peft-lora (floor)", experts=1, kind="peft")
    for e in expert_counts:
        yield dict(name=f"deltas/embeddings E={e}", experts=e, kind="moe", mixture="deltas", router_input="embeddings")
        yield dict(name=f"deltas/base_hidden E={e}", experts=e, kind="moe", mixture="deltas", router_input="base_hidden")
        if e <= skip_logits_above:  # the reference: a base pass per expert, logits mixed
            yield dict(name=f"logits/embeddings E={e}", experts=e, kind="moe", mixture="logits", router_input="embeddings")


def wrap(base, v, r):
    if v["kind"] == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        return model, lambda: model.unload()
    moe = DyLoRAMoE(base, MoEConfig(num_experts=v["experts"], lora_r=r, lora_alpha=2 * r, lora_dropout=0.05,
                                    router_input=v["router_input"]))
    if v["mixture"] == "logits":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from reference import PerExpertLoop

        return PerExpertLoop(moe), moe.unload
    return moe, moe.unload


def make_batch(vocab, batch, seq, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100  # first half is the prompt: sequence routing pools over it
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def saved_activation_bytes(model, batch, autocast):
    """Bytes saved for backward by one forward (unique storages): a memory measure that
    means the same on CPU and GPU."""
    seen = {}

    def pack(t):
        # Keep the storage, not the tensor: the graph holds this hook, so holding a tensor
        # (whose grad_fn holds the graph) would close a cycle through C++ that Python's
        # gc cannot free; every call leaked a whole forward's activations (an OOM on the
        # GPU). A storage has no grad_fn, and keeping it alive stops a freed address
        # being reused and counted once for two tensors.
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage
        return None

    def unpack(_):
        raise RuntimeError("saved_activation_bytes: measurement-only forward, no backward")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack), autocast():
        model(**batch).loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(storage.nbytes() for ptr, storage in seen.items() if ptr not in params)


def timed_step(model, batch, opt, device, autocast) -> float:
    """Seconds for one training step: forward, backward, AdamW."""
    t0 = time.perf_counter()
    with autocast():
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure(model, batch, steps, warmup, device, autocast):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    act = saved_activation_bytes(model, batch, autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [timed_step(model, batch, opt, device, autocast) for _ in range(warmup + steps)][warmup:]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return times, act / 2**20, peak


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers renames, not ours
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    shape = SHAPES[args.shape]
    batch_size, seq = args.batch or shape["batch"], args.seq or shape["seq"]
    config = shape["config"]()
    with torch.device(device):
        base = random_causal_lm(config, dtype=dtype)
    batch = make_batch(config.vocab_size, batch_size, seq, device)
    # Weights stay in `dtype`; adapters are fp32 and autocast runs the matmuls in bf16.
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else (lambda: torch.autocast(device.type, enabled=False))
    expert_counts = [int(e) for e in args.experts.split(",")]
    print(f"shape {args.shape}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, "
          f"batch {batch_size} x {seq}, {dtype}, {device} ({_device_name(device)})")
    plan = list(variants(expert_counts, args.skip_logits_above))
    times = {v["name"]: [] for v in plan}
    memory = {}
    for round_ in range(args.rounds):
        for v in plan:
            model, unload = wrap(base, v, args.lora_r)
            try:
                warmup = args.warmup if round_ == 0 else 0
                seconds, act_mib, peak = measure(model, batch, args.steps, warmup, device, autocast)
            except torch.OutOfMemoryError:
                seconds, act_mib, peak = [float("nan")], float("nan"), float("nan")
            finally:
                unload()
                model.zero_grad(set_to_none=True)
                gc.collect()  # an out-of-memory variant leaves cycles holding its activations
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            times[v["name"]] += seconds
            memory.setdefault(v["name"], (act_mib, peak))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    rows = []
    for v in plan:
        seconds = statistics.median(times[v["name"]])
        act_mib, peak = memory[v["name"]]
        rows.append(dict(v, step_s=seconds, tokens_per_s=batch_size * seq / seconds, saved_act_mib=act_mib,
                         peak_gib=peak, samples=len(times[v["name"]])))
        print(_fmt_row(rows[-1], rows[0]))
    summary = _targets(rows)
    for line in summary["lines"]:
        print(line)
    out = Path(args.out or f"bench/results/{args.shape}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(shape=args.shape, batch=batch_size, seq=seq, dtype=str(dtype), device=_device_name(device),
                torch=torch.__version__, python=platform.python_version(), lora_r=args.lora_r)
    out.write_text(json.dumps(dict(meta=meta, rows=rows, targets=summary["targets"]), indent=2) + "\n")
    print(f"wrote {out}")
    return rows


def _targets(rows):
    floor = rows[0]["step_s"]
    by_name = {r["name"]: r for r in rows}
    targets, lines = {}, []
    emb = [r for r in rows if r["kind"] == "moe" and r["mixture"] == "deltas" and r["router_input"] == "embeddings"]
    worst = max(r["step_s"] / floor for r in emb)
    targets["deltas_embeddings_max_step_vs_floor"] = worst
    lines.append(f"deltas/embeddings step time, worst over E: {worst:.2f}x the floor (target <= 1.15): "
                 f"{'met' if worst <= 1.15 else 'NOT met'}")
    if "logits/embeddings E=4" in by_name and "deltas/embeddings E=4" in by_name:
        ratio = by_name["logits/embeddings E=4"]["step_s"] / by_name["deltas/embeddings E=4"]["step_s"]
        targets["logits_vs_deltas_E4"] = ratio
        lines.append(f"logits loop vs deltas at E=4: {ratio:.2f}x slower (target >= 3.5): "
                     f"{'met' if ratio >= 3.5 else 'NOT met'}")
    return dict(targets=targets, lines=lines)


def _fmt_row(row, floor):
    peak = f"{row['peak_gib']:7.2f}" if row["peak_gib"] is not None else "      -"
    return (f"{row['name']:26s} {row['tokens_per_s']:10.0f} tok/s  {row['step_s'] * 1000:8.1f} ms  "
            f"x{row['step_s'] / floor['step_s']:5.2f}  saved-act {row['saved_act_mib']:8.1f} MiB  peak {peak} GiB")


def _device_name(device):
    return torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"


if __name__ == "__main__":
    main()
