"""What GET /metrics reports, in Prometheus' text format (prometheus_client), on a registry
of the server's own so that two servers in one process (the tests) do not share counts."""
from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, num_experts: int):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("dylora_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dylora_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("dylora_completion_tokens", "Tokens generated", registry=r)
        self.waiting = Gauge("dylora_queue_depth", "Requests waiting for a row in the batch", registry=r)
        self.running = Gauge("dylora_running_rows", "Rows decoding in the batch", registry=r)
        self.batch_size = Histogram("dylora_batch_size", "Rows in each forward of the model",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.ttft = Histogram("dylora_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.gate_mass = Counter("dylora_expert_gate_mass", "Sum over generated tokens of each expert's gate",
                                 ["expert"], registry=r)
        self._experts = [self.gate_mass.labels(str(e)) for e in range(num_experts)]

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def step(self, rows: int, gates: torch.Tensor) -> None:
        """One forward of `rows` rows, each making one token with its gates (rows, E)."""
        self.batch_size.observe(rows)
        self.completion_tokens.inc(rows)
        for counter, mass in zip(self._experts, gates.sum(0).tolist()):
            counter.inc(mass)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def queue(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
