"""Where one training step's time goes: a profiled step of the mixture, its kernel (GPU)
or operator (CPU) time grouped by kind, the top entries, how busy the device was and
the step's model-FLOPs utilisation. The next MFU lever is whichever group is largest.

    python bench/profile_step.py                                # CPU, small shape, E=4
    python bench/profile_step.py --shape codegemma-2b           # GPU, bf16, 4 x 1024
    python bench/profile_step.py --shape codegemma-2b --compile --batch 8

Groups come from the kernel / operator names (first match of GROUPS wins), so they are
approximate: an elementwise kernel that belongs to the loss counts as elementwise.
Writes JSON (bench/results/profile-<shape>-<device>.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_memory import PEAK_BF16_TFLOPS, _count_params, mfu, routed_fraction
from bench_moe import SHAPES, _device_name, make_batch, timed_step
from dylora_moe import DyLoRAMoE, MoEConfig
from dylora_moe.model.tiny import random_causal_lm

# (group, name pattern), lower-case names; the first that matches wins.
GROUPS = [
    ("optimizer", r"adam|foreach|multi_tensor|lerp|addcdiv"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention|_efficient_"),
    ("matmul", r"gemm|cutlass|nvjet|xmma|sm\d\d_|cublas|\bmm\b|aten::mm|aten::addmm|aten::bmm|aten::matmul|aten::linear"),
    ("loss (softmax, log-sum-exp)", r"softmax|logsumexp|nll|cross_entropy|amax|max_kernel|reduce_kernel.*max"),
    ("dropout / random", r"dropout|bernoulli|philox|rand"),
    ("norms", r"norm|rsqrt"),
    ("copies / casts / indexing", r"copy|cast|_to_copy|aten::to\b|cat|index|gather|scatter|fill|zero"),
    ("elementwise / reductions", r"elementwise|vectorized|unrolled|reduce|aten::(mul|add|sub|div|pow|mean|sum|tanh|gelu|exp|neg)"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--router_input", choices=["embeddings", "base_hidden"], default="embeddings")
    p.add_argument("--loss_chunk_tokens", type=int, default=None, help="default: automatic (0 = plain loss)")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder blocks (model.compile)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile needs a few)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="JSON path")
    return p.parse_args(argv)


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, lowered):
            return group
    return "other"


def self_times(prof, device) -> dict[str, float]:
    """Seconds per name over the profiled steps: on a GPU each kernel's (and copy's)
    device time; on the CPU each operator's self time (nested operators would count
    twice with their total times)."""
    times = {}
    if device.type == "cuda":
        for event in prof.profiler.kineto_results.events():
            # GPU-side copies of record_function ranges span many kernels: not kernels.
            if (event.device_type() == torch.autograd.DeviceType.CUDA and not event.is_user_annotation()
                    and not event.name().startswith(("ProfilerStep", "Optimizer."))):
                times[event.name()] = times.get(event.name(), 0.0) + event.duration_ns() / 1e9
        if not times:
            raise RuntimeError("the profiler recorded no CUDA kernels (is CUPTI available?)")
        return times
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0 and not event.key.startswith("ProfilerStep"):
            times[event.key] = event.self_cpu_time_total / 1e6
    return times


def executed_flops(moe, data, autocast) -> dict[str, int]:
    """FLOPs one forward + backward really executes, by aten op (torch's FlopCounterMode:
    matmuls, and attention where torch registers the kernel: the CUDA ones, not the CPU
    flash path). Against the 4N per token that MFU credits, this shows how much of the
    gap to the peak is extra work (the routing pass, attention, LoRA) rather than idle or
    slow kernels. No optimizer step: AdamW's elementwise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # one block: entering it again resets the counts
        with autocast():
            loss = moe(**data).loss
        loss.backward()
    moe.zero_grad(set_to_none=True)
    return {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}


def main(argv=None):
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[args.shape]
    batch, seq = args.batch or shape["batch"], args.seq or shape["seq"]
    config = shape["config"]()
    with torch.device(device):
        base = random_causal_lm(config, dtype=dtype)
    moe = DyLoRAMoE(base, MoEConfig(num_experts=args.experts, lora_r=16, lora_alpha=32, lora_dropout=0.05,
                                    router_input=args.router_input, loss_chunk_tokens=args.loss_chunk_tokens))
    if args.checkpointing:
        moe.gradient_checkpointing_enable()
    moe.train()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else (lambda: torch.autocast(device.type, enabled=False))
    data = make_batch(config.vocab_size, batch, seq, device)
    # Counted eager, before compiling: the same FLOPs, and a dispatch mode around compiled
    # blocks would either miss their kernels or force a recompile.
    flops = executed_flops(moe, data, autocast)
    if args.compile:
        moe.compile_base()
    opt = torch.optim.AdamW(moe.trainable_parameters(), lr=1e-4)
    for _ in range(args.warmup):
        timed_step(moe, data, opt, device, autocast)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        walls = [timed_step(moe, data, opt, device, autocast) for _ in range(args.steps)]
    step_s = statistics.median(walls)
    times = self_times(prof, device)
    busy = sum(times.values())
    groups = {}
    for name, seconds in times.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + seconds
    tokens_per_s, params = batch * seq / step_s, _count_params(config)
    flops_per_step = sum(flops.values())
    result = dict(
        meta=dict(shape=args.shape, batch=batch, seq=seq, experts=args.experts, router_input=args.router_input,
                  loss_chunk_tokens=moe.loss_chunk_tokens(), checkpointing=args.checkpointing,
                  compile=args.compile, dtype=str(dtype), device=_device_name(device), torch=torch.__version__,
                  python=platform.python_version(), steps=args.steps),
        step_s=step_s, tokens_per_s=tokens_per_s,
        # Profiling itself slows a step down a little; bench_memory gives the clean figure.
        mfu=mfu(params, tokens_per_s) if device.type == "cuda" else None,
        mfu_with_routing_pass=mfu(params, tokens_per_s, routed_fraction(moe, data)) if device.type == "cuda" else None,
        executed_flops_by_op=flops, executed_vs_4n=flops_per_step / (4 * params * batch * seq),
        # hardware FLOPs utilisation: what really ran (forward and backward), over the peak
        hfu=flops_per_step / step_s / (PEAK_BF16_TFLOPS * 1e12) if device.type == "cuda" else None,
        busy_s_per_step=busy / args.steps, busy_fraction=busy / sum(walls),
        groups={g: s / args.steps for g, s in sorted(groups.items(), key=lambda kv: -kv[1])},
        top=[dict(name=n[:160], group=group_of(n), s_per_step=s / args.steps)
             for n, s in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]],
    )
    report(result)
    out = Path(args.out or Path(__file__).parent / "results" / f"profile-{args.shape}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def report(result):
    meta = result["meta"]
    print(f"{meta['shape']}: {meta['batch']} x {meta['seq']}, E={meta['experts']}, {meta['dtype']}, {meta['device']}"
          f"{', compiled' if meta['compile'] else ''}{', checkpointing' if meta['checkpointing'] else ''}")
    mfu_text = ""
    if result["mfu"] is not None:
        mfu_text = f", MFU {result['mfu'] * 100:.1f}%"
        if result["mfu_with_routing_pass"] != result["mfu"]:
            mfu_text += f", {result['mfu_with_routing_pass'] * 100:.1f}% with the routing pass"
    print(f"step {result['step_s'] * 1e3:.1f} ms ({result['tokens_per_s']:.0f} tok/s{mfu_text}); "
          f"kernels/ops busy {result['busy_fraction'] * 100:.0f}% of it")
    hfu = f"; HFU {result['hfu'] * 100:.1f}%" if result["hfu"] is not None else ""
    by_op = ", ".join(f"{op} {n / 1e9:.1f}" for op, n in sorted(result["executed_flops_by_op"].items(),
                                                                 key=lambda kv: -kv[1]))
    print(f"executed FLOPs: {result['executed_vs_4n']:.3f}x the 4N that MFU credits{hfu} (GFLOP by op: {by_op})")
    busy = result["busy_s_per_step"]
    for group, seconds in result["groups"].items():
        print(f"  {group:<30}{seconds * 1e3:9.2f} ms  {seconds / busy * 100:5.1f}%")
    print("top:")
    for row in result["top"]:
        print(f"  {row['s_per_step'] * 1e3:8.2f} ms  {row['group']:<22} {row['name'][:90]}")


if __name__ == "__main__":
    main()
