"""GET /health, GET /v1/models, and runtime adapters: POST /v1/adapters {name, path}, DELETE /v1/adapters/NAME.

Unloading an adapter refuses new requests for it at once (404), waits for those already admitted to
finish, then removes it. Adapters load only from the server's --adapter-dir (a path that resolves outside it is refused with
403), so a client cannot make the server read arbitrary files.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from adaptlab.errors import UserError
from adaptlab.serve.api_errors import APIError, bad_request, not_found
from adaptlab.serve.context import ServerContext, context
from adaptlab.serve.generation import BASE
from adaptlab.serve.requests import AdapterBody, parse_body, read_json

router = APIRouter()


def _model_card(name: str, root: str, parent: str | None, created: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "adaptlab",
        "root": root,
        "parent": parent,
    }


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    ctx = context(request)
    return {"status": "ok", "model": ctx.base_name, "adapters": list(ctx.engine.adapters)}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    ctx = context(request)
    data = [_model_card(ctx.base_name, ctx.engine.spec, None, ctx.created)]
    for name, path in ctx.engine.adapters.items():
        data.append(_model_card(name, str(path), ctx.base_name, ctx.created))
    return {"object": "list", "data": data}


def _allowed_path(ctx: ServerContext, body: AdapterBody) -> Path:
    """The adapter's resolved path inside --adapter-dir; 403 when loading is off or the path leaves it."""
    allowed = ctx.adapter_dir
    if allowed is None:
        raise APIError(
            403,
            "runtime adapter loading is off: start the server with --adapter-dir DIR",
            "permission_error",
            "adapter_loading_disabled",
        )
    if body.name in (ctx.base_name, BASE, *ctx.engine.adapters):  # one being unloaded too
        raise APIError(
            409,
            f"a model named {body.name!r} is already loaded; loaded models: {', '.join(ctx.loaded_names())}",
            "invalid_request_error",
            "adapter_exists",
            "name",
        )
    try:
        path = (allowed / Path(body.path).expanduser()).resolve()
    except (OSError, RuntimeError) as err:  # a path too long, a symlink loop, an unknown ~user
        raise bad_request(f"path {body.path!r}: {err}", "invalid_value", "path") from None
    if not path.is_relative_to(allowed):
        raise APIError(
            403,
            f"{body.path} is outside the allowed adapter directory {allowed}",
            "permission_error",
            "path_not_allowed",
            "path",
        )
    return path


@router.post("/v1/adapters", status_code=201)
async def add_adapter(request: Request) -> dict[str, Any]:
    ctx = context(request)
    body: AdapterBody = parse_body(AdapterBody, await read_json(request, ctx.limits.max_body_bytes))
    path = _allowed_path(ctx, body)
    try:
        loaded = await asyncio.to_thread(ctx.engine.add_adapter, body.name, path)
    except UserError as err:
        raise bad_request(str(err), "invalid_adapter", "path") from None
    except OSError as err:  # unreadable files under the allowed directory
        raise bad_request(f"{body.path}: {err.strerror or err}", "invalid_adapter", "path") from None
    return _model_card(body.name, str(loaded), ctx.base_name, int(time.time()))


@router.delete("/v1/adapters/{name}")
async def remove_adapter(name: str, request: Request) -> dict[str, Any]:
    ctx = context(request)
    if name == ctx.base_name:
        raise bad_request(
            f"{name!r} is the base model; only adapters can be unloaded", "cannot_unload_base", "name"
        )
    if name in ctx.unloading:
        raise APIError(
            409,
            f"adapter {name!r} is already being unloaded",
            "invalid_request_error",
            "adapter_unloading",
            "name",
        )
    if name not in ctx.engine.adapters:
        loaded = ctx.loaded_names()[1:]
        raise not_found(f"no adapter named {name!r}; loaded adapters: {', '.join(loaded) or 'none'}", "name")
    ctx.unloading.add(name)  # new requests for it get 404 from here on
    try:
        await ctx.drained(name)  # the requests already admitted finish first
        await asyncio.to_thread(ctx.engine.remove_adapter, name)
    finally:
        ctx.unloading.discard(name)
    return {"id": name, "object": "model", "deleted": True}
