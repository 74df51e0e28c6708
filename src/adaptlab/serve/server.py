"""OpenAI-compatible HTTP server for a base model and its LoRA adapters (FastAPI + uvicorn).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with SSE streaming:
`data: {...}` events, then `data: [DONE]`), POST /v1/adapters {name, path} and
DELETE /v1/adapters/{name} (runtime loading, only from the --adapter-dir directory), GET /health.
A request's `model` is the base (served under the --model value) or an adapter NAME. Requests in
flight together are batched by `Batcher` into mixed-adapter forward passes. Every error is OpenAI
JSON, `{"error": {"message", "type", "code", "param"}}`, with a fitting HTTP status.

    adaptlab serve --model tiny-random --adapter legal=runs/legal --adapter-dir runs/
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \
        -d '{"model": "legal", "prompt": "Permission is", "max_tokens": 8, "temperature": 0}'
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptlab.errors import UserError
from adaptlab.serve.generation import BASE, Batcher, Engine, Job, Sampling


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds; requests beyond them get HTTP 400/413 instead of tying up the server."""

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024  # largest max_tokens a request may ask for
    default_chat_tokens: int = 256  # chat requests without max_tokens
    max_body_bytes: int = 1_000_000
    max_choices: int = 8  # n, and prompts per completion request


class APIError(Exception):
    """An error returned to the client as OpenAI JSON."""

    def __init__(self, status: int, message: str, type_: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}
        return JSONResponse(body, status_code=self.status)


def _bad(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


# -- request bodies -------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: Any = None


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise _bad(f"{where}: {first['msg']}", "invalid_value", where) from None


async def _json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit} bytes", "invalid_request_error", "request_too_large")
    body = await request.body()
    if len(body) > limit:
        raise APIError(413, f"request body over {limit} bytes", "invalid_request_error", "request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(f"malformed JSON body: {err}", "invalid_json") from None


# -- the app --------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    adapter: str
    prompts: list[list[int]]  # token ids per prompt
    jobs: list[Job]  # one per choice, index = position


def create_app(
    engine: Engine,
    served_name: str | None = None,
    adapter_dir: str | Path | None = None,
    limits: ServerLimits | None = None,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
) -> FastAPI:
    """The FastAPI app serving `engine` (base under `served_name`, default the model spec)."""
    base_name = served_name or engine.spec
    limits = limits or ServerLimits()
    allowed = Path(adapter_dir).expanduser().resolve() if adapter_dir is not None else None
    batcher = Batcher(engine, max_batch_size=max_batch_size, wait_ms=batch_wait_ms)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="adaptlab", lifespan=lifespan)
    app.state.engine, app.state.batcher, app.state.limits = engine, batcher, limits

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), kind, f"http_{err.status_code}").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _bad(str(err.errors()[0].get("msg", err)), "invalid_value").response()

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception) -> JSONResponse:
        return APIError(
            500, f"internal error: {type(err).__name__}: {err}", "server_error", "internal_error"
        ).response()

    def loaded_names() -> list[str]:
        return [base_name, *engine.adapters]

    def resolve_model(name: str) -> str:
        if name in (base_name, BASE):
            return BASE
        if name in engine.adapters:
            return name
        raise APIError(
            404,
            f"model {name!r} is not loaded; loaded models: {', '.join(loaded_names())}",
            "not_found_error",
            "model_not_found",
            "model",
        )

    def prepare(body: _Body, prompts: list[list[int]], default_tokens: int) -> _Prepared:
        adapter = resolve_model(body.model)
        if body.logprobs not in (None, False, 0):
            raise _bad("logprobs is not supported by this server", "unsupported_parameter", "logprobs")
        max_new = body.max_completion_tokens or body.max_tokens or default_tokens
        if max_new > limits.max_new_tokens:
            raise _bad(
                f"max_tokens {max_new} is over this server's limit of {limits.max_new_tokens}",
                "max_tokens_too_large",
                "max_tokens",
            )
        if body.n * len(prompts) > limits.max_choices:
            raise _bad(
                f"n x prompts is {body.n * len(prompts)}, over the limit of {limits.max_choices}",
                "too_many_choices",
                "n",
            )
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise _bad("at most 4 stop strings", "invalid_value", "stop")
        for ids in prompts:
            if not ids:
                raise _bad("the prompt is empty", "empty_prompt", "prompt")
            if len(ids) > limits.max_prompt_tokens:
                raise _bad(
                    f"the prompt has {len(ids)} tokens, over this server's limit of {limits.max_prompt_tokens}",
                    "context_length_exceeded",
                    "prompt",
                )
            if engine.max_positions and len(ids) + max_new > engine.max_positions:
                raise _bad(
                    f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the model's context of "
                    f"{engine.max_positions} tokens",
                    "context_length_exceeded",
                    "max_tokens",
                )
        jobs = []
        for p, ids in enumerate(prompts):
            for c in range(body.n):
                seed = None if body.seed is None else body.seed + p * body.n + c
                sampling = Sampling(max_new, body.temperature, body.top_p, seed, tuple(s for s in stops if s))
                jobs.append(Job(list(ids), adapter=adapter, sampling=sampling))
        return _Prepared(adapter, prompts, jobs)

    async def run(
        request: Request,
        body: _Body,
        prep: _Prepared,
        chunk: Callable[[int, str | None, str | None], dict[str, Any]],
        final: Callable[[list[Job], dict[str, int]], dict[str, Any]],
    ) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str | None, Job | None]] = asyncio.Queue()
        for i, job in enumerate(prep.jobs):
            job.on_text = lambda text, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, text, None))
            job.on_finish = lambda j, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None, j))
        batcher.submit(prep.jobs)

        def usage() -> dict[str, int]:
            prompt = sum(len(p) for p in prep.prompts)
            completion = sum(len(j.token_ids) for j in prep.jobs)
            return {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }

        if not body.stream:
            try:
                pending = len(prep.jobs)
                while pending:
                    _, _, done = await events.get()
                    pending -= done is not None
            finally:
                for job in prep.jobs:
                    job.cancelled.set()  # a client that went away stops its rows
            failed = [j for j in prep.jobs if j.finish_reason == "error"]
            if failed:
                raise APIError(
                    500, f"generation failed: {failed[0].error}", "server_error", "generation_failed"
                )
            return JSONResponse(final(prep.jobs, usage()))

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def stream() -> AsyncIterator[str]:
            try:
                for i in range(len(prep.jobs)):
                    opening = chunk(i, None, None)
                    if opening:
                        yield f"data: {json.dumps(opening)}\n\n"
                pending = len(prep.jobs)
                while pending:
                    i, text, done = await events.get()
                    if done is None:
                        yield f"data: {json.dumps(chunk(i, text, None))}\n\n"
                        continue
                    pending -= 1
                    if done.finish_reason == "error":
                        err = {
                            "error": {
                                "message": f"generation failed: {done.error}",
                                "type": "server_error",
                                "code": "generation_failed",
                                "param": None,
                            }
                        }
                        yield f"data: {json.dumps(err)}\n\n"
                    else:
                        yield f"data: {json.dumps(chunk(i, None, done.finish_reason))}\n\n"
                if include_usage:
                    last = chunk(0, None, None) or chunk(0, "", None)
                    last["choices"] = []
                    last["usage"] = usage()
                    yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                for job in prep.jobs:
                    job.cancelled.set()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": base_name, "adapters": list(engine.adapters)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {
                "id": base_name,
                "object": "model",
                "created": created,
                "owned_by": "adaptlab",
                "root": engine.spec,
                "parent": None,
            }
        ]
        for name, path in engine.adapters.items():
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "adaptlab",
                    "root": str(path),
                    "parent": base_name,
                }
            )
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body: CompletionBody = _parse(CompletionBody, await _json(request, limits.max_body_bytes))
        if body.echo:
            raise _bad("echo is not supported by this server", "unsupported_parameter", "echo")
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or len(texts) > limits.max_choices:
            raise _bad(f"prompt must hold 1 to {limits.max_choices} strings", "invalid_value", "prompt")
        if any(len(t) > limits.max_prompt_tokens * 32 for t in texts):  # bound tokenizer work before counting
            raise _bad(
                f"the prompt is over this server's limit of {limits.max_prompt_tokens} tokens",
                "context_length_exceeded",
                "prompt",
            )
        prep = prepare(body, [engine.encode(t) for t in texts], 16)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
            if text is None and finish is None:
                return {}
            choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {
                "id": rid,
                "object": "text_completion",
                "created": now,
                "model": body.model,
                "choices": [choice],
            }

        def final(jobs: list[Job], usage: dict[str, int]) -> dict[str, Any]:
            choices = [
                {"index": i, "text": j.text, "logprobs": None, "finish_reason": j.finish_reason}
                for i, j in enumerate(jobs)
            ]
            return {
                "id": rid,
                "object": "text_completion",
                "created": now,
                "model": body.model,
                "choices": choices,
                "usage": usage,
            }

        return await run(request, body, prep, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body: ChatBody = _parse(ChatBody, await _json(request, limits.max_body_bytes))
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        if sum(len(m["content"]) for m in messages) > limits.max_prompt_tokens * 32:
            raise _bad(
                f"the messages are over this server's limit of {limits.max_prompt_tokens} tokens",
                "context_length_exceeded",
                "messages",
            )
        try:
            ids = engine.encode_chat(messages)
        except UserError as err:
            raise _bad(str(err), "no_chat_template", "messages") from None
        prep = prepare(body, [ids], limits.default_chat_tokens)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
            if text is None and finish is None:
                delta: dict[str, Any] = {"role": "assistant", "content": ""}
            else:
                delta = {"content": text} if text is not None else {}
            choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": body.model,
                "choices": [choice],
            }

        def final(jobs: list[Job], usage: dict[str, int]) -> dict[str, Any]:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": j.text},
                    "logprobs": None,
                    "finish_reason": j.finish_reason,
                }
                for i, j in enumerate(jobs)
            ]
            return {
                "id": rid,
                "object": "chat.completion",
                "created": now,
                "model": body.model,
                "choices": choices,
                "usage": usage,
            }

        return await run(request, body, prep, chunk, final)

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(request: Request) -> dict[str, Any]:
        body: AdapterBody = _parse(AdapterBody, await _json(request, limits.max_body_bytes))
        if allowed is None:
            raise APIError(
                403,
                "runtime adapter loading is off: start the server with --adapter-dir DIR",
                "permission_error",
                "adapter_loading_disabled",
            )
        if body.name in loaded_names() or body.name == BASE:
            raise APIError(
                409,
                f"a model named {body.name!r} is already loaded; loaded models: {', '.join(loaded_names())}",
                "invalid_request_error",
                "adapter_exists",
                "name",
            )
        path = (allowed / Path(body.path).expanduser()).resolve()
        if not path.is_relative_to(allowed):
            raise APIError(
                403,
                f"{body.path} is outside the allowed adapter directory {allowed}",
                "permission_error",
                "path_not_allowed",
                "path",
            )
        try:
            loaded = await asyncio.to_thread(engine.add_adapter, body.name, path)
        except UserError as err:
            raise _bad(str(err), "invalid_adapter", "path") from None
        return {
            "id": body.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "adaptlab",
            "root": str(loaded),
            "parent": base_name,
        }

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict[str, Any]:
        if name == base_name:
            raise _bad(
                f"{name!r} is the base model; only adapters can be unloaded", "cannot_unload_base", "name"
            )
        if name not in engine.adapters:
            raise APIError(
                404,
                f"no adapter named {name!r}; loaded adapters: {', '.join(engine.adapters) or 'none'}",
                "not_found_error",
                "model_not_found",
                "name",
            )
        await asyncio.to_thread(engine.remove_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: str | None = None,
    adapter_dir: str | Path | None = None,
    limits: ServerLimits | None = None,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
) -> None:
    """Run the server until interrupted (blocking)."""
    import uvicorn

    if adapter_dir is not None and not Path(adapter_dir).expanduser().is_dir():
        raise UserError(f"--adapter-dir {adapter_dir}: no such directory")
    app = create_app(engine, served_name, adapter_dir, limits, max_batch_size, batch_wait_ms)
    uvicorn.run(app, host=host, port=port, log_level="info")
