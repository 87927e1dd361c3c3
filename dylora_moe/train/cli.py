"""Command line of the training job: a recipe plus `--key value` overrides."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="dylora-moe train", description="Train a DyLoRA-MoE mixture from a YAML recipe.",
        epilog="Any recipe field can be overridden: --num_experts 6 --bf16 --learning_rate 1e-4 "
               "--resume_from_checkpoint auto (or --section.field value).")
    parser.add_argument("--config", help="recipe YAML (configs/demo.yaml, configs/codegemma-2b.yaml)")
    args, overrides = parser.parse_known_args(argv)
    from .config import load_recipe

    try:
        cfg = load_recipe(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .loop import Preempted, train

    try:
        train(cfg)
    except Preempted as e:
        return e.code
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
