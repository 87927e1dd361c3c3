"""SIGTERM (spot preemption) or Ctrl-C (SIGINT) -> a flag; the loop checks it at step
boundaries.

Every rank may get the signal at a slightly different time (or only some of them), so
the loop asks all ranks at each optimizer step and they stop together: save, then exit
non-zero (EXIT_PREEMPTED after SIGTERM, so the job is restarted and resumes with `auto`;
EXIT_INTERRUPTED after Ctrl-C). A second Ctrl-C does not wait for the step to end: it
stops at once (KeyboardInterrupt), keeping the checkpoints already written.
"""
from __future__ import annotations

import signal
import sys

EXIT_PREEMPTED = 143    # 128 + SIGTERM, what a killed process reports
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class PreemptionFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None
        self._previous: dict = {}

    def install(self) -> "PreemptionFlag":
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.requested = True
        self.signal = self.signal or signum
        if signum == signal.SIGINT:
            # One short write, safe in a handler: the user sees the first Ctrl-C was heard.
            sys.stderr.write("\nCtrl-C: saving a checkpoint at the end of this step, then stopping "
                             "(Ctrl-C again to stop at once)\n")

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signal == signal.SIGINT else EXIT_PREEMPTED

    @property
    def name(self) -> str:
        return "SIGINT (Ctrl-C)" if self.signal == signal.SIGINT else "SIGTERM"

    def agreed(self, accelerator) -> bool:
        """True on every rank if any rank was asked to stop: Accelerate's cross-rank
        trigger (one small all-reduce; every rank calls this at every step boundary)."""
        if self.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}
