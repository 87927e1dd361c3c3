"""uvicorn, with SIGTERM as a drain."""
from __future__ import annotations

import signal

import uvicorn


class Draining(uvicorn.Server):
    """SIGTERM drains: /health and new requests answer 503, the listening socket closes,
    in-flight requests finish (uvicorn waits up to timeout_graceful_shutdown, then cancels
    them), the scheduler stops with the app, and the process exits 0 instead of re-raising
    the signal as uvicorn does after a signalled shutdown."""

    def __init__(self, config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.draining = True
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def run(app, service, host: str, port: int, drain_timeout: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=drain_timeout, log_level="info",
                            access_log=False)
    Draining(config, service).run()
