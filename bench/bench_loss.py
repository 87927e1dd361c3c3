"""The LM loss alone: time and peak memory of its forward + backward, for the plain loss
(whole logits), the chunked loss with each chunk checkpointed (so the backward recomputes
its logits) and the fused chunked loss the model uses (the gradient of each chunk computed
in the forward: model/loss.py), interleaved in one run.

    python bench/bench_loss.py                         # CPU, 512 tokens, 256k vocabulary, ~1 min
    python bench/bench_loss.py --shape codegemma-2b    # GPU, bf16, 4 x 1024 tokens, hidden 2048
    python bench/bench_loss.py --compile               # + the per-chunk softmax compiled (model.compile)

The LM head is frozen, as in training (tied to the frozen embeddings). Ratios are to the
plain loss of the same run; nothing here is asserted in tests but that it runs and that
the chunked variants hold less memory (deterministic), see tests/test_bench.py.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dylora_moe.model.loss import auto_chunk_tokens, causal_lm_loss, chunked_causal_lm_loss, compiled_chunk_loss
from dylora_moe.plan import measured_cpu_peak

SHAPES = {
    "tiny": dict(rows=2, seq=64, hidden=32, vocab=4096, chunk=32),      # smoke test
    "small": dict(rows=1, seq=512, hidden=256, vocab=256_000, chunk=None),
    "codegemma-2b": dict(rows=4, seq=1024, hidden=2048, vocab=256_000, chunk=None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--rounds", type=int, default=3, help="interleaved sweeps over the variants (median reported)")
    p.add_argument("--compile", action="store_true",
                   help="add the fused loss with its softmax compiled (model.compile; inductor takes ~1 min on CPU)")
    p.add_argument("--out", help="JSON path (default bench/results/loss-<shape>-<device>.json)")
    return p.parse_args(argv)


def plain(hidden, weight, labels, chunk):
    return causal_lm_loss(F.linear(hidden, weight), labels)[0]


def checkpointed_chunks(hidden, weight, labels, chunk):
    """The first chunked loss (kept here only to measure against): autograd, each chunk
    under activation checkpointing, so its logits are built again in the backward."""
    shift = labels[:, 1:].reshape(-1)
    keep = shift != -100
    states, targets = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep], shift[keep]
    total = 0
    for start in range(0, targets.shape[0], chunk):
        total = total + checkpoint(lambda s, t: F.cross_entropy(F.linear(s, weight).float(), t, reduction="sum"),
                                   states[start:start + chunk], targets[start:start + chunk], use_reentrant=False)
    return total / keep.sum()


def fused(hidden, weight, labels, chunk):
    return chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk)[0]


def fused_compiled(hidden, weight, labels, chunk, _compiled=[]):
    if not _compiled:  # built on first use: compiling is part of the warm-up
        _compiled.append(compiled_chunk_loss())
    return chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=chunk, chunk_fn=_compiled[0])[0]


VARIANTS = {"plain": plain, "chunked, checkpointed (before)": checkpointed_chunks, "chunked, fused (now)": fused,
            "chunked, fused, compiled": fused_compiled}


def problem(shape, device, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(shape["rows"], shape["seq"], shape["hidden"], generator=g).to(device, dtype)
    weight = (torch.randn(shape["vocab"], shape["hidden"], generator=g) / shape["hidden"] ** 0.5).to(device, dtype)
    labels = torch.randint(0, shape["vocab"], (shape["rows"], shape["seq"]), generator=g).to(device)
    labels[:, : shape["seq"] // 8] = -100  # a prompt
    return hidden.requires_grad_(), weight, labels


def run_once(fn, hidden, weight, labels, chunk, device, autocast):
    """(seconds, peak bytes above what was allocated before) of one forward + backward."""
    hidden.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with autocast():
        loss = fn(hidden, weight, labels, chunk)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
    return seconds, peak, loss.item()


def cpu_peak(fn, hidden, weight, labels, chunk, autocast) -> int:
    """Peak bytes of torch's CPU allocations during one forward + backward."""
    hidden.grad = None

    def step():
        with autocast():
            loss = fn(hidden, weight, labels, chunk)
        loss.backward()

    return measured_cpu_peak(step)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[args.shape]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == torch.bfloat16 \
        else (lambda: torch.autocast(device.type, enabled=False))
    chunk = shape["chunk"] or auto_chunk_tokens(shape["vocab"])
    hidden, weight, labels = problem(shape, device, dtype)

    variants = {name: fn for name, fn in VARIANTS.items() if args.compile or fn is not fused_compiled}
    times = {name: [] for name in variants}
    peaks, losses, grads = {}, {}, {}
    for fn in variants.values():  # warm-up
        run_once(fn, hidden, weight, labels, chunk, device, autocast)
    for _ in range(args.rounds):
        for name, fn in variants.items():
            seconds, peak, losses[name] = run_once(fn, hidden, weight, labels, chunk, device, autocast)
            times[name].append(seconds)
            grads[name] = hidden.grad.float().clone()
            if peak is not None:
                peaks[name] = max(peaks.get(name, 0), peak)
    if device.type == "cpu":
        peaks = {name: cpu_peak(fn, hidden, weight, labels, chunk, autocast) for name, fn in variants.items()}

    rows = []
    base = statistics.median(times["plain"])
    for name in variants:
        step = statistics.median(times[name])
        rows.append(dict(name=name, seconds=step, vs_plain=step / base, peak_mib=peaks[name] / 2**20,
                         loss=losses[name],
                         max_grad_diff=(grads[name] - grads["plain"]).abs().max().item()))
    result = dict(meta=dict(shape=args.shape, **shape, chunk_tokens=chunk, dtype=str(dtype), device=device.type,
                            torch=torch.__version__, python=platform.python_version(), rounds=args.rounds),
                  rows=rows)
    print(f"{'variant':<32}{'s/step':>9}{'vs plain':>10}{'peak MiB':>11}{'max |dgrad|':>13}")
    for r in rows:
        print(f"{r['name']:<32}{r['seconds']:>9.3f}{r['vs_plain']:>10.2f}{r['peak_mib']:>11.1f}{r['max_grad_diff']:>13.2e}")
    out = Path(args.out or Path(__file__).parent / "results" / f"loss-{args.shape}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
