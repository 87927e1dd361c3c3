"""`dylora-moe <command>`: one entry point; each command lives in its own module."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from . import demo

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the training job has its own parser: recipe + any --field value
        from .train.cli import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="dylora-moe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="offline demo: tiny random Gemma, 4 experts, CPU, seconds")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.main)
    commands.add_parser("train", help="train from a recipe: dylora-moe train --config configs/demo.yaml [--field value]",
                        add_help=False)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
