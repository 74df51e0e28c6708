"""The Hugging Face Hub seen from a machine that may be offline: whether it answers, and model and data
names checked before torch is imported, so a name that cannot be found fails in about a second
instead of after the imports and half a minute of the hub client's retries; and cache_dir(), where
the embedded models that stand in for hub models offline are built.

    python -c "from adaptlab.hub import check_model_name; check_model_name('not-a-model')"
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

from adaptlab.errors import UserError

EMBEDDED_MODELS = ("smollm2-135m", "tiny-random", "smollm2-135m-healed", "tiny-random-healed")
PROBE_TIMEOUT_S = 3.0

# Embedded models whose build needs a layer above the core (a healed base is a training run): the
# layer that can build one registers its builder here (adaptlab.healed does, on import), and the model
# loader calls it on first use.
BUILDERS: dict[str, Callable[[str], Path]] = {}


def register_builder(name: str, build: Callable[[str], Path]) -> None:
    """Let the model loader build the embedded model `name` with build(name) -> its HF directory."""
    BUILDERS[name] = build


def cache_dir() -> Path:
    """Where adaptlab keeps what it builds once (embedded models, measurements, the runs index):
    $ADAPTLAB_CACHE, else $XDG_CACHE_HOME/adaptlab, else ~/.cache/adaptlab."""
    root = os.environ.get("ADAPTLAB_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "adaptlab"


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether huggingface.co answers (False at once under HF_HUB_OFFLINE=1)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def require_hub(spec: str) -> None:
    """Fail fast, in one line, when a hub model id is asked for without a network."""
    if not hub_reachable():
        raise UserError(
            f"{spec!r} is not an embedded model or a local directory, and the Hugging Face Hub cannot be "
            f"reached (offline). Embedded models that work offline: {', '.join(EMBEDDED_MODELS)}; or pass a "
            "local model directory"
        )


def missing_model_dir(spec: str) -> UserError | None:
    """The error for a spec that names a path (not a hub id `org/name`) where nothing is, or None."""
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1
    if looks_like_path and not Path(spec).expanduser().exists():
        return UserError(
            f"model {spec!r}: no such directory. Embedded models: {', '.join(EMBEDDED_MODELS)}; "
            "or pass a local Hugging Face model directory or a hub id"
        )
    return None


def check_model_name(spec: str) -> None:
    """An embedded name or an existing path passes (what is in it is checked when it loads); a path
    where nothing is fails; a hub id needs the hub to answer."""
    if spec in EMBEDDED_MODELS or Path(spec).expanduser().exists():
        return
    if (err := missing_model_dir(spec)) is not None:
        raise err
    require_hub(spec)
