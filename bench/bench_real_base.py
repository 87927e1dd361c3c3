"""Does the mixture beat one LoRA on a real pretrained base? SmolLM2-135M-Instruct, Code
Alpaca + MBPP (official split), the recipe configs/smollm2-135m.yaml: the base alone, one
LoRA with at least the mixture's trainable parameters, and the mixture, on the same data,
steps and seeds. Offline it trains on the GGUF copy `dylora-moe fetch smollm2-135m` caches.

    python bench/bench_real_base.py --seeds 0,1                       # losses, ~2 h on 2 cores
    python bench/bench_real_base.py --seeds 0,1 --pass_at_1           # + HumanEval and MBPP, greedy
    python bench/bench_real_base.py --variants lora,mixture,mixture-token --steps 60

Columns:
- loss: validation loss per source (the mean over seeds, [min-max]); vs lora: the mean
  over sources of loss / the LoRA's; < 1 = the mixture wins.
- params: trainable parameters; the LoRA's rank is the smallest whose parameters are at
  least those of the first mixture variant asked (its own routers included), and its
  alpha / r is that mixture's (a uniform mixture is that LoRA: docs/design.md).
- least used: the smallest mean gate of an expert over the validation rows; separation:
  total variation between the two sources' mean gates (0 = the same experts, 1 = disjoint).
- s/step: median seconds per optimizer step.
- pass@1 (seed 0 only, once): HumanEval (164 problems) and MBPP (the 500 official test
  tasks 11-510), both as bigcode-evaluation-harness prompts them (HumanEval: the signature
  and docstring, stripped; MBPP: the task and its first test in a docstring), greedy, 384
  new tokens at most. Paired with the LoRA's: the tasks only one of the two solves, and
  the exact McNemar p-value of that split (small: a real difference).
Needs DYLORA_DATA_DIR (code_alpaca_2k.json, mbpp.jsonl). Finished runs are reused.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "smollm2-135m.yaml"
SOURCES = ("code_alpaca", "mbpp")
# Recipe overrides per variant; "lora" gets its rank and alpha from the mixture (lora_shape).
VARIANTS = {
    "base": None,                                           # no training: the base's own numbers
    # one LoRA at its own rate (--lora_lr); no k-means start (one expert, nothing to split)
    "lora": ["--num_experts", "1", "--routing", "sequence", "--router_input", "embeddings", "--router_init", "normal"],
    "mixture": [],                                          # the recipe as shipped
    # the recipe's alternative: a router in every layer, per token, as MixLoRA, LoRAMoE and HydraLoRA route
    "mixture-token": ["--routing", "token", "--router_input", "layer", "--router_init", "normal",
                      "--balance_coefficient", "0.01"],
}
PASS_TASKS = {"humaneval": "bigcode", "mbpp": "bigcode"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="base,lora,mixture", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, help="optimizer steps (default: the recipe's)")
    p.add_argument("--pass_at_1", action="store_true", help="also HumanEval and MBPP pass@1 (seed 0, greedy)")
    p.add_argument("--pass_tasks", default=",".join(PASS_TASKS), help="task sets for --pass_at_1")
    p.add_argument("--limit", type=int, help="pass@1 on the first N tasks only (a quick check)")
    p.add_argument("--extra", default="", help="more recipe overrides for every trained run")
    # 1e-3: the best of {5e-4, 1e-3, 2e-3} at the mixture's scale, as for the mixture (docs/benchmarks.md)
    p.add_argument("--lora_lr", default="1e-3", help="the LoRA's learning rate")
    p.add_argument("--base_dir", help="a model folder instead of the fetched GGUF (bench/random_base.py: the "
                                      "real shape with random weights, for seconds per step on a GPU)")
    p.add_argument("--work", default=str(ROOT / "bench" / "results" / "real-base"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "real-base.json"))
    args = p.parse_args(argv)
    args.variants = args.variants.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.pass_tasks = args.pass_tasks.split(",")
    for name in args.pass_tasks:
        if name not in PASS_TASKS:
            p.error(f"--pass_tasks {name!r}: expected some of {', '.join(PASS_TASKS)}")
    for name in args.variants:
        if name not in VARIANTS:
            p.error(f"--variants {name!r}: expected some of {', '.join(VARIANTS)}")
    return args


def offline_base() -> list[str]:
    done = subprocess.run([sys.executable, "-m", "dylora_moe.cli", "fetch", "smollm2-135m"], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: dylora-moe fetch smollm2-135m failed: {done.stderr.strip()[-500:]}")
    return done.stdout.split()


def data_overrides() -> list[str]:
    root = Path(os.environ.get("DYLORA_DATA_DIR", ""))
    files = {"code_alpaca": root / "code_alpaca_2k.json", "mbpp": root / "mbpp.jsonl"}
    if not os.environ.get("DYLORA_DATA_DIR") or not all(f.is_file() for f in files.values()):
        sys.exit("error: set DYLORA_DATA_DIR to the folder holding code_alpaca_2k.json and mbpp.jsonl")
    return ["--sources", "[" + ", ".join(f"{{name: {n}, path: '{p}'}}" for n, p in files.items()) + "]"]


BASE_CONFIGS: dict = {}  # (base_model, gguf_file) -> its HF config


def trainable_parameters(overrides: list[str]) -> int:
    """Of the recipe with these overrides, on the meta device (nothing allocated)."""
    from dylora_moe.plan.shape import meta_moe, resolve_base_config
    from dylora_moe.recipe import load_recipe

    cfg = load_recipe(str(RECIPE), overrides)
    key = (cfg.model.base_model, cfg.model.gguf_file)
    if key not in BASE_CONFIGS:  # a GGUF file's header takes ~10 s to parse (its vocabulary)
        BASE_CONFIGS[key] = resolve_base_config(cfg.model)[0]
    return sum(p.numel() for p in meta_moe(BASE_CONFIGS[key], cfg.moe).trainable_parameters())


def lora_rank(common: list[str], mixture: str) -> int:
    """The smallest LoRA rank with at least this mixture variant's trainable parameters."""
    target = trainable_parameters(common + VARIANTS[mixture])
    one, two = (trainable_parameters(common + VARIANTS["lora"] + ["--lora_r", str(r)]) for r in (1, 2))
    per_rank = two - one  # the rest (its one-expert router) does not grow with the rank
    return math.ceil((target - (one - per_rank)) / per_rank)


def lora_shape(common: list[str], mixture: str) -> tuple[int, float]:
    """The rank and alpha of one LoRA of this mixture variant's budget, at the mixture's scale
    alpha / r: there a uniform mixture of E experts of rank r is exactly one LoRA of rank E*r,
    so the two differ only by what the router adds. At the recipe's alpha instead (16: a scale
    of 0.48 at rank 33, against the experts' 4) the LoRA trained worse at every rate tried
    (docs/benchmarks.md), a handicap that flattered the mixture."""
    from dylora_moe.recipe import load_recipe

    rank = lora_rank(common, mixture)
    return rank, load_recipe(str(RECIPE), common + VARIANTS[mixture]).moe.scaling * rank


def train(out: Path, overrides: list[str], seed: int) -> None:
    if (out / "final").is_dir():
        return
    command = [sys.executable, "-m", "dylora_moe.train", "--config", str(RECIPE), *overrides,
               "--output_dir", str(out), "--seed", str(seed), "--save_every", "0", "--resume_from_checkpoint", "null"]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    done = subprocess.run(command, cwd=ROOT, env=offline_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{out}: exit {done.returncode}\n{done.stderr[-3000:]}")


def offline_env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def trained_row(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if "eval" in r][-1]["eval"]
    times = [r["seconds_per_step"] for r in records if "seconds_per_step" in r][1:]
    usage = [final[s]["gate_mean"] for s in SOURCES]
    return {"loss": {s: final[s]["loss"] for s in SOURCES}, "usage": usage,
            "least_used": min(statistics.mean(u) for u in zip(*usage)),
            "separation": 0.5 * sum(abs(a - b) for a, b in zip(*usage)),
            "seconds_per_step": statistics.median(times) if times else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r),
            "memory_gib": max(r["memory_gib"] for r in records if "memory_gib" in r)}


def base_row(run: Path) -> dict:
    """The base's validation loss: a trained run's own data, its experts switched off."""
    from dylora_moe.data import build_datasets
    from dylora_moe.data.loaders import eval_loaders
    from dylora_moe.eval.loading import load_run
    from dylora_moe.eval.losses import evaluate_losses

    loaded = load_run(run)
    bundle = build_datasets(loaded.recipe.data, loaded.tokenizer)
    loaders = eval_loaders(bundle.validation, loaded.tokenizer.pad_token_id, loaded.recipe.train.eval_batch_size)
    with loaded.moe.experts_disabled():
        results = evaluate_losses(loaded.moe, loaders, loaded.moe.config.num_experts)
    return {"loss": {s: results[s]["loss"] for s in SOURCES}, "params": 0}


def pass_at_1(run: Path, variant: str, task_sets: list[str], limit) -> tuple[dict, dict]:
    """Greedy pass@1 per task set, and the ids of the tasks solved: the routed mixture of
    the run, or its base alone."""
    scores, solved = {}, {}
    for task_set in task_sets:
        fmt = PASS_TASKS[task_set]
        out = run / f"pass1-{variant}-{task_set}"
        # batch 32: a greedy SmolLM2 decode step on 2 cores costs 16 ms a row at 32 rows, 26 ms at 16
        command = [sys.executable, "-m", "dylora_moe.cli", "eval", str(run), "--tasks", task_set, "--prompt_format",
                   fmt, "--n", "1", "--k", "1", "--temperature", "0", "--max_new_tokens", "384", "--no_loss",
                   "--batch_size", "32", "--threads", "2", "--variants", "base" if variant == "base" else "mixture",
                   "--out", str(out)] + (["--limit", str(limit)] if limit else [])
        done = subprocess.run(command, cwd=ROOT, env=offline_env(), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"eval {run} {task_set}: exit {done.returncode}\n{done.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
        scores[task_set] = summary["functional"][task_set][0]["pass@1"]
        samples = [json.loads(line) for line in (out / task_set / "samples.jsonl").read_text().splitlines()]
        solved[task_set] = sorted(s["task_id"] for s in samples if s["passed"])
    return scores, solved


def paired(ours: list[str], theirs: list[str]) -> dict:
    """Tasks only one side solves, and the exact McNemar p-value of that split: how likely
    so uneven a split is if the two solve these tasks equally often."""
    only_ours, only_theirs = len(set(ours) - set(theirs)), len(set(theirs) - set(ours))
    n, low = only_ours + only_theirs, min(only_ours, only_theirs)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(low + 1)) / 2 ** n) if n else 1.0
    return {"only_this": only_ours, "only_lora": only_theirs, "mcnemar_p": p}


def combine(rows: list[dict]) -> dict:
    out = {"seeds": len(rows), "per_seed": rows}
    out["loss"] = {s: statistics.mean(r["loss"][s] for r in rows) for s in SOURCES}
    out["range"] = {s: (min(r["loss"][s] for r in rows), max(r["loss"][s] for r in rows)) for s in SOURCES}
    for key in ("params", "least_used", "separation", "seconds_per_step", "tokens_per_s", "memory_gib"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = statistics.mean(values)
    return out


def table(results: dict) -> str:
    head = ["variant", "params", "loss code_alpaca", "loss mbpp", "vs lora", "least used", "separation",
            "HumanEval pass@1", "MBPP pass@1", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lora = results.get("lora")
    for name, r in results.items():
        def loss(s):
            lo, hi = r["range"][s]
            return f"{r['loss'][s]:.4f}" + (f" [{lo:.4f}-{hi:.4f}]" if r["seeds"] > 1 else "")
        vs = statistics.mean(r["loss"][s] / lora["loss"][s] for s in SOURCES) if lora else float("nan")
        p1 = r.get("pass_at_1", {})
        cell = (lambda k, f: f.format(r[k]) if k in r else "-")
        lines.append("| " + " | ".join([
            name, f"{r['params'] / 1e6:.2f}M" if r["params"] else "-", loss("code_alpaca"), loss("mbpp"),
            f"{vs:.3f}", cell("least_used", "{:.2f}"), cell("separation", "{:.2f}"),
            f"{p1['humaneval']:.3f}" if "humaneval" in p1 else "-", f"{p1['mbpp']:.3f}" if "mbpp" in p1 else "-",
            cell("seconds_per_step", "{:.1f}")]) + " |")
    return "\n".join(lines)


def run_of(variant: str, trained: list[str], work: Path, seed: int) -> Path:
    """The run a variant's numbers come from; the base borrows the first trained one's."""
    return work / (variant if variant != "base" else (trained[0] if trained else "base")) / f"seed{seed}"


def main(argv=None) -> int:
    args = parse_args(argv)
    base = ["--base_model", args.base_dir] if args.base_dir else offline_base()
    common = base + data_overrides() + (["--max_steps", str(args.steps)] if args.steps else [])
    common += args.extra.split()
    # the LoRA's budget is the first mixture asked (a router per layer has more parameters than one
    # per sequence); computed only for a LoRA run, as --extra may make a mixture invalid (say per-layer
    # routers with a k-means init, which they refuse)
    mixtures = [v for v in args.variants if v.startswith("mixture")] or ["mixture"]
    rank, alpha = lora_shape(common, mixtures[0]) if "lora" in args.variants else (None, None)
    lora = ["--lora_r", str(rank), "--lora_alpha", str(alpha), "--learning_rate", args.lora_lr] if rank else []
    overrides = {name: common + extra + (lora if name == "lora" else [])
                 for name, extra in VARIANTS.items() if extra is not None}
    work, started, results = Path(args.work), time.time(), {}
    trained = [v for v in args.variants if v != "base"]
    for name in trained:
        rows = []
        for seed in args.seeds:
            run = work / name / f"seed{seed}"
            train(run, overrides[name], seed)
            rows.append({**trained_row(run), "params": trainable_parameters(overrides[name])})
        results[name] = combine(rows)
    if "base" in args.variants:
        # the base's numbers need a run's data and tokenizer, not its experts (switched off):
        # a trained variant's run, or alone a one-step run of its own
        train(run_of("base", trained, work, args.seeds[0]),
              overrides[trained[0]] if trained else overrides["lora"] + ["--max_steps", "1"], args.seeds[0])
        results = {"base": combine([base_row(run_of("base", trained, work, args.seeds[0]))]), **results}
    if args.pass_at_1:
        for name in args.variants:
            run = run_of(name, trained, work, args.seeds[0])
            results[name]["pass_at_1"], results[name]["solved"] = pass_at_1(run, name, args.pass_tasks, args.limit)
        for name in results:
            if name != "lora" and "lora" in results:
                results[name]["vs_lora_tasks"] = {t: paired(results[name]["solved"][t], results["lora"]["solved"][t])
                                                  for t in args.pass_tasks}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"recipe": str(RECIPE.relative_to(ROOT)), "seeds": args.seeds, "steps": args.steps,
                               "lora_rank": rank, "lora_alpha": alpha, "extra": args.extra, "base_dir": args.base_dir,
                               "results": results,
                               "wall_s": time.time() - started}, indent=2) + "\n")
    print(f"\n## SmolLM2-135M-Instruct, Code Alpaca + MBPP (seeds {args.seeds}; LoRA rank {rank})\n\n{table(results)}")
    for name, r in results.items():
        for task_set, split in r.get("vs_lora_tasks", {}).items():
            print(f"{task_set}: {name} alone solves {split['only_this']}, the LoRA alone {split['only_lora']} "
                  f"(McNemar p {split['mcnemar_p']:.2f})")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
