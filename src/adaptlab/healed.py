"""Healed embedded bases: `smollm2-135m-healed` (and `tiny-random-healed` for tests).

smollm2-135m's weights are Q4_1 values turned back into fp32, so a full fine-tuning can lower the NLL
of any English text by repairing rounding error that a low-rank update cannot reach; "full
fine-tuning forgets less" can then mean "full fine-tuning repairs the quantized base". A healed base
takes that repair out of the comparison: the embedded model after a short full fine-tuning on general
English, built once on first use into the cache (cache_dir()/v1/models/<name>-<recipe hash>/) and
reused. The general English is the Python documentation's prose that ships with every Python
(`pydoc_data.topics`, ~0.8 MB, PSF licence), so the build needs no data set and no network.

Recipe (RECIPES): smollm2-135m: 60 steps of 4 x 128 tokens at LR 2e-5 (full fine-tuning, warmup 5%,
cosine), about 4 min on a 2-core CPU (3.7 s a step, DATA.md); tiny-random: 4 steps of 2 x 32.

    python -c "from adaptlab.models import local_dir; print(local_dir('smollm2-135m-healed'))"
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from adaptlab.hub import register_builder

SUFFIX = "-healed"
RECIPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {"steps": 60, "batch": 4, "seq_len": 128, "lr": 2e-5},
    "tiny-random": {"steps": 4, "batch": 2, "seq_len": 32, "lr": 1e-3},
}
BUILD_S = {"smollm2-135m": 240.0, "tiny-random": 10.0}  # about how long a build takes on a 2-core CPU
HEALED_MODELS = tuple(name + SUFFIX for name in RECIPES)


def heal_documents() -> list[dict[str, str]]:
    """General English prose shipped with Python: the topics of its documentation."""
    from pydoc_data.topics import topics

    return [{"id": f"pydoc:{k}", "text": v} for k, v in sorted(topics.items()) if len(v) > 200]


def _recipe_hash(base: str) -> str:
    recipe = {"base": base, **RECIPES[base], "docs": len(heal_documents())}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def healed_dir(name: str) -> Path:
    """The healed model's HF directory, built on first use (a full fine-tuning of the base)."""
    from adaptlab.models import build_atomically, cache_dir

    base = name.removesuffix(SUFFIX)
    target = cache_dir() / "v1" / "models" / f"{name}-{_recipe_hash(base)}"
    return build_atomically(target, lambda tmp: _build(base, tmp), name, about_s=BUILD_S[base])


def _build(base: str, tmp: Path) -> None:
    from adaptlab.config import build_config
    from adaptlab.train import train

    work = Path(tempfile.mkdtemp(prefix="heal-"))
    try:
        data = work / "general.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in heal_documents()))
        r = RECIPES[base]
        config = build_config(
            {
                "model": {"name": base},
                "method": {"method": "full"},
                "data": {"train": [str(data)], "val_frac": 0.02, "test_frac": 0.02},
                "train": {
                    "steps": r["steps"],
                    "batch": r["batch"],
                    "seq_len": r["seq_len"],
                    "lr": r["lr"],
                    "precision": "fp32",
                    "eval_examples": 4,
                },
                "out": str(work / "run"),
            }
        )
        summary = train(config)
        for item in (work / "run" / "model").iterdir():
            shutil.copy2(item, tmp / item.name)
        heal = {"base": base, "recipe": RECIPES[base], "data": "pydoc_data.topics", "summary": summary}
        (tmp / "healed.json").write_text(json.dumps(heal, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


for _name in HEALED_MODELS:
    register_builder(_name, healed_dir)  # the model loader builds a healed base on first use
