"""A job's events (from the scheduler) as OpenAI responses: one JSON body, or server-sent
events ending in `[DONE]`. Each response carries two fields of ours: `gates` on every
choice (the mixture that choice was generated with; null where a token-routed model
changed them every token) and `weights_sha256` (the experts served, as loading.weights_hash
computes it)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from .protocol import APIError


@dataclass
class Choice:
    text: list = field(default_factory=list)
    gates: Optional[list] = None
    finish: Optional[str] = None
    tokens: int = 0


class Answer:
    """One answer being assembled: chat or text completion, streamed or not."""

    def __init__(self, service, job, events: asyncio.Queue, request, model: str, chat: bool, prompt_tokens: int,
                 include_usage: bool = False):
        self.service, self.job, self.events, self.request = service, job, events, request
        self.model, self.chat, self.prompt_tokens, self.include_usage = model, chat, prompt_tokens, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices = [Choice() for _ in range(job.width)]
        self.gone = False  # the client disconnected: nobody to answer

    async def body(self) -> Optional[dict]:
        async for _ in self._events():
            pass
        if self.gone:
            return None
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [self._final(i, c) for i, c in enumerate(self.choices)], "usage": self._usage()}

    async def stream(self) -> AsyncIterator[str]:
        try:
            async for event in self._events():
                chunk = self._chunk(event)
                if chunk is not None:
                    yield _sse(chunk)
            if self.gone:
                return
            if self.include_usage:
                yield _sse({**self._head(self._chunk_object()), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        except APIError as error:  # the headers are sent: the error goes in the stream
            self.service.metrics.request(self.request.url.path, error.status)
            yield _sse(error.body())

    async def _events(self):
        """The job's events until every choice is finished; an error event raises; a client
        that goes away ends them and cancels the job (its rows leave the batch at the next
        step)."""
        gone = asyncio.ensure_future(_disconnected(self.request))
        try:
            while any(c.finish is None for c in self.choices):
                getter = asyncio.ensure_future(self.events.get())
                done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    self.gone = True
                    return
                event = getter.result()
                self._record(event)
                yield event
        finally:
            gone.cancel()
            if any(c.finish is None for c in self.choices):
                self.service.scheduler.cancel(self.job)

    def _record(self, event: tuple) -> None:
        kind, *rest = event
        if kind == "error":
            status, message = rest
            raise APIError(status, message, code="deadline_exceeded" if status == 504 else None,
                           kind="timeout" if status == 504 else None,
                           headers={"Retry-After": "1"} if status == 503 else None)
        choice = self.choices[rest[0]]
        if kind == "gates":
            choice.gates = rest[1]
        elif kind == "delta":
            choice.text.append(rest[1])
        elif kind == "finish":
            choice.finish, choice.tokens = rest[1], rest[2]

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "weights_sha256": self.service.loaded.weights_sha256}

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, event: tuple) -> Optional[dict]:
        kind, index, *rest = event
        choice: dict = {"index": index, "logprobs": None, "finish_reason": None}
        if kind == "gates":
            choice["gates"] = rest[0]
            text = {"role": "assistant", "content": ""} if self.chat else ""
        elif kind == "delta":
            text = {"content": rest[0]} if self.chat else rest[0]
        else:
            choice["finish_reason"] = rest[0]
            text = {} if self.chat else ""
        choice["delta" if self.chat else "text"] = text
        return {**self._head(self._chunk_object()), "choices": [choice]}

    def _final(self, index: int, choice: Choice) -> dict:
        text = "".join(choice.text)
        out = {"index": index, "finish_reason": choice.finish, "logprobs": None, "gates": choice.gates}
        if self.chat:
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        return out

    def _usage(self) -> dict:
        completion = sum(c.tokens for c in self.choices)
        prompt = self.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _disconnected(request) -> None:
    """Returns when the client has gone (the request body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
