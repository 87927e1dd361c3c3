"""SIGTERM (spot preemption) -> a flag; the loop checks it at step boundaries.

Every rank may get the signal at a slightly different time (or only some of them), so
the loop asks all ranks at each optimizer step and they stop together: save, then exit
with EXIT_PREEMPTED so the job is restarted and resumes with `auto`.
"""
from __future__ import annotations

import signal

import torch

EXIT_PREEMPTED = 143  # 128 + SIGTERM, what a killed process reports


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def install(self) -> "PreemptionFlag":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True  # nothing else is safe inside a signal handler

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was asked to stop (one small all-reduce)."""
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
