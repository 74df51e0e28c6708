"""Small builders shared by tests: a text corpus on disk and a fast tiny-random run config."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

from adaptlab.config import RunConfig, build_config


def write_corpus(directory: Path, n_docs: int = 40) -> Path:
    """A JSONL corpus of real text (standard-library modules), one document a line."""
    directory.mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[:n_docs]
    path = directory / "corpus.jsonl"
    with path.open("w") as fh:
        for f in files:
            fh.write(json.dumps({"id": f.name, "text": f.read_text()[:3000]}) + "\n")
    return path


def tiny_config(data: Path, out: Path, method: str = "lora", **train: Any) -> RunConfig:
    """A run on tiny-random small enough to take a few seconds."""
    method_fields = {"method": method, "rank": 4}
    for key in ("rank", "alpha", "dropout", "rslora", "targets"):
        if key in train:
            method_fields[key] = train.pop(key)
    train_fields = {
        "steps": 4,
        "batch": 2,
        "seq_len": 32,
        "precision": "fp32",
        "eval_examples": 4,
        "lr": 1e-3,
    }
    train_fields.update(train)
    return build_config(
        {
            "model": {"name": "tiny-random"},
            "method": method_fields,
            "data": {"train": [str(data)]},
            "train": train_fields,
            "out": str(out),
        }
    )
