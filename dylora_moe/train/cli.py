"""Command line of the training job: a recipe plus `--key value` overrides."""
from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

import torch

from ..errors import guarded
from ..recipe import load_recipe
from .loop import Preempted, train


def main(argv=None) -> int:
    """Both `dylora-moe train` and `accelerate launch -m dylora_moe.train` land here, so
    both get the one error path (errors.guarded)."""
    return guarded(_main, argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="dylora-moe train", description="Train a DyLoRA-MoE mixture from a YAML recipe.",
        epilog="Any recipe field can be overridden: --num_experts 6 --bf16 --learning_rate 1e-4 "
               "--resume_from_checkpoint auto (or --section.field value).")
    parser.add_argument("--config", help="recipe YAML (configs/demo.yaml, configs/codegemma-2b.yaml)")
    args, overrides = parser.parse_known_args(argv)

    cfg = load_recipe(args.config, overrides, require_base=True)
    warn_if_plan_exceeds_gpu(cfg)

    try:
        train(cfg)
    except Preempted as e:
        return e.code
    return 0


def exit_process(code: int) -> None:
    """End a launched process with `code`, skipping the interpreter's teardown when it
    was one of several.

    By now the run has saved everything and destroyed its process group. But gloo's C++
    worker threads can still hold finished work whose tensors need the GIL to be freed;
    met during interpreter finalization, that aborts the process (SIGABRT, "terminate
    called without an active exception": pytorch/pytorch#190489, #179291), and torchrun
    then reports a finished run as failed (seen once in CI on a 2-process resume). So a
    distributed process flushes its logs and streams and leaves with os._exit: every file
    it wrote was closed by a `with` block before this point."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    gc.collect()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def warn_if_plan_exceeds_gpu(cfg) -> None:
    """Before anything loads: the memory plan (`dylora-moe plan`) against this process's
    GPU, as a warning, never an error. Shapes only (meta device), so it costs a second;
    skipped on CPU-only runs and on all but the first process of each node."""
    if not torch.cuda.is_available() or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    log = logging.getLogger("dylora_moe.train")
    try:
        from ..plan import fit_warning, strategy_from_env

        props = torch.cuda.get_device_properties(0)
        message = fit_warning(cfg, props.total_memory, props.name, strategy_from_env())
    except Exception as e:  # advice only: a planner problem must not stop a run
        log.debug("memory plan skipped: %s", e)
        return
    if message:
        log.warning(message)
