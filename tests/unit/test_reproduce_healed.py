"""The healed embedded base: built once on first use by a short full fine-tuning, then reused.

python -m pytest -q tests/unit/test_reproduce_healed.py
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from adaptlab.healed import RECIPES, heal_documents
from adaptlab.models import load_model, local_dir


def test_healed_tiny_random_is_built_once_and_differs_from_its_base() -> None:
    path = local_dir("tiny-random-healed")
    info = json.loads((path / "healed.json").read_text())
    assert info["base"] == "tiny-random" and info["summary"]["steps"] == RECIPES["tiny-random"]["steps"]
    assert info["summary"]["method"] == "full" and info["data"] == "pydoc_data.topics"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert local_dir("tiny-random-healed") == path  # reused, not rebuilt
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    healed = load_file(str(path / "model.safetensors"))
    base = load_file(str(local_dir("tiny-random") / "model.safetensors"))
    assert set(healed) == set(base)
    assert any(not torch.equal(healed[k], base[k]) for k in base)
    loaded = load_model("tiny-random-healed")  # a named embedded model like the others
    assert loaded.spec == "tiny-random-healed"


def test_heal_data_is_general_english_shipped_with_python() -> None:
    docs = heal_documents()
    assert len(docs) > 50 and sum(len(d["text"]) for d in docs) > 200_000
    assert all(d["id"].startswith("pydoc:") for d in docs)
