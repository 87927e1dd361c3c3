"""Continuous batching: one thread runs the model; requests join and leave between steps.

Each step: admit waiting jobs while rows are free (their prompts are prefilled together,
routed rows asking the router first, and merged into the running batch), then one decode
step for every running row, each with its own gates; rows that finished, whose client
went away or whose deadline passed leave the batch before the next step. One forward
serves every mixture in the batch: that is what the stacked layer is for.

Why this shape: the HTTP side is asyncio, the model is a blocking torch call, and torch
kernels release the GIL, so a single model thread keeps the event loop responsive and
needs no locking around the model. Events go back to each request's own queue.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .decoding import Sampling, TextStream, generator, pick, pick_rows
from .engine import Engine


class QueueFull(Exception):
    """The waiting queue is at its bound: the caller answers 503 with Retry-After."""


@dataclass
class Row:
    """One choice being generated: a prompt, its gates, its tokens and text so far."""
    job: "Job"
    index: int            # the choice's index in the response
    prompt: list
    fixed: Optional[torch.Tensor]   # (E,) gates, or None: routed from the prompt
    stream: TextStream
    rng: Optional[torch.Generator]
    generated: int = 0
    pending: int = -1     # the last token, fed at the next step
    finish: Optional[str] = None


@dataclass
class Job:
    """A request: its rows, how it samples, where its events go, when it must be done."""
    prompts: list           # token ids of each prompt
    fixed: Optional[torch.Tensor]
    sampling: Sampling
    n: int
    emit: Callable[[tuple], None]   # thread-safe: ("gates", i, list) ("delta", i, str) ("finish", i, reason, tokens) ("error", status, message)
    deadline: float
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    first_token: Optional[float] = None
    rows: list = field(default_factory=list)

    @property
    def width(self) -> int:
        return len(self.prompts) * self.n


class Scheduler:
    def __init__(self, engine: Engine, tokenizer, max_batch: int, max_queue: int, metrics=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics
        self.eos = {tokenizer.eos_token_id} - {None}
        self.waiting: collections.deque = collections.deque()
        self.rows: list[Row] = []
        self.batch = None
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="dylora-moe-scheduler", daemon=True)

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests already waiting")
            self.waiting.append(job)
            self._gauge()
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: its rows leave at the next step."""
        job.cancelled = True

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ the model thread
    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.waiting and not self.rows:
                    self._wake.wait()
                if self._stopping:
                    break
                newcomers, alone = self._admit()
            try:
                for job in alone:  # outside the lock: submit() must not wait for a whole request
                    self._solo(job)
                self._step(newcomers)
            except Exception as error:  # noqa: BLE001 - a bug fails the batch's requests, never the server
                self._fail_all(error, newcomers + [row for job in alone for row in job.rows])
        for job in [*{id(r.job): r.job for r in self.rows}.values(), *self.waiting]:
            job.emit(("error", 503, "the server is shutting down"))

    def _admit(self) -> tuple[list[Row], list[Job]]:
        """Rows for the waiting jobs that fit, in order; and the jobs to serve alone."""
        free, out, alone = self.max_batch - len(self.rows), [], []
        while self.waiting and self.waiting[0].width <= free - len(out):
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            if time.monotonic() > job.deadline:
                job.emit(("error", 503, "the request waited past its deadline in the queue"))
                continue
            if job.fixed is None and not self.engine.batches_routed_rows:
                alone.append(job)
                continue
            out += self._rows(job)
        self._gauge()
        return out, alone

    def _rows(self, job: Job) -> list[Row]:
        job.rows = [Row(job, p * job.n + c, prompt, job.fixed, TextStream(self.tokenizer, job.sampling.stop),
                        generator(job.sampling.seed, c) if job.sampling.temperature > 0 else None)
                    for p, prompt in enumerate(job.prompts) for c in range(job.n)]
        return job.rows

    def _step(self, newcomers: list[Row]) -> None:
        if newcomers:
            logits, part = self.engine.prefill([r.prompt for r in newcomers], [r.fixed for r in newcomers])
            for row, gates in zip(newcomers, part.gates.tolist()):
                row.job.emit(("gates", row.index, gates))
            if self.metrics:
                self.metrics.step(len(newcomers), part.gates)
            self._accept(newcomers, logits)
            self.batch = self.engine.merge(self.batch, part)
            self.rows += newcomers
            self._leave()
        if self.rows:
            if self.metrics:
                self.metrics.step(len(self.rows), self.batch.gates)
            logits = self.engine.decode(self.batch, [r.pending for r in self.rows])
            self._accept(self.rows, logits)
            self._leave()
        self._gauge()

    def _accept(self, rows: list[Row], logits: torch.Tensor) -> None:
        tokens = pick_rows(logits, [r.job.sampling for r in rows], [r.rng for r in rows])
        now = time.monotonic()
        for row, token in zip(rows, tokens):
            self._take(row, token, now)

    def _take(self, row: Row, token: int, now: float) -> bool:
        """One new token for a row; True when the row is finished."""
        job = row.job
        if job.first_token is None:
            job.first_token = now
            if self.metrics:
                self.metrics.first_token(now - job.submitted)
        row.generated += 1
        if token in self.eos and not job.sampling.ignore_eos:
            delta, row.finish = row.stream.flush(), "stop"
        else:
            delta, stopped = row.stream.push(token)
            if stopped:
                row.finish = "stop"
            elif row.generated >= job.sampling.max_tokens:
                delta, row.finish = delta + row.stream.flush(), "length"
        row.pending = token
        if delta:
            job.emit(("delta", row.index, delta))
        if row.finish:
            job.emit(("finish", row.index, row.finish, row.generated))
        return row.finish is not None

    def _leave(self) -> None:
        """Rows that are done, cancelled or past their deadline leave the batch."""
        now, keep = time.monotonic(), []
        for i, row in enumerate(self.rows):
            if row.finish or row.job.cancelled:
                continue
            if now > row.job.deadline:
                row.job.cancelled = True  # its other rows go too, and one error is sent
                row.job.emit(("error", 504, f"the request's deadline passed after {row.generated} tokens"))
                continue
            keep.append(i)
        if len(keep) < len(self.rows):
            self.batch = self.engine.select(self.batch, keep)
            self.rows = [self.rows[i] for i in keep]

    def _solo(self, job: Job) -> None:
        """A routed request of a token-routed model (one prompt, n=1: the API checks it),
        alone, through moe.generate: its gates change with every token."""
        [row] = self._rows(job)
        job.emit(("gates", row.index, None))

        def on_token(token: int) -> bool:
            done = self._take(row, token, time.monotonic())
            return done or job.cancelled or time.monotonic() > job.deadline

        self.engine.generate_one(row.prompt, job.sampling.max_tokens,
                                 lambda logits: pick(logits, job.sampling, row.rng), on_token)
        if row.finish or job.cancelled:
            return
        if time.monotonic() > job.deadline:
            job.emit(("error", 504, f"the request's deadline passed after {row.generated} tokens"))
            return
        # generate stopped on its own (its end-of-text token, even with ignore_eos)
        row.finish, delta = "stop", row.stream.flush()
        if delta:
            job.emit(("delta", row.index, delta))
        job.emit(("finish", row.index, row.finish, row.generated))

    def _fail_all(self, error: Exception, newcomers: list[Row]) -> None:
        traceback.print_exception(error)
        for job in {id(r.job): r.job for r in [*self.rows, *newcomers]}.values():
            job.emit(("error", 500, f"internal error: {type(error).__name__}: {error}"))
        self.rows, self.batch = [], None

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue(len(self.waiting), len(self.rows))
