"""The training loop (DESIGN §5): one Accelerate loop for CPU, one GPU, DDP, DeepSpeed
ZeRO-2 (with CPU optimizer offload), and a sharded base under ZeRO-3 or FSDP2
(sharding.py), with exact resume and preemption.

    accelerate launch -m dylora_moe.train --config configs/demo.yaml
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import build_datasets, load_examples
from ..data.collate import IGNORE_INDEX
from ..eval.health import routing_warnings
from ..eval.losses import evaluate_losses
from ..model.inject import find_targets
from . import build, growth, identity, preflight, router_init, sharding
from .checkpoint import CheckpointManager, adopt_run_assets, lineage, read_marker, resolve_resume, share
from .config import RunConfig
from .maturity import ExpertFreezer
from .monitor import MetricsLog, RoutingStats, expert_grad_norms, save_usage_heatmap
from .novelty import NoveltyMonitor
from .preemption import EXIT_PREEMPTED, PreemptionFlag
from .rundir import RunLock, check_output_dir, separate_attempts

logger = logging.getLogger("dylora_moe.train")


@dataclass
class TrainState:
    """Counters restored on resume (registered with accelerator.save_state)."""
    step: int = 0              # optimizer steps done
    epoch: int = 0             # current pass over the (interleaved) training stream
    batch_in_epoch: int = 0    # micro-batches of this epoch already consumed (per process)
    best_eval: float = math.inf
    evals_without_improvement: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    tokens_seen: int = 0
    phase: int = 0             # phases started by a resume with more experts (growth.py)
    phase_start: int = 0       # the step the current phase began at: its LR schedule counts from here
    novelty: dict = field(default_factory=dict)  # novel-data streaks per source (novelty.py)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def start_phase(self) -> None:
        """A resume with more experts: the step count goes on, the rest starts over."""
        self.phase += 1
        self.phase_start = self.step
        self.epoch = self.batch_in_epoch = self.evals_without_improvement = 0
        self.best_eval = math.inf
        self.novelty.clear()

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


class Preempted(SystemExit):
    """Stopped by a signal after saving: SIGTERM (EXIT_PREEMPTED) or Ctrl-C (EXIT_INTERRUPTED)."""

    def __init__(self, code: int = EXIT_PREEMPTED):
        super().__init__(code)


def train(cfg: RunConfig) -> dict:
    lock, preemption = RunLock(Path(cfg.train.output_dir)), PreemptionFlag()
    try:
        return _train(cfg, lock, preemption)
    finally:
        preemption.uninstall()
        lock.release()


def open_run_dir(accelerator, cfg: RunConfig, run_dir: Path, lock: RunLock):
    """Take the run dir (one run at a time) and pick the checkpoint to resume (verified
    on the main process, shared with the others). -> (checkpoint or None, its marker)."""
    def claim() -> str:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        return ""

    share(accelerator, claim)
    found = share(accelerator, lambda: str(resolve_resume(cfg.train.resume_from_checkpoint, run_dir / "checkpoints")
                                           or ""))
    resume_from = Path(found) if found else None
    marker = read_marker(resume_from) if resume_from is not None else None
    if accelerator.is_main_process and resume_from is not None:
        for name in adopt_run_assets(resume_from, run_dir):  # other ranks read them after main_first's barrier
            logger.info("copied %s/ from the run that wrote %s", name, resume_from)
    return resume_from, marker


def record_start(cfg: RunConfig, run_dir: Path, resume_from, marker) -> None:
    """Once everything was checked (main process): the recipe, and metrics.jsonl kept to
    the history this run continues."""
    cfg.save(run_dir / ("recipe.yaml" if resume_from is None else f"recipe-resume-{int(time.time())}.yaml"))
    separate_attempts(run_dir / "metrics.jsonl", marker["step"] if marker else None)


def _train(cfg: RunConfig, lock: RunLock, preemption: PreemptionFlag) -> dict:
    recipe, t = cfg, cfg.train  # the recipe as asked (cfg.moe is replaced by the checkpoint's on a resume)
    run_dir = Path(t.output_dir)
    # Everything that can be checked without loading anything, before any data is read.
    check_output_dir(run_dir, t.resume_from_checkpoint, probe_lock=int(os.environ.get("RANK", "0")) == 0)
    preflight.check_recipe_environment(cfg)
    accelerator = make_accelerator(cfg, run_dir)  # creates nothing on disk
    _configure_logging(accelerator)
    if sharding.enable_fsdp_on_cpu(accelerator):
        logger.info("FSDP on CPU: Accelerate's FSDP2 path over gloo")
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    backend = sharding.kind(accelerator)  # "zero3" / "fsdp2": the base is partitioned
    build.check_optimizer(cfg, deepspeed)
    preflight.check_deepspeed(accelerator)
    sharding.check_supported(cfg, backend)
    examples = load_examples(cfg.data)  # reads and validates every data file: fails before any heavy work
    from accelerate.utils import set_seed

    set_seed(t.seed)  # identical initialisation on every rank
    resume_from, resumed_marker = open_run_dir(accelerator, cfg, run_dir, lock)
    # Built as the checkpoint holds it (so it restores exactly), grown to the recipe's count afterwards.
    grow_on_resume = 0
    if resume_from is not None:
        saved_moe = growth.saved_moe_config(resume_from)
        saved, grow_on_resume = growth.plan_resume(cfg, resume_from)
        sharding.check_growth(backend, grow_on_resume)
        cfg = dataclasses.replace(cfg, moe=saved)
    tokenizer = build.build_tokenizer(cfg, examples, run_dir, accelerator)
    bundle = build_datasets(cfg.data, tokenizer, examples)
    base = build.build_base_model(cfg, tokenizer, run_dir, accelerator)
    if resume_from is not None:
        identity.check_resume(resume_from, resumed_marker, cfg.model.base_model, base.config, saved_moe,
                              cfg.moe.lora_r, find_targets(base, cfg.moe.target_modules))
    if accelerator.is_main_process:
        record_start(recipe, run_dir, resume_from, resumed_marker)
    # The experts' initial values must not depend on whether the base was built (random
    # tiny bases draw from the RNG) or found on disk (a restart after a kill -9).
    set_seed(t.seed)
    moe = build.build_moe(cfg, base)
    sharding.prepare_model(moe, accelerator, backend)
    cfg.moe = moe.config  # one object: growth updates the model's config, which the loop and portable copies read
    train_loader, eval_loaders = build.build_loaders(cfg, bundle, tokenizer)
    if resume_from is None and cfg.moe.router_init == "kmeans":
        # Before prepare: DeepSpeed's fp32 master copy must start from these rows.
        router_init.init_router_from_data(moe, bundle.train, tokenizer, cfg, accelerator)

    cpu_offload = deepspeed and _offloads_optimizer(accelerator)
    optimizer = build.build_optimizer(moe, cfg, cpu_offload=cpu_offload)
    if deepspeed:
        _fill_deepspeed_auto(accelerator, cfg)
    # The schedule drives our own optimizer object, which DeepSpeed steps as is.
    raw_optimizer = optimizer
    model, optimizer, train_loader = accelerator.prepare(moe, optimizer, train_loader)
    sharding.after_prepare(model, accelerator, backend)
    eval_loaders = {name: accelerator.prepare_data_loader(loader) for name, loader in eval_loaders.items()}
    epoch_steps = max(1, math.floor(t.num_epochs * len(train_loader) / t.gradient_accumulation_steps))
    schedule = growth.Schedule(cfg)  # built below, once the phase is known
    state = TrainState()
    accelerator.register_for_checkpointing(schedule, state)

    if resume_from is not None:
        # DyLoRAMoE.state_dict holds the experts and router only, so strict loading checks exactly those.
        accelerator.load_state(str(resume_from))
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_from, state.step, state.epoch,
                    state.batch_in_epoch)
    else:
        set_seed(t.seed, device_specific=True)  # different dropout per rank from here on
    if t.log_with:
        accelerator.init_trackers(t.project_name, config=_flat_config(cfg))
    metrics = MetricsLog(accelerator, run_dir / "metrics.jsonl")
    if backend:
        metrics.log(sharding.sharding_record(accelerator, moe, backend), state.step)
    grower = growth.Grower(cfg, accelerator, deepspeed, cpu_offload)
    if grow_on_resume:
        before = moe.config.num_experts
        reason = f"resume from {resume_from} with --num_experts {before + grow_on_resume}"
        model, optimizer, raw_optimizer, report = grower.grow(model, raw_optimizer, grow_on_resume,
                                                              note={"step": state.step, "reason": reason})
        state.start_phase()
    total_steps = t.max_steps or state.phase_start + epoch_steps
    schedule.start(raw_optimizer, state.phase_start, total_steps, restore=not grow_on_resume)
    if grow_on_resume:
        if accelerator.is_main_process:
            logger.info("grew %d -> %d experts (init %s) at step %d: %s. %s", before, moe.config.num_experts,
                        t.grow_init, state.step, growth.phase_report(cfg, state, total_steps), report)
        metrics.log(growth.growth_record(state.step, moe, "resume", reason, report,
                                         {"from": before, "phase": state.phase}), state.step)

    loop = Loop(cfg, accelerator, model, optimizer, schedule, state, deepspeed, bundle.sources)
    unwrapped = accelerator.unwrap_model(model)
    portable = lambda d: write_portable(unwrapped, tokenizer, cfg, d)
    whole = lambda: sharding.full_experts(accelerator, unwrapped)  # all ranks: a gather with a sharded base
    # keep_last counts this run's checkpoints, and on a restart those of the run it continues.
    run_id, owned = lineage(run_dir / "checkpoints", resume_from) if accelerator.is_main_process else (None, [])
    checkpoints = CheckpointManager(accelerator, run_dir / "checkpoints", t.keep_last,
                                    {"exclude_frozen_parameters": True} if deepspeed else {},  # belt and braces
                                    run_id=run_id, owned=owned,
                                    identity=lambda: identity.record(cfg.model.base_model, base.config, unwrapped),
                                    gather=whole)
    preemption.install()
    if accelerator.is_main_process:
        logger.info("training %d optimizer steps (%d micro-batches of %d per step per process, %d process(es)); "
                    "%d trainable parameters", total_steps, t.gradient_accumulation_steps, t.train_batch_size,
                    accelerator.num_processes, sharding.trainable_elements(unwrapped))

    batches = micro_batches(train_loader, state)
    progress = _progress(accelerator, total_steps, state.step)
    stopped_early = False
    last_saved = state.step if resume_from is not None else -1
    while state.step < total_steps:
        record = loop.step([next(batches) for _ in range(t.gradient_accumulation_steps)],
                           with_details=state.step % t.log_every == t.log_every - 1 or state.step + 1 == total_steps)
        progress.update(1)
        if loop.growth_request is not None:
            model, optimizer, raw_optimizer = grow_on_novelty(loop, grower, schedule, raw_optimizer, metrics)
        if record is not None:
            metrics.log(record, state.step)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if progress.disable and accelerator.is_main_process:
                logger.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", state.step, total_steps, record["loss"],
                            record["lr"], record["tokens_per_s"])
        is_last = state.step == total_steps
        if (t.eval_every and state.step % t.eval_every == 0) or is_last:
            stopped_early = run_eval(accelerator, model, eval_loaders, state, cfg, metrics, run_dir)
        if (t.save_every and state.step % t.save_every == 0) or is_last or stopped_early:
            with whole():
                check_finite_weights(unwrapped, state.step, checkpoints)
            checkpoints.save(state.step, portable, {"epoch": state.epoch})
            last_saved = state.step
        if preemption.agreed(accelerator):
            if last_saved != state.step:
                with whole():
                    check_finite_weights(unwrapped, state.step, checkpoints)
                checkpoints.save(state.step, portable, {"epoch": state.epoch, "preempted": True})
            logger.warning("%s: saved at step %d, exiting with %d; resume with --resume_from_checkpoint auto",
                           preemption.name, state.step, preemption.exit_code)
            accelerator.end_training()
            raise Preempted(preemption.exit_code)
        if stopped_early:
            logger.info("early stopping at step %d", state.step)
            break
    progress.close()

    summary = finish(accelerator, unwrapped, tokenizer, cfg, run_dir, state, metrics)
    accelerator.end_training()
    return summary


class Loop:
    """One optimizer step = gradient_accumulation_steps micro-batches."""

    def __init__(self, cfg, accelerator, model, optimizer, scheduler, state, deepspeed, sources):
        self.cfg, self.acc, self.model, self.optimizer, self.scheduler = cfg, accelerator, model, optimizer, scheduler
        self.state, self.deepspeed, self.sources = state, deepspeed, sources
        self.backend = sharding.kind(accelerator)
        self.moe = accelerator.unwrap_model(model)
        self.params = self.moe.trainable_parameters()
        self.routing = RoutingStats(cfg.moe.num_experts, len(sources), accelerator.device)
        self.started = time.perf_counter()
        self.tokens_since_log = self.steps_since_log = 0
        t = cfg.train
        self.freezer = ExpertFreezer(self.moe, t.freeze_mature_experts)
        self.novelty = NoveltyMonitor(sources, t.novelty_threshold, t.novelty_window, t.max_experts,
                                      t.grow_on_novelty, state.novelty)
        self.growth_request = None  # set by a step whose data stayed novel for novelty_window steps

    def rebind(self, model, optimizer) -> None:
        """After growth: the re-prepared model and its new optimizer."""
        self.model, self.optimizer = model, optimizer
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
                    self.routing.add(out.routing_weights, batch.get("source_id"))
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


def grow_on_novelty(loop, grower, schedule, raw_optimizer, metrics):
    """Add the expert the novelty trigger asked for, mid-run: schedule and data go on."""
    request, state, moe = loop.growth_request, loop.state, loop.moe
    reason = "novelty: " + request.reason(loop.cfg.train.novelty_threshold)
    model, optimizer, raw_optimizer, report = grower.grow(loop.model, raw_optimizer, 1,
                                                          note={"step": state.step, "reason": reason})
    schedule.rebind(raw_optimizer)
    index = moe.config.num_experts - 1
    loop.novelty.seed(moe, index, request)
    loop.rebind(model, optimizer)
    if loop.acc.is_main_process:
        logger.info("step %d: added expert %d (%d of at most %d, init %s). %s. %s", state.step, index,
                    moe.config.num_experts, loop.cfg.train.max_experts, loop.cfg.train.grow_init, reason, report)
    metrics.log(growth.growth_record(state.step, moe, "novelty", reason, report,
                                     {"source": request.source, "similarity": request.similarity}), state.step)
    return model, optimizer, raw_optimizer


def micro_batches(loader, state: TrainState):
    """The training stream across epochs, resuming at (epoch, batch_in_epoch)."""
    from accelerate import skip_first_batches

    while True:
        loader.set_epoch(state.epoch)  # the seedable sampler reshuffles per epoch
        current = skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        for batch in current:
            state.batch_in_epoch += 1
            yield batch
        state.epoch += 1
        state.batch_in_epoch = 0


def run_eval(accelerator, model, loaders, state, cfg, metrics, run_dir) -> bool:
    """Evaluate, log, plot; True when early stopping says stop."""
    if not loaders:
        return False
    results = evaluate_losses(model, loaders, cfg.moe.num_experts, accelerator)
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


def finish(accelerator, moe, tokenizer, cfg, run_dir, state, metrics) -> dict:
    """Cross-rank weight check, the final portable model, and where everything is."""
    with sharding.full_experts(accelerator, moe):  # a sharded base: every rank sees the whole experts
        return _finish(accelerator, moe, tokenizer, cfg, run_dir, state, metrics)


def _finish(accelerator, moe, tokenizer, cfg, run_dir, state, metrics) -> dict:
    from accelerate.utils import gather_object

    check_finite_weights(moe, state.step, None)
    digest = hashlib.sha256()
    for p in moe.trainable_parameters():
        digest.update(p.detach().float().cpu().numpy().tobytes())
    checksums = gather_object([digest.hexdigest()])
    metrics.log({"step": state.step, "final": True, "weights_sha256_per_rank": checksums,
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
                import shutil

                shutil.rmtree(tmp)
            write_portable(moe, tokenizer, cfg, tmp)
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


def write_portable(moe, tokenizer, cfg, out_dir) -> None:
    """What a user takes away: experts + router + config, each expert as a PEFT adapter,
    the tokenizer and the recipe. The base model is referenced, never copied."""
    out_dir = Path(out_dir)
    moe.save_pretrained(out_dir / "experts")
    for i in range(moe.config.num_experts):
        moe.export_expert(i, out_dir / f"peft_expert_{i}")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    cfg.save(out_dir / "recipe.yaml")


def make_accelerator(cfg, run_dir):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs

    handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without this, DeepSpeed on CPU starts every rank as rank 0 of 1 (FIELD-NOTES).
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        mixed_precision="bf16" if cfg.train.bf16 else "no",
        # Sync every N micro-batches by count, not at the end of each epoch: the stream
        # runs across epochs and checkpoints always fall on optimizer-step boundaries.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.gradient_accumulation_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        log_with=cfg.train.log_with or None, project_dir=str(run_dir), kwargs_handlers=handlers)


def _offloads_optimizer(accelerator) -> bool:
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return (zero.get("offload_optimizer") or {}).get("device") == "cpu"


def _fill_deepspeed_auto(accelerator, cfg) -> None:
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.train.max_grad_norm


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _progress(accelerator, total, initial):
    from tqdm.auto import tqdm

    # A bar on a terminal; in a log file (Vertex, CI) one line per logged step instead.
    return tqdm(total=total, initial=initial, disable=not accelerator.is_main_process or not sys.stderr.isatty(),
                desc="train", dynamic_ncols=True, file=sys.stderr)


def _flat_config(cfg) -> dict:
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _configure_logging(accelerator) -> None:
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "accelerate", "matplotlib", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
