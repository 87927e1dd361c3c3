"""What a request asks for, checked against what this server serves: the mixture (the
`model` field or `gates`), the prompt's length against the context, and the sampling
limits. Every refusal is an APIError naming the field; nothing here touches the model."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Optional

from ..eval.variants import Variant, custom, names, resolve
from .decoding import Sampling
from .protocol import APIError, Sampled
from .scheduler import Job, QueueFull, Scheduler


@dataclass(frozen=True)
class Limits:
    context: int            # prompt + completion tokens, at most
    max_tokens: int         # completion tokens a request may ask for
    max_n: int
    max_rows: int           # prompts x n of one request: the batch's width
    request_timeout: float  # seconds from arrival to the last token


class Service:
    def __init__(self, name: str, loaded, scheduler: Scheduler, limits: Limits, metrics):
        self.name, self.loaded, self.scheduler = name, loaded, scheduler
        self.limits, self.metrics = limits, metrics
        self.num_experts = loaded.moe.config.num_experts
        self.token_routed = loaded.moe.config.routing == "token"
        self.created = int(time.time())
        self.draining = False

    def models(self) -> list[str]:
        return [self.name, *(f"{self.name}:{v}" for v in names(self.num_experts)[1:])]

    def variant(self, model: str, gates: Optional[list]) -> Variant:
        suffix = "" if model == self.name else model[len(self.name) + 1:] if model.startswith(self.name + ":") else None
        try:
            if suffix is None:
                raise ValueError
            chosen = resolve(suffix or "routed", self.num_experts)
        except ValueError:
            raise APIError(404, f"model {model!r} does not exist; this server serves {', '.join(self.models())}",
                           param="model", code="model_not_found") from None
        if gates is None:
            return chosen
        if not chosen.routed:
            raise APIError(400, f"gates: give them with model {self.name!r}, not with the variant {model!r}",
                           param="gates")
        try:
            return custom(gates, self.num_experts)
        except ValueError as error:
            raise APIError(400, str(error), param="gates") from None

    def sampling(self, body: Sampled, prompts: list[list[int]], prompt_field: str, max_tokens: Optional[int],
                 default_max_tokens: Optional[int]) -> tuple[Sampling, int]:
        """(the sampling of every row, n), or the first field out of bounds."""
        limits = self.limits
        longest = max(len(p) for p in prompts)
        if longest >= limits.context:
            raise APIError(400, f"{prompt_field}: {longest} tokens; this model's context is {limits.context} tokens "
                           "(prompt and completion together)", param=prompt_field, code="context_length_exceeded")
        room = limits.context - longest
        if max_tokens is not None and max_tokens > min(limits.max_tokens, room):
            why = (f"this server's limit is {limits.max_tokens}" if max_tokens > limits.max_tokens else
                   f"the prompt leaves {room} of the {limits.context}-token context")
            raise APIError(400, f"max_tokens: {max_tokens} is too many; {why}", param="max_tokens",
                           code="context_length_exceeded" if max_tokens <= limits.max_tokens else None)
        n = body.n or 1
        if n > limits.max_n:
            raise APIError(400, f"n: {n} is too many; this server returns at most {limits.max_n}", param="n")
        if n * len(prompts) > limits.max_rows:
            raise APIError(400, f"n: {len(prompts)} prompt(s) x n={n} is {n * len(prompts)} rows; this server batches "
                           f"at most {limits.max_rows}", param="n")
        stops = body.stops()
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop: expected up to 4 non-empty strings", param="stop")
        chosen = max_tokens or min(default_max_tokens or limits.max_tokens, limits.max_tokens, room)
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        return Sampling(chosen, temperature, top_p, stops, body.seed, bool(body.ignore_eos)), n

    def submit(self, prompts, variant: Variant, sampling: Sampling, n: int, timeout: Optional[float]):
        """Queue the job; returns it with the asyncio queue its events arrive on."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "10"})
        if self.token_routed and variant.routed and n * len(prompts) > 1:
            raise APIError(400, "n: this model routes every token, so its routed requests are served alone: "
                           "one prompt and n=1", param="n")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        seconds = min(timeout or self.limits.request_timeout, self.limits.request_timeout)
        job = Job(prompts, None if variant.routed else variant.tensor(), sampling, n,
                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event), time.monotonic() + seconds)
        try:
            self.scheduler.submit(job)
        except QueueFull:
            raise APIError(503, "the server is busy: its queue is full; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * n)
        return job, events
