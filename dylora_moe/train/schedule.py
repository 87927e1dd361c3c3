"""The learning-rate schedule: transformers' schedules, stepped by the loop once per
optimizer step, inside a holder that checkpoints it and that growth can rebuild
around a new optimizer."""
from __future__ import annotations


def build_scheduler(optimizer, cfg, total_steps: int):
    """transformers' schedules, stepped by the loop once per optimizer step (not handed
    to accelerator.prepare, which steps once per process and so decays N times faster)."""
    # Imported here: transformers' optimization module imports peft and so bitsandbytes,
    # whose CPU import prints a warning; a command that fails early should not show it.
    from transformers import get_scheduler

    t = cfg.train
    warmup = t.warmup_for(total_steps)
    specific = {"num_cycles": t.cosine_restarts + 1} if t.lr_scheduler == "cosine_with_restarts" else {}
    return get_scheduler(t.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=specific)


class Schedule:
    """The LR schedule, registered for checkpointing through this holder so that growth
    can rebuild it around a new optimizer. Its state_dict is the scheduler's own, so a
    checkpoint holds what it always did. Built after load_state (`start`), when the
    phase it belongs to is known."""

    def __init__(self, cfg):
        self.cfg, self.scheduler, self.restored = cfg, None, None
        self.start_step = self.total_steps = 0

    def start(self, optimizer, start_step: int, total_steps: int, restore: bool = True) -> None:
        """The schedule of the steps start_step..total_steps; continues a restored state."""
        self.start_step, self.total_steps = start_step, total_steps
        self.scheduler = build_scheduler(optimizer, self.cfg, max(1, total_steps - start_step))
        if self.restored is not None and restore:
            self.scheduler.load_state_dict(self.restored)
            # load_state_dict leaves the optimizer at the rate of step 0: put the saved one back
            for group, lr in zip(optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr
        self.restored = None

    def rebind(self, optimizer) -> None:
        """The same schedule, at the same point, driving a new optimizer (mid-run growth)."""
        self.restored = self.scheduler.state_dict()
        self.start(optimizer, self.start_step, self.total_steps)

    def step(self) -> None:
        self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.restored = state
