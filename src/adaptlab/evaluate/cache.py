"""On-disk cache of base-model figures, so evaluating several tuned models against one base is cheap.

An entry holds per-document (or per-item) results, which the paired bootstrap needs, as JSON at
`cache_dir()/eval/<sha256>.json`. The key is the hash of
  - the model identity: its spec, and the name, size and mtime of every weight file in its
    directory (a hub model without a local directory: spec + commit hash when known);
  - what was measured (kind) and the content hash of the data (ids and texts, or items);
  - the settings that change the figures (seq_len, stride, dtype, ...), and CACHE_VERSION.
Batch size is not part of the key: it changes only float rounding. Entries are written to a temp
file and renamed, so a killed run leaves no half entry.

    python -c "from adaptlab.evaluate.cache import BaseCache; print(BaseCache().root)"
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_VERSION = "1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_identity(spec: str, path: Path | str | None, model: Any = None) -> str:
    """A string that changes when the model's weights change: spec + weight files' names, sizes, mtimes."""
    parts = [f"spec={spec}"]
    if path is not None:
        root = Path(path)
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix in WEIGHT_SUFFIXES:
                st = f.stat()
                parts.append(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    elif model is not None:
        config = getattr(model, "config", None)
        parts.append(f"commit={getattr(config, '_commit_hash', None)}")
    if model is not None:
        dtype = getattr(model, "dtype", None)
        parts.append(f"dtype={dtype}")
    return "|".join(parts)


def hash_texts(items: list[Any]) -> str:
    """Content hash of documents or items (anything JSON-serialisable after dataclass -> dict)."""
    h = hashlib.sha256()
    for it in items:
        obj = it.__dict__ if hasattr(it, "__dict__") else it
        h.update(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=list).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


class BaseCache:
    """get/put of JSON results by key; counts hits and misses (tests check that a hit computes nothing)."""

    def __init__(self, root: Path | str | None = None) -> None:
        if root is None:
            from adaptlab.models import cache_dir

            root = cache_dir() / "eval"
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(identity: str, kind: str, data_hash: str, settings: dict[str, Any]) -> str:
        blob = json.dumps(
            {"v": CACHE_VERSION, "model": identity, "kind": kind, "data": data_hash, "settings": settings},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Any | None:
        path = self.root / f"{key}.json"
        try:
            value = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.misses += 1
            return None
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=self.root)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(value, fh)
            os.replace(tmp, self.root / f"{key}.json")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
