"""What every route of one server shares: the engine, its batcher, the served names and the limits.

`create_app` builds one `ServerContext` and stores it as `app.state.ctx`; routes read it from the
request, so the route modules hold no state of their own.

It also counts each adapter's jobs in flight (submitted, not yet finished), so that unloading an
adapter waits for the requests already admitted for it while refusing new ones. Every count changes on
the event loop's thread: admission and release need no lock.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from adaptlab.serve.api_errors import not_found
from adaptlab.serve.generation import BASE, Batcher, Engine
from adaptlab.serve.requests import ServerLimits


@dataclass
class ServerContext:
    engine: Engine
    batcher: Batcher
    base_name: str  # the name requests use for the base model
    limits: ServerLimits
    adapter_dir: Path | None  # runtime adapter loading only from here; None turns it off
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: dict[str, int] = field(default_factory=dict)  # adapter -> its jobs not yet finished
    unloading: set[str] = field(default_factory=set)  # adapters refusing new requests until unloaded
    _idle: dict[str, asyncio.Event] = field(default_factory=dict)  # set when an adapter's count hits 0

    def loaded_names(self) -> list[str]:
        return [self.base_name, *(name for name in self.engine.adapters if name not in self.unloading)]

    def admit(self, adapter: str, jobs: int) -> None:
        """Count `jobs` new jobs for `adapter` as in flight (on the event loop, before they are submitted)."""
        self.in_flight[adapter] = self.in_flight.get(adapter, 0) + jobs

    def release(self, adapter: str) -> None:
        """One job of `adapter` finished (on the event loop); wakes an unload waiting for the last one."""
        left = self.in_flight[adapter] - 1
        if left:
            self.in_flight[adapter] = left
            return
        del self.in_flight[adapter]
        idle = self._idle.pop(adapter, None)
        if idle is not None:
            idle.set()

    async def drained(self, adapter: str) -> None:
        """Return once `adapter` has no job in flight."""
        if self.in_flight.get(adapter):
            await self._idle.setdefault(adapter, asyncio.Event()).wait()

    def resolve_model(self, name: str) -> str:
        """A request's `model` -> BASE or the adapter's name; HTTP 404 listing what is loaded."""
        if name in (self.base_name, BASE):
            return BASE
        if name in self.unloading:
            raise not_found(
                f"model {name!r} is being unloaded; loaded models: {', '.join(self.loaded_names())}", "model"
            )
        if name in self.engine.adapters:
            return name
        raise not_found(
            f"model {name!r} is not loaded; loaded models: {', '.join(self.loaded_names())}", "model"
        )


def context(request: Request) -> ServerContext:
    """The server's context, as stored on the app by `create_app`."""
    return request.app.state.ctx
