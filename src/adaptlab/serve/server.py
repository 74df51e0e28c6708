"""OpenAI-compatible HTTP server for a base model and its LoRA adapters (FastAPI + uvicorn).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with SSE streaming:
`data: {...}` events, then `data: [DONE]`), POST /v1/adapters {name, path} and
DELETE /v1/adapters/{name} (runtime loading, only from the --adapter-dir directory), GET /health.
A request's `model` is the base (served under the --model value) or an adapter NAME. Requests in
flight together are batched by `Batcher` into mixed-adapter forward passes. Every error is OpenAI
JSON, `{"error": {"message", "type", "code", "param"}}`, with a fitting HTTP status; a malformed
request always gets a 4xx.

The parts: `requests` (bodies, limits, reading), `api_errors` (error bodies and handlers),
`context` (what the routes share), `dispatch` (requests -> batched jobs -> JSON or SSE),
`routes_completions` and `routes_models` (the routes). This module assembles them and runs them.

    adaptlab serve --model tiny-random --adapter legal=runs/legal --adapter-dir runs/
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \
        -d '{"model": "legal", "prompt": "Permission is", "max_tokens": 8, "temperature": 0}'
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from adaptlab.errors import UserError
from adaptlab.serve import routes_completions, routes_models
from adaptlab.serve.api_errors import APIError, install_error_handlers
from adaptlab.serve.context import ServerContext
from adaptlab.serve.generation import Batcher, Engine
from adaptlab.serve.requests import ServerLimits

__all__ = ["APIError", "ServerLimits", "bind_socket", "create_app", "is_loopback", "serve"]


def create_app(
    engine: Engine,
    served_name: str | None = None,
    adapter_dir: str | Path | None = None,
    limits: ServerLimits | None = None,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
) -> FastAPI:
    """The FastAPI app serving `engine` (base under `served_name`, default the model spec)."""
    ctx = ServerContext(
        engine=engine,
        batcher=Batcher(engine, max_batch_size=max_batch_size, wait_ms=batch_wait_ms),
        base_name=served_name or engine.spec,
        limits=limits or ServerLimits(),
        adapter_dir=Path(adapter_dir).expanduser().resolve() if adapter_dir is not None else None,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx.batcher.start()
        yield
        await asyncio.to_thread(ctx.batcher.close)

    app = FastAPI(title="adaptlab", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.engine, app.state.batcher, app.state.limits = engine, ctx.batcher, ctx.limits
    install_error_handlers(app)
    app.include_router(routes_models.router)
    app.include_router(routes_completions.router)
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, ready for uvicorn; UserError in one line when that is impossible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, socket.gaierror) else str(err)
        raise UserError(f"--host {host}: not an address this machine can listen on ({reason})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise UserError(
                f"--port {port}: {host}:{port} is already in use; stop what listens there or choose "
                "another --port (0 picks a free one)"
            ) from None
        raise UserError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def serve(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_name: str | None = None,
    adapter_dir: str | Path | None = None,
    limits: ServerLimits | None = None,
    max_batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    sock: socket.socket | None = None,
) -> None:
    """Run the server until interrupted (blocking), on `sock` if given (see bind_socket), else host:port."""
    import uvicorn

    if adapter_dir is not None and not Path(adapter_dir).expanduser().is_dir():
        raise UserError(f"--adapter-dir {adapter_dir}: no such directory")
    sock = sock or bind_socket(host, port)
    app = create_app(engine, served_name, adapter_dir, limits, max_batch_size, batch_wait_ms)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise UserError("the server stopped while starting; see the lines above")
