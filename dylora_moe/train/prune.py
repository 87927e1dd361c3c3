"""`dylora-moe prune`: drop the experts nobody routes to, shrinking the router with them.

    dylora-moe prune runs/demo --threshold 0.02                 # -> runs/demo-pruned/
    dylora-moe prune runs/demo --threshold 0.02 --output runs/demo-small

Usage is measured as inference routes (eval/usage.py): the mean gate of each expert over
the validation examples of every source of the run's recipe. Experts below the threshold
are removed (DyLoRAMoE.prune_expert); the others keep their weights, in order. The result is a new portable model folder (experts,
PEFT adapters, tokenizer, recipe, the tiny base if the run has one, and prune.json with
the usage it was decided on); it never overwrites anything.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..errors import UserError, guarded
from ..eval.loading import load_run, local_base
from ..eval.usage import expert_usage
from ..model.portable import write_portable


def prune_run(run, threshold: float, output=None, base_model=None) -> dict:
    """Measure, prune, write; returns the summary also written as prune.json."""
    out = Path(output) if output else Path(str(Path(run).resolve()).rstrip("/") + "-pruned")
    if out.exists():  # checked before anything loads
        raise UserError(f"{out} already exists: choose another --output (prune never overwrites)")
    loaded = load_run(run, base_model=base_model)
    recipe = loaded.recipe
    if recipe is None:
        raise FileNotFoundError(f"{loaded.source / 'recipe.yaml'}: missing; prune measures usage on the run's "
                                "validation data")
    moe = loaded.moe
    usage, by_source = expert_usage(moe, recipe, loaded.tokenizer)
    drop = [i for i, u in enumerate(usage) if u < threshold]
    if len(drop) == len(usage):
        raise UserError(f"--threshold {threshold}: every expert is below it (usage {_rounded(usage)}); nothing would "
                        "be left")
    for index in sorted(drop, reverse=True):  # from the end, so the remaining indices stay valid
        moe.prune_expert(index, note={"usage": usage[index], "threshold": threshold})
    recipe.moe = moe.config
    summary = {"source": str(loaded.source), "threshold": threshold, "usage": usage, "usage_by_source": by_source,
               "pruned": drop, "kept": [i for i in range(len(usage)) if i not in drop],
               "num_experts": moe.config.num_experts, "weights_sha256_before": loaded.weights_sha256}
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_portable(moe, loaded.tokenizer, recipe, tmp)
    base = local_base(loaded.source)
    if base is not None and base_model is None:  # a tiny random base lives in the run: take it along
        shutil.copytree(base, tmp / "base_model")
    (tmp / "prune.json").write_text(json.dumps(summary, indent=2) + "\n")
    tmp.rename(out)
    summary["output"] = str(out)
    return summary


def _rounded(values) -> list[float]:
    return [round(v, 4) for v in values]


def main(argv=None) -> int:
    return guarded(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="dylora-moe prune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run dir, one of its checkpoints, or a portable folder")
    parser.add_argument("--threshold", type=float, default=0.02,
                        help="remove experts whose mean gate over the validation set is below this (default 0.02)")
    parser.add_argument("--output", help="the new model folder (default: RUN-pruned); must not exist")
    parser.add_argument("--base_model", help="the base model, if not the run's own")
    args = parser.parse_args(argv)
    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold {args.threshold}: expected a number in (0, 1)")
    summary = prune_run(args.run, args.threshold, args.output, args.base_model)
    print(f"usage {_rounded(summary['usage'])}: pruned {summary['pruned'] or 'none'}, kept {summary['kept']} "
          f"-> {summary['num_experts']} experts in {summary['output']}")
    return 0
