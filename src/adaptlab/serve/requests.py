"""Request bodies the server accepts and how they are read: size bound while reading, JSON, UTF-8, schema.

Every malformed body is refused here with a 4xx `APIError` before any model work starts: a body over
`ServerLimits.max_body_bytes` (declared or streamed, stopped as soon as it passes the bound), bytes
that are not JSON, strings that cannot be encoded as UTF-8 (lone surrogates), and fields outside
their schema (`seed` outside 64 bits, a NUL byte in a path, a non-string content part).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import ClientDisconnect

from adaptlab.serve.api_errors import bad_request, client_gone, too_large

log = logging.getLogger("uvicorn.error")  # the server's own log, next to uvicorn's lines

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # the seeds torch.Generator accepts


@dataclass(frozen=True)
class ServerLimits:
    """Per-request bounds; requests beyond them get HTTP 400/413 instead of tying up the server."""

    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024  # largest max_tokens a request may ask for
    default_chat_tokens: int = 256  # chat requests without max_tokens
    max_body_bytes: int = 1_000_000
    max_choices: int = 8  # n, and prompts per completion request


class GenerationBody(BaseModel):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    # strict: a count or a seed is a JSON integer, never "3", 3.0 or true
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, strict=True)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX, strict=True)
    logprobs: Any = None


class CompletionBody(GenerationBody):
    prompt: str | list[str]
    echo: bool = False


class ContentPart(BaseModel):
    """One part of a message's content; only `text` parts reach the model."""

    model_config = ConfigDict(extra="ignore")

    type: str = ""
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """The message's text: its string content, or its text parts joined."""
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str

    @field_validator("path")
    @classmethod
    def _no_nul(cls, path: str) -> str:
        if "\x00" in path:
            raise ValueError("a path cannot hold a NUL byte")
        return path


def parse_body(model: type[BaseModel], data: Any) -> Any:
    """`data` validated as `model`; HTTP 400 naming the first field that is wrong."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise bad_request(f"{where}: {first['msg']}", "invalid_value", where) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 once it passes `limit` bytes (declared or as it streams in)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:  # stop reading: the rest of a huge or endless body never reaches memory
                raise too_large(limit)
    except ClientDisconnect:  # nobody is left to answer: one log line instead of a traceback
        log.info("client went away while sending its request body (%d bytes read)", len(body))
        raise client_gone() from None
    return bytes(body)


def _first_unencodable(data: Any) -> str | None:
    """Where in `data` (dotted path) a string cannot be encoded as UTF-8 (a lone surrogate); None if nowhere."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # iterative: the depth of `data` is the client's choice
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if _first_unencodable(key) is not None:
                    return f"{where} (a key)" if where else "body (a key)"
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}.{i}" if where else str(i), item) for i, item in enumerate(value))
    return None


async def read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON whose every string is valid Unicode; 413 or 400 otherwise."""
    body = await read_body(request, limit)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad_request(f"malformed JSON body: {err}", "invalid_json") from None
    except RecursionError:
        raise bad_request("malformed JSON body: nested too deeply", "invalid_json") from None
    where = _first_unencodable(data)
    if where is not None:
        raise bad_request(
            f"{where}: a string holds a lone surrogate (\\ud800-\\udfff); send valid Unicode",
            "invalid_unicode",
            where,
        )
    return data
