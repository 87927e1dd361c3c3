"""One optimizer step of the training loop: a window of gradient_accumulation_steps
micro-batches, the loss that is optimised (`Loop.training_loss`, its one definition),
the non-finite check, the optimizer step, and the logged record.

Nothing on the micro-batch path reads a value back to the host or starts a collective,
except under DeepSpeed (see `Loop._deepspeed_keeps`): loss sums, token counts and
routing statistics stay on the device until a logged step reduces them (as torchtitan
does), and whether a window's losses were finite is decided once, at its optimizer step.
"""
from __future__ import annotations

import logging
import resource
import time

import torch

from ..data.collate import IGNORE_INDEX
from .maturity import ExpertFreezer
from .monitor import RoutingStats, expert_grad_norms
from .novelty import NoveltyMonitor
from .run import Run

logger = logging.getLogger("dylora_moe.train")


class Loop:
    """One optimizer step = gradient_accumulation_steps micro-batches (module docstring)."""

    def __init__(self, run: Run):
        self.run, self.cfg, self.acc, self.state, self.moe = run, run.cfg, run.accelerator, run.state, run.moe
        self.deepspeed, self.backend, self.sources = run.deepspeed, run.backend, run.bundle.sources
        self.params = self.moe.trainable_parameters()
        self.routing = RoutingStats(self.moe.config.num_experts, len(self.sources), self.acc.device)
        self.started = time.perf_counter()
        self.tokens_since_log = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        self.steps_since_log = 0
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

    def training_loss(self, out) -> torch.Tensor:
        """The one place the loss that is optimised is built. `lm_loss` is normalised by
        the label tokens of the whole window on all ranks; backward divides by the
        accumulation steps (Accelerate / DeepSpeed) and averages over ranks (DDP / ZeRO),
        so it is scaled back: each token weighs the same everywhere. The balance loss is
        a mean per micro-batch, and so is averaged over the window and the ranks."""
        scale = self.cfg.train.gradient_accumulation_steps * self.acc.num_processes
        return out.lm_loss * scale + self.moe.config.balance_coefficient * out.balance_loss

    def step(self, window: list[dict], with_details: bool):
        label_tokens = self._global_label_tokens(window)
        # Per micro-batch, on the device: [lm_loss, balance_loss, finite micro-batches].
        sums = torch.zeros(3, dtype=torch.float64, device=self.acc.device)
        nonfinite = torch.zeros(len(window), dtype=torch.float32, device=self.acc.device)
        norms = grad_norm = None
        for index, batch in enumerate(window):
            with self.acc.accumulate(self.model):
                out = self.model(**batch, num_items_in_batch=label_tokens)
                loss = self.training_loss(out)
                finite = torch.isfinite(loss.detach())
                if self.deepspeed and not self._deepspeed_keeps(finite):
                    loss, finite = self._zero_loss(), torch.zeros_like(finite)
                nonfinite[index] = (~finite).float()
                self._add(sums, out, batch, finite)
                if self.acc.sync_gradients:
                    norms, grad_norm = self._boundary(loss, nonfinite, with_details)
                else:
                    self.acc.backward(loss)
            self.tokens_since_log += batch["attention_mask"].sum()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.state.step += 1
        self.steps_since_log += 1
        self._experts_after_step()
        if not with_details:
            return None
        return self._record(sums, norms, grad_norm, lr)

    def _add(self, sums: torch.Tensor, out, batch: dict, finite: torch.Tensor) -> None:
        """A micro-batch's losses and routing into the window's device sums; one whose
        loss was not finite adds nothing (torch.where: a NaN times 0 would still be NaN)."""
        sums += torch.where(finite, torch.stack([out.lm_loss.detach().double(), out.balance_loss.detach().double(),
                                                 torch.ones((), dtype=torch.float64, device=sums.device)]), 0.0)
        self.routing.add(out.routing_weights, batch, keep=finite)
        if self.novelty.enabled:  # the library is kept only for growth (novelty.py)
            self.novelty.add(self.moe, batch, out.routing_weights, keep=finite)

    def _deepspeed_keeps(self, finite: torch.Tensor) -> bool:
        """Under DeepSpeed, whether this micro-batch's loss was finite on every rank. A
        flag all-reduce and a host read per micro-batch, here only: DeepSpeed adds each
        backward into its gradient partitions and applies them at the boundary step, so
        a non-finite loss must be kept out of the backward (it is replaced by a zero
        loss, which adds nothing); the window's other micro-batches still train."""
        nonfinite = self.acc.reduce((~finite).float().view(1), "sum").item() > 0
        return not self._count_nonfinite([nonfinite])

    def _zero_loss(self) -> torch.Tensor:
        # Over the trainable parameters: every rank stays in the same collectives, and
        # the gradient is zero.
        return sum((p * 0.0).sum() for p in self.params)

    def _boundary(self, loss, nonfinite: torch.Tensor, with_details: bool):
        """The window's last backward and its optimizer step (norms, grad norm)."""
        if self.deepspeed:
            return self._deepspeed_step(loss, with_details)
        acc, norms, grad_norm = self.acc, None, None
        acc.backward(loss)
        # Once per optimizer step: was any micro-batch of this window, on any rank, not
        # finite? Then the window makes no update at all (its gradients, NaN included,
        # are dropped). Deciding per window, not per micro-batch, is what keeps the
        # micro-batches free of host syncs; a micro-batch's gradient cannot be taken
        # back out of the window's, so its finite neighbours are dropped with it.
        flags = acc.reduce(nonfinite, "sum") > 0
        skip = self._count_nonfinite(flags.tolist())
        self.freezer.mask_gradients()  # FSDP2 only: the reduced shards (elsewhere a gradient hook did it)
        if with_details:
            norms = expert_grad_norms(self.moe, self.moe.config.num_experts, is_deepspeed=False)
        if self.cfg.train.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        if not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norms, grad_norm

    def _deepspeed_step(self, loss, with_details: bool):
        # The boundary step by hand (what Accelerate's DeepSpeed wrapper does), to read
        # the reduced expert gradients between DeepSpeed's backward and its step.
        engine, norms = self.model, None
        engine.set_gradient_accumulation_boundary(is_boundary=True)
        engine.backward(loss)
        if with_details:
            norms = expert_grad_norms(self.moe, self.moe.config.num_experts, is_deepspeed=True)
        engine.step()  # clipping (gradient_clipping), optimizer step, zero_grad
        return norms, engine.get_global_grad_norm()

    def _count_nonfinite(self, flags: list) -> bool:
        """Count the non-finite micro-batches (in order; every rank sees the same flags)
        and stop after max_consecutive_nonfinite in a row. True when any was."""
        t, state = self.cfg.train, self.state
        for flag in flags:
            if not flag:
                state.nonfinite_in_a_row = 0
                continue
            state.nonfinite_total += 1
            state.nonfinite_in_a_row += 1
            if state.nonfinite_in_a_row >= t.max_consecutive_nonfinite:
                raise FloatingPointError(
                    f"non-finite loss in {state.nonfinite_in_a_row} micro-batches in a row (step "
                    f"{state.step + 1}); lower train.learning_rate or check the data "
                    f"(limit: train.max_consecutive_nonfinite={t.max_consecutive_nonfinite})")
        return any(flags)

    def _experts_after_step(self) -> None:
        """Frozen experts back to their values, maturity counted, novelty checked (same on every rank)."""
        self.freezer.restore()
        trained = self.freezer.trained.clone()
        matured = self.moe.advance_maturity(trained)
        frozen = self.freezer.update()
        if matured and self.acc.is_main_process:
            logger.info("step %d: expert(s) %s matured (moe.maturity_steps=%d)%s", self.state.step, matured,
                        self.moe.config.maturity_steps, f"; frozen: {frozen}" if frozen else "")
        if self.novelty.enabled:  # its statistics are all-reduced: every rank takes this branch alike
            self.growth_request = self.novelty.end_step(self.acc, self.moe, trained)

    def _global_label_tokens(self, window) -> torch.Tensor:
        """The label tokens of the whole window on all ranks, which every micro-batch's
        loss is divided by, so it is needed before the first forward: one collective
        per optimizer step (a real need), counted on the device."""
        count = torch.stack([(b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in window]).sum()
        total = self.acc.reduce(count.to(torch.float32).view(1), "sum")
        return total.clamp_min(1.0).squeeze(0)

    def _record(self, sums: torch.Tensor, norms, grad_norm, lr) -> dict:
        """A logged step: the device sums reduced over the ranks, read once."""
        acc = self.acc
        lm, balance, finite_batches, tokens = acc.reduce(
            torch.cat([sums, self.tokens_since_log.view(1)]), "sum").tolist()
        balance /= max(finite_batches, 1.0)  # lm: each rank held its share of the window's global token mean
        elapsed = time.perf_counter() - self.started
        routing = self.routing.reduced(acc)
        record = {
            "step": self.state.step, "epoch": self.state.epoch,
            "loss": lm + self.moe.config.balance_coefficient * balance,  # what was optimised
            "lm_loss": lm, "balance_loss": balance,
            "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm), "expert_grad_norm": norms,
            "tokens_per_s": tokens / max(elapsed, 1e-9), "memory_gib": _memory_gib(),
            "seconds_per_step": elapsed / max(self.steps_since_log, 1),
            "nonfinite_skipped": self.state.nonfinite_total, **routing,
            "gate_mean_by_source": dict(zip(self.sources, routing["gate_mean_by_source"])),
            "num_experts": self.moe.config.num_experts, **self._expert_state(),
        }
        self.state.tokens_seen += int(tokens)
        self.routing = RoutingStats(self.moe.config.num_experts, len(self.sources), acc.device)
        self.tokens_since_log.zero_()
        self.started, self.steps_since_log = time.perf_counter(), 0
        return record

    def _expert_state(self) -> dict:
        router = self.moe.router
        return {"expert_admission": router.expert_admission.float().tolist(),
                "expert_mature": router.expert_maturity.tolist(), "expert_frozen": self.freezer.frozen.tolist(),
                "expert_steps": router.expert_steps.tolist(),
                "novelty_similarity": dict(self.novelty.last_similarity)}


def _memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
