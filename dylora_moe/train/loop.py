"""The training loop (docs/design.md, "Training"): one Accelerate loop for CPU, one GPU,
DDP, DeepSpeed ZeRO-2 (with CPU optimizer offload), and a sharded base under ZeRO-3 or
FSDP2 (sharding.py), with exact resume and preemption.

    accelerate launch -m dylora_moe.train --config configs/demo.yaml

A run is built (run.py), restored or grown, fitted here step by step, and finished:
the portable model, checked to be the same on every rank.
"""
from __future__ import annotations

import hashlib
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import skip_first_batches
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data.collate import IGNORE_INDEX
from ..eval.health import routing_warnings
from ..eval.losses import evaluate_losses
from ..eval.plots import save_usage_heatmap
from ..recipe import RunConfig
from . import growth, sharding
from .maturity import ExpertFreezer
from .monitor import RoutingStats, expert_grad_norms
from .novelty import NoveltyMonitor
from .preemption import EXIT_PREEMPTED, PreemptionFlag
from .run import Run, TrainState, build_run, restore_or_grow
from .rundir import RunLock

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


class Loop:
    """One optimizer step = gradient_accumulation_steps micro-batches."""

    def __init__(self, run: Run):
        self.run, self.cfg, self.acc, self.state, self.moe = run, run.cfg, run.accelerator, run.state, run.moe
        self.deepspeed, self.backend, self.sources = run.deepspeed, run.backend, run.bundle.sources
        self.params = self.moe.trainable_parameters()
        self.routing = RoutingStats(self.cfg.moe.num_experts, len(self.sources), self.acc.device)
        self.started = time.perf_counter()
        self.tokens_since_log = self.steps_since_log = 0
        t = self.cfg.train
        self.freezer = ExpertFreezer(self.moe, t.freeze_mature_experts)
        self.novelty = NoveltyMonitor(self.sources, t.novelty_threshold, t.novelty_window, t.max_experts,
                                      t.grow_on_novelty, self.state.novelty)
        self.growth_request = None  # set by a step whose data stayed novel for novelty_window steps

    # The run's current model, optimizer and schedule: growth replaces the first two.
    model = property(lambda self: self.run.model)
    optimizer = property(lambda self: self.run.optimizer)
    scheduler = property(lambda self: self.run.schedule)

    def rebind(self) -> None:
        """After growth: the re-prepared model and its new optimizer."""
        self.params = self.moe.trainable_parameters()
        self.routing = RoutingStats(self.moe.config.num_experts, len(self.sources), self.acc.device)
        self.freezer.attach(self.moe)
        self.growth_request = None

    def step(self, window: list[dict], with_details: bool):
        acc, t = self.acc, self.cfg.train
        label_tokens = self._global_label_tokens(window)
        # Loss normalised by the label tokens of the whole window on all ranks; backward
        # divides by the accumulation steps (Accelerate / DeepSpeed) and the mean over
        # ranks (DDP / ZeRO), so scale that back: each token weighs the same everywhere.
        scale = t.gradient_accumulation_steps * acc.num_processes
        lm_sum = balance_sum = 0.0
        finite_batches = 0
        norms = grad_norm = None
        for batch in window:
            with acc.accumulate(self.model):
                out = self.model(**batch, num_items_in_batch=label_tokens)
                finite = self._all_finite(out.loss)
                if finite:
                    loss = out.lm_loss * scale + self.cfg.moe.balance_coefficient * out.balance_loss
                    lm_sum += out.lm_loss.item()
                    balance_sum += out.balance_loss.item()
                    finite_batches += 1
                    self.routing.add(out.routing_weights, batch)
                    self.novelty.add(self.moe, batch, out.routing_weights)
                    self.state.nonfinite_in_a_row = 0
                else:
                    if self.backend == sharding.FSDP2:
                        raise FloatingPointError(sharding.nonfinite_under_fsdp2(self.state.step + 1))
                    # Skip this batch: a zero loss over the trainable parameters keeps every
                    # rank in the same collectives, and adds nothing to the gradient.
                    loss = sum((p * 0.0).sum() for p in self.params)
                    self.state.nonfinite_total += 1
                    self.state.nonfinite_in_a_row += 1
                    if self.state.nonfinite_in_a_row >= t.max_consecutive_nonfinite:
                        raise FloatingPointError(
                            f"non-finite loss in {self.state.nonfinite_in_a_row} micro-batches in a row (step "
                            f"{self.state.step + 1}); lower train.learning_rate or check the data "
                            f"(limit: train.max_consecutive_nonfinite={t.max_consecutive_nonfinite})")
                norms, grad_norm = self._backward_and_step(loss, with_details, finite_batches > 0)
            self.tokens_since_log += int(batch["attention_mask"].sum())
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.state.step += 1
        self.steps_since_log += 1
        self._experts_after_step()
        if not with_details:
            return None
        return self._record(lm_sum, balance_sum, finite_batches, norms, grad_norm, lr)

    def _experts_after_step(self) -> None:
        """Frozen experts back to their values, maturity counted, novelty checked (same on every rank)."""
        self.freezer.restore()
        trained = self.freezer.trained.clone()
        matured = self.moe.advance_maturity(trained)
        frozen = self.freezer.update()
        if matured and self.acc.is_main_process:
            logger.info("step %d: expert(s) %s matured (moe.maturity_steps=%d)%s", self.state.step, matured,
                        self.cfg.moe.maturity_steps, f"; frozen: {frozen}" if frozen else "")
        self.growth_request = self.novelty.end_step(self.acc, self.moe, trained)

    def _backward_and_step(self, loss, with_details, any_finite):
        acc, norms, grad_norm = self.acc, None, None
        if not acc.sync_gradients:
            acc.backward(loss)
            return None, None
        if self.deepspeed:
            # The boundary step by hand (what Accelerate's DeepSpeed wrapper does), to read
            # the reduced expert gradients between DeepSpeed's backward and its step.
            engine = self.model
            engine.set_gradient_accumulation_boundary(is_boundary=True)
            engine.backward(loss)
            if with_details:
                norms = expert_grad_norms(self.moe, self.cfg.moe.num_experts, is_deepspeed=True)
            engine.step()  # clipping (gradient_clipping), optimizer step, zero_grad
            grad_norm = engine.get_global_grad_norm()
            return norms, float(grad_norm) if grad_norm is not None else None
        acc.backward(loss)
        self.freezer.mask_gradients()  # FSDP2 only: the reduced shards (elsewhere a gradient hook did it)
        if with_details:
            norms = expert_grad_norms(self.moe, self.cfg.moe.num_experts, is_deepspeed=False)
        if self.cfg.train.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm))
        if any_finite:  # a window of only non-finite batches makes no step at all
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms, grad_norm

    def _global_label_tokens(self, window) -> torch.Tensor:
        count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in window)
        total = self.acc.reduce(torch.tensor([count], device=self.acc.device, dtype=torch.float32), "sum")
        return total.clamp_min(1.0).squeeze(0)

    def _all_finite(self, loss) -> bool:
        flag = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.acc.device)
        return self.acc.reduce(flag, "sum").item() == 0

    def _record(self, lm_sum, balance_sum, finite_batches, norms, grad_norm, lr) -> dict:
        acc = self.acc
        sums = acc.reduce(torch.tensor([lm_sum, balance_sum, float(finite_batches), float(self.tokens_since_log)],
                                       device=acc.device, dtype=torch.float64), "sum")
        lm = sums[0].item()  # each rank holds its share of the window's global token mean
        balance = sums[1].item() / max(sums[2].item(), 1.0)
        elapsed = time.perf_counter() - self.started
        routing = self.routing.reduced(acc)
        record = {
            "step": self.state.step, "epoch": self.state.epoch, "loss": lm, "lm_loss": lm, "balance_loss": balance,
            "total_loss": lm + self.cfg.moe.balance_coefficient * balance,
            "lr": lr, "grad_norm": grad_norm, "expert_grad_norm": norms,
            "tokens_per_s": sums[3].item() / max(elapsed, 1e-9), "memory_gib": _memory_gib(),
            "seconds_per_step": elapsed / max(self.steps_since_log, 1),
            "nonfinite_skipped": self.state.nonfinite_total, **routing,
            "gate_mean_by_source": dict(zip(self.sources, routing["gate_mean_by_source"])),
            "num_experts": self.moe.config.num_experts, **self._expert_state(),
        }
        self.state.tokens_seen += int(sums[3].item())
        self.routing = RoutingStats(self.cfg.moe.num_experts, len(self.sources), acc.device)
        self.started, self.tokens_since_log, self.steps_since_log = time.perf_counter(), 0, 0
        return record

    def _expert_state(self) -> dict:
        router = self.moe.router
        return {"expert_admission": router.expert_admission.float().tolist(),
                "expert_mature": router.expert_maturity.tolist(), "expert_frozen": self.freezer.frozen.tolist(),
                "expert_steps": router.expert_steps.tolist(),
                "novelty_similarity": dict(self.novelty.last_similarity)}


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
    """The training stream across epochs, resuming at (epoch, batch_in_epoch)."""
    while True:
        loader.set_epoch(state.epoch)  # the seedable sampler reshuffles per epoch
        current = skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in current:
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def run_eval(run: Run) -> bool:
    """Evaluate, log, plot; True when early stopping says stop."""
    accelerator, state, cfg, metrics, run_dir = run.accelerator, run.state, run.cfg, run.metrics, run.run_dir
    if not run.eval_loaders:
        return False
    results = evaluate_losses(run.model, run.eval_loaders, cfg.moe.num_experts, accelerator)
    mean_loss = sum(r["loss"] for r in results.values()) / len(results)
    metrics.log({"step": state.step, "eval": results, "eval_loss": mean_loss}, state.step)
    if accelerator.is_main_process:
        plots = run_dir / "plots"
        plots.mkdir(exist_ok=True)
        save_usage_heatmap({k: v["gate_mean"] for k, v in results.items()}, plots / f"usage-step{state.step}.png",
                           f"expert usage by source, step {state.step}")
        logger.info("eval step %d: %s", state.step, ", ".join(
            f"{k} loss {v['loss']:.4f} (training's gates {v['dense_loss']:.4f}) usage {[round(g, 2) for g in v['gate_mean']]}"
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


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _progress(accelerator, total, initial):
    # A bar on a terminal; in a log file (Vertex, CI) one line per logged step instead.
    return tqdm(total=total, initial=initial, disable=not accelerator.is_main_process or not sys.stderr.isatty(),
                desc="train", dynamic_ncols=True, file=sys.stderr)

