"""POST /v1/completions and POST /v1/chat/completions: validate, tokenize, hand to `dispatch`.

The two routes differ in how the prompt is built (raw text vs the chat template over messages) and
in the shape of their answers (`CompletionFormat`, `ChatFormat`); batching and streaming are shared.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request

from adaptlab.errors import UserError
from adaptlab.serve.api_errors import bad_request
from adaptlab.serve.context import ServerContext, context
from adaptlab.serve.dispatch import prepare, respond
from adaptlab.serve.generation import Job
from adaptlab.serve.requests import ChatBody, CompletionBody, parse_body, read_json

router = APIRouter()
CHARS_PER_TOKEN_BOUND = 32  # text longer than limit x this is refused before the tokenizer sees it
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for completions


@dataclass
class CompletionFormat:
    """Answers of /v1/completions: `text_completion` objects."""

    model: str
    rid: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _wrap(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, i: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if text is None and finish is None:
            return {}
        return self._wrap([{"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}])

    def final(self, jobs: list[Job], usage: dict[str, int]) -> dict[str, Any]:
        choices = [
            {"index": i, "text": j.text, "logprobs": None, "finish_reason": j.finish_reason}
            for i, j in enumerate(jobs)
        ]
        return {**self._wrap(choices), "usage": usage}


@dataclass
class ChatFormat:
    """Answers of /v1/chat/completions: `chat.completion` and `chat.completion.chunk` objects."""

    model: str
    rid: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _wrap(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, i: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if text is None and finish is None:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        else:
            delta = {"content": text} if text is not None else {}
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return self._wrap("chat.completion.chunk", [choice])

    def final(self, jobs: list[Job], usage: dict[str, int]) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": j.text},
                "logprobs": None,
                "finish_reason": j.finish_reason,
            }
            for i, j in enumerate(jobs)
        ]
        return {**self._wrap("chat.completion", choices), "usage": usage}


def _bound_text(ctx: ServerContext, chars: int, param: str) -> None:
    limit = ctx.limits.max_prompt_tokens
    if chars > limit * CHARS_PER_TOKEN_BOUND:  # bound tokenizer work before counting
        raise bad_request(
            f"the {param} {'is' if param == 'prompt' else 'are'} over this server's limit of {limit} tokens",
            "context_length_exceeded",
            param,
        )


def _encode_chat(ctx: ServerContext, messages: list[dict[str, str]]) -> list[int]:
    from jinja2 import TemplateError

    try:
        return ctx.engine.encode_chat(messages)
    except UserError as err:
        raise bad_request(str(err), "no_chat_template", "messages") from None
    except TemplateError as err:  # the model's template refuses this conversation (e.g. role order)
        raise bad_request(
            f"the chat template refused the messages: {err}", "invalid_value", "messages"
        ) from None


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    ctx = context(request)
    body: CompletionBody = parse_body(CompletionBody, await read_json(request, ctx.limits.max_body_bytes))
    if body.echo:
        raise bad_request("echo is not supported by this server", "unsupported_parameter", "echo")
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts or len(texts) > ctx.limits.max_choices:
        raise bad_request(
            f"prompt must hold 1 to {ctx.limits.max_choices} strings", "invalid_value", "prompt"
        )
    for text in texts:
        _bound_text(ctx, len(text), "prompt")
    prep = prepare(ctx, body, [ctx.engine.encode(t) for t in texts], DEFAULT_COMPLETION_TOKENS)
    return await respond(ctx, body, prep, CompletionFormat(body.model))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    ctx = context(request)
    body: ChatBody = parse_body(ChatBody, await read_json(request, ctx.limits.max_body_bytes))
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages
    ]
    _bound_text(ctx, sum(len(m["content"]) for m in messages), "messages")
    prep = prepare(ctx, body, [_encode_chat(ctx, messages)], ctx.limits.default_chat_tokens)
    return await respond(ctx, body, prep, ChatFormat(body.model))
