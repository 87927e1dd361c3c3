"""The OpenAI request bodies the server accepts, as pydantic models, and its error type.

Strict types (a string is not a number) and the OpenAI ranges are checked by pydantic, so
a bad field is a 400 that names it. Unknown fields are refused rather than ignored: a
client that asks for something this server does not do (tools, logprobs, penalties) learns
it instead of getting an answer made without it. Extra fields of our own: `gates` (E
numbers: the mixture to use instead of the router's), `timeout` (seconds) and, as vLLM
has it, `ignore_eos`.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

SEED_RANGE = dict(ge=-(2 ** 63), lt=2 ** 64)
# Fields of the OpenAI API this server does not implement, and the values that leave them off.
OFF = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
       "echo": (None, False), "logprobs": (None, False, 0), "best_of": (None, 1), "suffix": (None, "")}


class APIError(Exception):
    """An answer other than 200, with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Sampled(BaseModel):
    """The fields both endpoints share."""
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, **SEED_RANGE)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # not supported: accepted only at the values that mean "off" (see unsupported())
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    # ours
    gates: Optional[list[float]] = Field(None, min_length=1)
    timeout: Optional[float] = Field(None, gt=0)
    ignore_eos: Optional[bool] = False  # vLLM's name: decode max_tokens whatever the model says (benchmarks)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def unsupported(self) -> Optional[str]:
        """The first field set to something this server does not do, or None."""
        for name, off in OFF.items():
            if name in type(self).model_fields and getattr(self, name) not in off:
                return name
        return None


class CompletionRequest(Sampled):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
