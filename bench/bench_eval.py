"""What `dylora-moe eval` costs per sample, one prompt at a time and batched, in one run.

    dylora-moe train --config configs/demo.yaml --output_dir runs/demo    # once, ~1 min
    python bench/bench_eval.py runs/demo                                  # ~2-3 min on 2 cores

Sample = one completion generated and executed. Measured on the same tasks, with the
same decoding (`--n 5 --temperature 0.8`, as docs/evaluation.md), for the routed mixture and
the base (which, untrained, writes until max_new_tokens):
  generate, one at a time   one prompt and one sample per generate() call, plus a
                            forward for the gates; with torch's default threads and
                            with one (to tell batching apart from threading)
  generate, batched         --batch_size prompts per call, n samples each
                            (num_return_sequences), one torch thread on CPU
  execute, new interpreter  a bare Python per program, no isolation (the floor for
                            any sandbox that starts a process per program)
  execute, sandbox          the sandbox: a forked process per program, isolated
Ratios are within this run, so a busy machine slows both sides alike.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dylora_moe.eval.command import Decoding, load_tasks  # noqa: E402
from dylora_moe.eval.generate import generate_batch, generation_config, left_padded  # noqa: E402
from dylora_moe.eval.loading import load_run  # noqa: E402
from dylora_moe.eval.sandbox import CLEAN_ENV, Limits, interpreter, run_many  # noqa: E402
from dylora_moe.eval.variants import resolve  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained run (see above)")
    p.add_argument("--tasks", default="demo")
    p.add_argument("--limit", type=int, default=8, help="tasks measured")
    p.add_argument("--n", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", help="JSON path (default bench/results/eval-<tasks>.json)")
    return p.parse_args(argv)


def one_at_a_time(loaded, tasks, decoding, routing) -> list:
    """The previous eval loop: per sample, a gates forward and a one-row generate()."""
    config = generation_config(loaded.tokenizer, decoding.max_new_tokens, decoding.temperature, decoding.top_p)
    out = []
    for task in tasks:
        for sample in range(decoding.n):
            torch.manual_seed(zlib.crc32(f"{task.id}/{sample}".encode()))
            if not routing.is_base:
                with torch.no_grad():
                    loaded.moe(**left_padded(loaded.tokenizer, [task.prompt]))
            [(texts, _)] = generate_batch(loaded, [task.prompt], config, routing)
            out.append((task, texts[0]))
    return out


def batched(loaded, tasks, decoding, routing, batch_size) -> list:
    config = generation_config(loaded.tokenizer, decoding.max_new_tokens, decoding.temperature, decoding.top_p,
                               decoding.n)
    out = []
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        for task, (texts, _) in zip(chunk, generate_batch(loaded, [t.prompt for t in chunk], config, routing,
                                                          n=decoding.n)):
            out += [(task, text) for text in texts]
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def fresh_interpreters(programs, python) -> None:
    """No isolation at all, one interpreter per program, as many at a time as the sandbox."""
    def one(p):
        subprocess.run([python, "-I", "-c", p.code + "\n" + p.tests], env=CLEAN_ENV, capture_output=True, timeout=60)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(one, programs))


def main(argv=None) -> dict:
    args = parse_args(argv)
    loaded = load_run(args.run)
    from dylora_moe.recipe import load_recipe

    recipe_path = loaded.source / "recipe.yaml"
    recipe = load_recipe(str(recipe_path)) if recipe_path.is_file() else None
    tasks = load_tasks(args.tasks, recipe, args.limit)
    decoding = Decoding(args.n, args.temperature, 0.95, args.max_new_tokens)
    default_threads = torch.get_num_threads()
    rows, samples = [], []
    few = tasks[:max(1, len(tasks) // 2)]  # the slow path on half the tasks: samples/s compare all the same
    for name in ("mixture", "base"):
        routing = resolve(name, loaded.moe.config.num_experts)
        batched(loaded, tasks[:1], decoding, routing, 1)  # warm-up: first-call costs are not per sample
        torch.set_num_threads(default_threads)
        _, before = timed(lambda: one_at_a_time(loaded, few, decoding, routing))
        torch.set_num_threads(1)
        _, before_1 = timed(lambda: one_at_a_time(loaded, few, decoding, routing))
        made, after = timed(lambda: batched(loaded, tasks, decoding, routing, args.batch_size))
        torch.set_num_threads(default_threads)
        slow, fast = len(few) * args.n, len(tasks) * args.n
        rows.append({"variant": name, "samples": fast, "one_at_a_time_samples_per_s": slow / before,
                     "one_at_a_time_1_thread_samples_per_s": slow / before_1, "batched_samples_per_s": fast / after,
                     "speedup": (fast / after) / (slow / before),
                     "speedup_vs_1_thread": (fast / after) / (slow / before_1)})
        samples += made
    programs = [task.program(text) for task, text in samples]
    python = interpreter()[0]
    _, fresh = timed(lambda: fresh_interpreters(programs[:len(programs) // 4], python))
    results, sandboxed = timed(lambda: run_many(programs, Limits()))
    execution = {"programs": len(programs), "fresh_interpreter_programs_per_s": (len(programs) // 4) / fresh,
                 "sandbox_programs_per_s": len(programs) / sandboxed, "isolation": results[0].isolation,
                 "speedup_vs_one_fresh_interpreter": (fresh / (len(programs) // 4)) / (sandboxed / len(programs))}
    report = {"run": str(loaded.source), "tasks": args.tasks, "limit": args.limit, "n": args.n,
              "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
              "torch_threads_default": default_threads, "generation": rows, "execution": execution}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"eval-{args.tasks}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| variant | one at a time (samples/s) | same, 1 thread | batched, 1 thread | speed-up (vs 1 thread) |\n"
          "|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['one_at_a_time_samples_per_s']:.2f} | {r['one_at_a_time_1_thread_samples_per_s']:.2f}"
              f" | {r['batched_samples_per_s']:.2f} | {r['speedup']:.1f}x ({r['speedup_vs_1_thread']:.1f}x) |")
    print(f"\nexecution ({execution['isolation']}): {execution['fresh_interpreter_programs_per_s']:.1f} programs/s "
          f"with a fresh interpreter each, {execution['sandbox_programs_per_s']:.1f} in the sandbox "
          f"({execution['speedup_vs_one_fresh_interpreter']:.1f}x)\nwritten: {out}")
    return report


if __name__ == "__main__":
    main()
