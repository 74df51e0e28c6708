"""What every route of one server shares: the engine, its batcher, the served names and the limits.

`create_app` builds one `ServerContext` and stores it as `app.state.ctx`; routes read it from the
request, so the route modules hold no state of their own.
"""

from __future__ import annotations

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

    def loaded_names(self) -> list[str]:
        return [self.base_name, *self.engine.adapters]

    def resolve_model(self, name: str) -> str:
        """A request's `model` -> BASE or the adapter's name; HTTP 404 listing what is loaded."""
        if name in (self.base_name, BASE):
            return BASE
        if name in self.engine.adapters:
            return name
        raise not_found(
            f"model {name!r} is not loaded; loaded models: {', '.join(self.loaded_names())}", "model"
        )


def context(request: Request) -> ServerContext:
    """The server's context, as stored on the app by `create_app`."""
    return request.app.state.ctx
