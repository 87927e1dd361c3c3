"""The training loop (docs/design.md, "Training"): one Accelerate loop for CPU, one GPU,
DDP, DeepSpeed ZeRO-2 (with CPU optimizer offload), and a sharded base under ZeRO-3 or
FSDP2 (sharding.py), with exact resume and preemption.

    accelerate launch -m dylora_moe.train --config configs/demo.yaml

A run is built (run.py), restored or grown, fitted here step by step (each optimizer
step: step.py), and finished: the portable model, checked to be the same on every rank.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import sys
from pathlib import Path

import torch
from accelerate import skip_first_batches
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..eval.health import routing_warnings
from ..eval.losses import evaluate_losses
from ..eval.plots import save_usage_heatmap
from ..recipe import RunConfig
from . import growth, sharding
from .preemption import EXIT_PREEMPTED, PreemptionFlag
from .run import Run, TrainState, build_run, restore_or_grow
from .rundir import RunLock
from .step import Loop

logger = logging.getLogger("dylora_moe.train")

__all__ = ["train", "Preempted", "Loop", "TrainState"]


class Preempted(SystemExit):
    """Stopped by a signal after saving: SIGTERM (EXIT_PREEMPTED) or Ctrl-C (EXIT_INTERRUPTED)."""

    def __init__(self, code: int = EXIT_PREEMPTED):
        super().__init__(code)


def train(cfg: RunConfig) -> dict:
    lock, preemption = RunLock(Path(cfg.train.output_dir)), PreemptionFlag()
    try:
        run = build_run(cfg, lock)
        restore_or_grow(run)
        fit(run, preemption)
        summary = finish(run)
        run.accelerator.end_training()
        return summary
    finally:
        preemption.uninstall()
        lock.release()


def fit(run: Run, preemption: PreemptionFlag) -> None:
    """Optimizer steps until max_steps (or early stopping); evaluate, save and heed a
    stop signal at step boundaries."""
    acc, t, state = run.accelerator, run.cfg.train, run.state
    loop = Loop(run)
    preemption.install()
    if acc.is_main_process:
        logger.info("training %d optimizer steps (%d micro-batches of %d per step per process, %d process(es)); "
                    "%d trainable parameters", run.total_steps, t.gradient_accumulation_steps, t.train_batch_size,
                    acc.num_processes, sharding.trainable_elements(run.moe))
    batches = micro_batches(run.train_loader, state)
    try:
        _fit_steps(run, loop, batches, preemption)
    finally:
        batches.close()  # on the way out, errors too: the loader's worker processes end with it


def _fit_steps(run: Run, loop: Loop, batches, preemption: PreemptionFlag) -> None:
    acc, t, state = run.accelerator, run.cfg.train, run.state
    progress = _progress(acc, run.total_steps, state.step)
    last_saved = state.step if run.resume_from is not None else -1
    while state.step < run.total_steps:
        details = state.step % t.log_every == t.log_every - 1 or state.step + 1 == run.total_steps
        record = loop.step([next(batches) for _ in range(t.gradient_accumulation_steps)], with_details=details)
        progress.update(1)
        if loop.growth_request is not None:
            grow_on_novelty(run, loop)
        if record is not None:
            log_step(run, progress, record)
        is_last = state.step == run.total_steps
        stopped_early = ((t.eval_every and state.step % t.eval_every == 0) or is_last) and run_eval(run)
        if (t.save_every and state.step % t.save_every == 0) or is_last or stopped_early:
            save(run, {"epoch": state.epoch})
            last_saved = state.step
        if preemption.agreed(acc):
            if last_saved != state.step:
                save(run, {"epoch": state.epoch, "preempted": True})
            logger.warning("%s: saved at step %d, exiting with %d; resume with --resume_from_checkpoint auto",
                           preemption.name, state.step, preemption.exit_code)
            acc.end_training()
            raise Preempted(preemption.exit_code)
        if stopped_early:
            logger.info("early stopping at step %d", state.step)
            break
    progress.close()


def save(run: Run, extra: dict) -> None:
    with run.whole_experts():
        check_finite_weights(run.moe, run.state.step, run.checkpoints)
    run.checkpoints.save(run.state.step, run.write_portable, extra)


def log_step(run: Run, progress, record: dict) -> None:
    run.metrics.log(record, run.state.step)
    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    if progress.disable and run.accelerator.is_main_process:
        logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", run.state.step, run.total_steps, record["loss"],
                    record["lr"], record["tokens_per_s"])


def grow_on_novelty(run: Run, loop: Loop) -> None:
    """Add the expert the novelty trigger asked for, mid-run: schedule and data go on."""
    request, state, moe, t = loop.growth_request, run.state, run.moe, run.cfg.train
    reason = "novelty: " + request.reason(t.novelty_threshold)
    run.model, run.optimizer, run.raw_optimizer, report = run.grower.grow(
        run.model, run.raw_optimizer, 1, note={"step": state.step, "reason": reason})
    run.schedule.rebind(run.raw_optimizer)
    index = moe.config.num_experts - 1
    loop.novelty.seed(moe, index, request)
    loop.rebind()
    if run.accelerator.is_main_process:
        logger.info("step %d: added expert %d (%d of at most %d, init %s). %s. %s", state.step, index,
                    moe.config.num_experts, t.max_experts, t.grow_init, reason, report)
    run.metrics.log(growth.growth_record(state.step, moe, "novelty", reason, report,
                                         {"source": request.source, "similarity": request.similarity}), state.step)


def micro_batches(loader, state: TrainState):
    """The training stream across epochs, resuming at (epoch, batch_in_epoch). Closing it
    closes the epoch's iterator, which ends the DataLoader's worker processes (with
    persistent_workers off, torch's default, they live exactly as long as it)."""
    while True:
        loader.set_epoch(state.epoch)  # the seedable sampler reshuffles per epoch
        current = skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        epoch = iter(current)
        try:
            for batch in epoch:
                state.batch_in_epoch += 1
                yield batch
        finally:
            _close(epoch)
        state.epoch += 1
        state.batch_in_epoch = 0


def _close(iterator) -> None:
    """Accelerate's loaders iterate in a generator: closing it drops torch's iterator,
    whose __del__ shuts the workers down (torch has no public call for that); torch's own
    iterator (an unprepared loader) is simply dropped by the caller."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def run_eval(run: Run) -> bool:
    """Evaluate, log, plot; True when early stopping says stop."""
    accelerator, state, cfg, metrics, run_dir = run.accelerator, run.state, run.cfg, run.metrics, run.run_dir
    if not run.eval_loaders:
        return False
    results = evaluate_losses(run.model, run.eval_loaders, run.moe.config.num_experts, accelerator)
    mean_loss = sum(r["loss"] for r in results.values()) / len(results)
    metrics.log({"step": state.step, "eval": results, "eval_loss": mean_loss}, state.step)
    if accelerator.is_main_process:
        plots = run_dir / "plots"
        plots.mkdir(exist_ok=True)
        save_usage_heatmap({k: v["gate_mean"] for k, v in results.items()}, plots / f"usage-step{state.step}.png",
                           f"expert usage by source, step {state.step}")
        logger.info("eval step %d: %s", state.step, ", ".join(
            f"{k} loss {v['loss']:.4f} usage {[round(g, 2) for g in v['gate_mean']]}"
            for k, v in results.items()))
        for warning in routing_warnings(results):
            logger.warning("eval step %d: %s", state.step, warning)
    patience = cfg.train.early_stopping_patience
    if mean_loss < state.best_eval:
        state.best_eval, state.evals_without_improvement = mean_loss, 0
    else:
        state.evals_without_improvement += 1
    return bool(patience) and state.evals_without_improvement >= patience


def finish(run: Run) -> dict:
    """Cross-rank weight check, the final portable model, and where everything is."""
    with run.whole_experts():  # a sharded base: every rank sees the whole experts
        return _finish(run)


def _finish(run: Run) -> dict:
    accelerator, moe, state, run_dir = run.accelerator, run.moe, run.state, run.run_dir
    check_finite_weights(moe, state.step, None)
    digest = hashlib.sha256()
    for p in moe.trainable_parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    checksums = gather_object([digest.hexdigest()])
    run.metrics.log({"step": state.step, "final": True, "weights_sha256_per_rank": checksums,
                 "nonfinite_skipped": state.nonfinite_total}, state.step)
    if len(set(checksums)) != 1:
        raise RuntimeError(f"ranks ended with different expert weights: {checksums}")
    final = run_dir / "final"
    if accelerator.is_main_process:
        if final.exists():
            logger.info("%s already exists (a finished run): left untouched", final)
        else:
            tmp = final.with_name("final.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            run.write_portable(tmp)
            tmp.rename(final)
        print(f"done: {state.step} steps. outputs in {run_dir}/: final/ (experts, PEFT adapters, tokenizer), "
              f"checkpoints/, metrics.jsonl, plots/", flush=True)
    accelerator.wait_for_everyone()
    return {"step": state.step, "final_dir": str(final), "weights_sha256": checksums[0]}


def check_finite_weights(moe, step: int, checkpoints) -> None:
    """Never save experts that diverged: a NaN checkpoint or final/ would look like a result."""
    bad = [name for name, p in moe.named_parameters() if p.requires_grad and not torch.isfinite(p.detach()).all()]
    if bad:
        last = checkpoints.written[-1].name if checkpoints is not None and checkpoints.written else None
        raise FloatingPointError(f"expert weights are not finite at step {step} ({len(bad)} tensor(s), e.g. {bad[0]}); "
                                 f"nothing saved{f', {last} is the last good checkpoint' if last else ''}; lower "
                                 "train.learning_rate or check the data")


def _progress(accelerator, total, initial):
    # A bar on a terminal; in a log file (Vertex, CI) one line per logged step instead.
    return tqdm(total=total, initial=initial, disable=not accelerator.is_main_process or not sys.stderr.isatty(),
                desc="train", dynamic_ncols=True, file=sys.stderr)

