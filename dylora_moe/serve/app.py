"""The HTTP surface: an OpenAI-compatible FastAPI app over one Service.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models
    GET /health                 GET /metrics (Prometheus text)

Every refusal is a 4xx with an OpenAI error body ({"error": {message, type, param, code}});
a bug in one request is a 500 for that request alone, never a dead server.
"""
from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .metrics import CONTENT_TYPE
from .prompts import chat_prompt, completion_prompts
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .responses import Answer

log = logging.getLogger("dylora_moe.serve")


def create_app(service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        try:
            yield
        finally:
            service.scheduler.stop()

    app = FastAPI(title="DyLoRA-MoE", lifespan=lifespan)
    app.state.service = service
    _errors(app, service)

    @app.get("/health")
    async def health():
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": service.name, "weights_sha256": service.loaded.weights_sha256}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        data = [{"id": m, "object": "model", "created": service.created, "owned_by": "dylora-moe"}
                for m in service.models()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = completion_prompts(service.loaded.tokenizer, body.prompt)
        # OpenAI's legacy completions default to 16 tokens
        return await _answer(service, request, body, prompts, "prompt", body.max_tokens, 16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        prompts = [chat_prompt(service.loaded.tokenizer, body.messages)]
        max_tokens = body.max_completion_tokens or body.max_tokens
        field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        try:
            return await _answer(service, request, body, prompts, "messages", max_tokens, None, chat=True)
        except APIError as error:
            if error.param == "max_tokens":
                error.param, error.message = field, error.message.replace("max_tokens", field, 1)
            raise

    return app


async def _answer(service, request, body, prompts, prompt_field, max_tokens, default_max_tokens, chat: bool):
    unsupported = body.unsupported()
    if unsupported:
        raise APIError(400, f"{unsupported}: not supported by this server (leave it unset)", param=unsupported)
    variant = service.variant(body.model, body.gates)
    sampling, n = service.sampling(body, prompts, prompt_field, max_tokens, default_max_tokens)
    job, events = service.submit(prompts, variant, sampling, n, body.timeout)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    answer = Answer(service, job, events, request, body.model, chat, sum(len(p) for p in prompts), include_usage)
    if body.stream:
        service.metrics.request(request.url.path, 200)
        return StreamingResponse(answer.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await answer.body()
    if result is None:  # the client went away; this goes nowhere
        return Response(status_code=499)
    service.metrics.request(request.url.path, 200)
    return result


def _errors(app: FastAPI, service) -> None:
    def answer(request: Request, error: APIError) -> JSONResponse:
        service.metrics.request(request.url.path, error.status)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return answer(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return answer(request, _validation_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = str(error.detail)
        if error.status_code == 400:  # FastAPI could not read the body at all (not UTF-8, ...)
            message = "body: expected a JSON object in UTF-8"
        return answer(request, APIError(error.status_code, message, param="body" if error.status_code == 400 else None,
                                        headers=getattr(error, "headers", None)))

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):
        log.exception("request %s failed", request.url.path)
        return answer(request, APIError(500, f"internal error: {type(error).__name__}: {error}"))


def _validation_error(error: RequestValidationError) -> APIError:
    """The first problem pydantic found, as one line naming the field."""
    first = error.errors()[0]
    field = _field_path(first.get("loc", ())) or "body"
    if first.get("type") == "json_invalid":
        return APIError(400, f"body: invalid JSON ({first.get('ctx', {}).get('error', first['msg'])})", param="body")
    if first.get("type") == "missing":
        return APIError(400, f"{field}: missing (required)", param=field)
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"{field}: unknown field (not supported by this server)", param=field)
    return APIError(400, f"{field}: {first['msg']}", param=field)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "json-or-python"}


def _field_path(location) -> str:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content': a union's branch
    names (str, list[int], TextPart ...) say nothing to a client."""
    out = ""
    for part in location:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "body" and part.isidentifier() and part.islower() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out
