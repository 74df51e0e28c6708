"""Glue between a validated request and the batcher: one Job per choice, then a JSON or SSE answer.

`prepare` checks a request against the server's limits and the model's context and turns it into
jobs; `respond` submits them to the `Batcher` and either waits for all of them (one JSON body) or
streams their text as server-sent events (`data: {...}`, then `data: [DONE]`). A client that goes
away cancels its rows. How a chunk or a final body looks is the route's `ResponseFormat`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi.responses import JSONResponse, StreamingResponse

from adaptlab.serve.api_errors import APIError, bad_request
from adaptlab.serve.context import ServerContext
from adaptlab.serve.generation import Job, Sampling
from adaptlab.serve.requests import GenerationBody

MAX_STOPS = 4
SEED_SPACE = 2**64  # torch seeds wrap here; choice k of a request uses seed + k


class ResponseFormat(Protocol):
    """How one route shapes its answers."""

    def chunk(self, i: int, text: str | None, finish: str | None) -> dict[str, Any]:
        """A streamed event for choice i: opening (text and finish None; {} for none), text, or finish."""
        ...

    def final(self, jobs: list[Job], usage: dict[str, int]) -> dict[str, Any]:
        """The whole non-streamed answer."""
        ...


@dataclass
class Prepared:
    adapter: str
    prompts: list[list[int]]  # token ids per prompt
    jobs: list[Job]  # one per choice, index = position

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(j.token_ids) for j in self.jobs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _check_prompt(ctx: ServerContext, ids: list[int], max_new: int) -> None:
    limit = ctx.limits.max_prompt_tokens
    if not ids:
        raise bad_request("the prompt is empty", "empty_prompt", "prompt")
    if len(ids) > limit:
        raise bad_request(
            f"the prompt has {len(ids)} tokens, over this server's limit of {limit}",
            "context_length_exceeded",
            "prompt",
        )
    context = ctx.engine.max_positions
    if context and len(ids) + max_new > context:
        raise bad_request(
            f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the model's context of "
            f"{context} tokens",
            "context_length_exceeded",
            "max_tokens",
        )


def _max_new_tokens(ctx: ServerContext, body: GenerationBody, default_tokens: int) -> int:
    max_new = body.max_completion_tokens or body.max_tokens or default_tokens
    if max_new > ctx.limits.max_new_tokens:
        raise bad_request(
            f"max_tokens {max_new} is over this server's limit of {ctx.limits.max_new_tokens}",
            "max_tokens_too_large",
            "max_tokens",
        )
    return max_new


def _stops(body: GenerationBody) -> tuple[str, ...]:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise bad_request(f"at most {MAX_STOPS} stop strings", "invalid_value", "stop")
    return tuple(s for s in stops if s)


def prepare(
    ctx: ServerContext, body: GenerationBody, prompts: list[list[int]], default_tokens: int
) -> Prepared:
    """The jobs for `body` over tokenized `prompts` (n choices each); HTTP 4xx for what it cannot serve."""
    adapter = ctx.resolve_model(body.model)
    if body.logprobs not in (None, False, 0):
        raise bad_request("logprobs is not supported by this server", "unsupported_parameter", "logprobs")
    max_new = _max_new_tokens(ctx, body, default_tokens)
    if body.n * len(prompts) > ctx.limits.max_choices:
        raise bad_request(
            f"n x prompts is {body.n * len(prompts)}, over the limit of {ctx.limits.max_choices}",
            "too_many_choices",
            "n",
        )
    stops = _stops(body)
    for ids in prompts:
        _check_prompt(ctx, ids, max_new)
    jobs = []
    for p, ids in enumerate(prompts):
        for c in range(body.n):
            seed = None if body.seed is None else (body.seed + p * body.n + c) % SEED_SPACE
            sampling = Sampling(max_new, body.temperature, body.top_p, seed, stops)
            jobs.append(Job(list(ids), adapter=adapter, sampling=sampling))
    return Prepared(adapter, prompts, jobs)


Event = tuple[int, str | None, Job | None]  # (choice, new text, the job when it finished)


def _submit(ctx: ServerContext, prep: Prepared) -> asyncio.Queue[Event]:
    """Submit the jobs; their text and their end arrive on the returned queue (from the engine thread).

    Each job counts as in flight for its adapter until its end arrives (the Batcher ends every job it
    takes, cancelled ones included)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def finished(i: int, job: Job) -> None:  # on the event loop
        ctx.release(prep.adapter)
        events.put_nowait((i, None, job))

    for i, job in enumerate(prep.jobs):
        job.on_text = lambda text, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, text, None))
        job.on_finish = lambda j, i=i: loop.call_soon_threadsafe(finished, i, j)
    ctx.admit(prep.adapter, len(prep.jobs))  # an unload of this adapter now waits for these jobs
    ctx.batcher.submit(prep.jobs)
    return events


def _cancel(prep: Prepared) -> None:
    for job in prep.jobs:
        job.cancelled.set()  # a client that went away stops its rows


async def _whole(prep: Prepared, events: asyncio.Queue[Event], fmt: ResponseFormat) -> JSONResponse:
    try:
        pending = len(prep.jobs)
        while pending:
            _, _, done = await events.get()
            pending -= done is not None
    finally:
        _cancel(prep)
    failed = [j for j in prep.jobs if j.finish_reason == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error}", "server_error", "generation_failed")
    return JSONResponse(fmt.final(prep.jobs, prep.usage()))


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _failure(job: Job) -> dict[str, Any]:
    message = f"generation failed: {job.error}"
    return {"error": {"message": message, "type": "server_error", "code": "generation_failed", "param": None}}


async def _stream(
    prep: Prepared, events: asyncio.Queue[Event], fmt: ResponseFormat, include_usage: bool
) -> AsyncIterator[str]:
    try:
        for i in range(len(prep.jobs)):
            opening = fmt.chunk(i, None, None)
            if opening:
                yield _sse(opening)
        pending = len(prep.jobs)
        while pending:
            i, text, done = await events.get()
            if done is None:
                yield _sse(fmt.chunk(i, text, None))
                continue
            pending -= 1
            yield _sse(
                _failure(done) if done.finish_reason == "error" else fmt.chunk(i, None, done.finish_reason)
            )
        if include_usage:
            last = fmt.chunk(0, None, None) or fmt.chunk(0, "", None)
            last["choices"] = []
            last["usage"] = prep.usage()
            yield _sse(last)
        yield "data: [DONE]\n\n"
    finally:
        _cancel(prep)


async def respond(ctx: ServerContext, body: GenerationBody, prep: Prepared, fmt: ResponseFormat) -> Any:
    """Run the prepared jobs; one JSON answer, or an SSE stream when the body asks to stream."""
    events = _submit(ctx, prep)
    if not body.stream:
        return await _whole(prep, events, fmt)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    return StreamingResponse(
        _stream(prep, events, fmt, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )
