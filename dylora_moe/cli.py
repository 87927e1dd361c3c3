"""`dylora-moe <command>`: one entry point; each command lives in its own module.

    dylora-moe train --config configs/demo.yaml [--field value ...]
    dylora-moe plan --config configs/codegemma-2b.yaml [--field value ...] [--gpu L4] [--json]
    dylora-moe prune RUN --threshold 0.02 [--output DIR]
    dylora-moe submit vertex --project P --region R --image URI --base_output_dir gs://B/run [--dry-run]
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # the training job has its own parser: recipe + any --field value
        from .train.cli import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["generate"]:
        from .eval.generate import main as generate_main

        return generate_main(argv[1:])
    if argv[:1] == ["eval"]:
        from .eval.functional import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["report"]:
        from .eval.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["plan"]:
        from .plan import main as plan_main

        return plan_main(argv[1:])
    if argv[:1] == ["prune"]:
        from .eval.prune import main as prune_main

        return prune_main(argv[1:])
    if argv[:2] == ["submit", "vertex"]:  # the Vertex AI submitter (code in launch/)
        from launch.vertex import main as vertex_main

        return vertex_main(argv[2:])
    parser = argparse.ArgumentParser(prog="dylora-moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="train from a recipe (configs/*.yaml); any field can be overridden")
    commands.add_parser("generate", help="generate from a trained run: RUN --prompt ... [--expert i|--uniform|--base]")
    commands.add_parser("eval", help="loss per source and pass@k (MBPP, HumanEval, demo) of a run; --compare")
    commands.add_parser("report", help="routing report of a run: plots and a markdown summary")
    commands.add_parser("plan", help="peak GPU memory of a recipe per component, and which GPU / accelerate config fits")
    commands.add_parser("prune", help="drop experts nobody routes to: RUN --threshold 0.02 [--output DIR]")
    commands.add_parser("submit", help="submit vertex ...: run a recipe as a Vertex AI CustomJob (--dry-run prints it)")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
