"""`dylora-moe plan --config RECIPE`: the command line."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import UserError, guarded
from ..recipe import load_recipe
from .fit import GPUS, format_report, plan_recipe, resolve_gpu


def main(argv=None) -> int:
    return guarded(_main, list(sys.argv[1:] if argv is None else argv))


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="dylora-moe plan", description="Estimate the peak GPU memory of a recipe and which GPU / accelerate "
                                            "config it fits, before launching it.",
        epilog="Any recipe field can be overridden as in `dylora-moe train`: --num_experts 8 --load_in_4bit "
               "--train_batch_size 4 --gradient_checkpointing.")
    parser.add_argument("--config", help="recipe YAML (configs/codegemma-2b.yaml, ...)")
    parser.add_argument("--gpu", action="append", help=f"only these GPUs: {', '.join(GPUS)} (repeatable)")
    parser.add_argument("--num_processes", type=int, default=1, help="world size ZeRO shards the optimizer over")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args, overrides = parser.parse_known_args(argv)
    if args.num_processes < 1:
        raise UserError(f"--num_processes={args.num_processes}: expected an integer >= 1")
    gpus = [resolve_gpu(g) for g in args.gpu] if args.gpu else None
    cfg = load_recipe(args.config, overrides, require_base=True)
    report = plan_recipe(cfg, args.config or "", args.num_processes, gpus)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0

