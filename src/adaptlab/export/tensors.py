"""The tensors a GGUF is written from: a llama model's weights, or a LoRA adapter's A/B pairs.

Both come from safetensors as (llama.cpp name, fp32 array); a LoRA adapter's alpha is turned into the
one llama.cpp scales by, and what a GGUF LoRA cannot hold (DoRA, per-module ranks, embeddings) is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.errors import UserError
from adaptlab.export.llama import gguf_name, permuted, tensor_name_map


def model_tensors(model_dir: Path, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every weight of an HF llama directory (safetensors)."""
    from safetensors import safe_open

    name_map = tensor_name_map(config)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} holds no *.safetensors weights")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                if "rotary_emb" in key:
                    continue
                array = f.get_tensor(key).float().numpy()
                yield gguf_name(name_map, key), permuted(key, array, config)


LORA_KEY = "base_model.model."


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{adapter_dir}/adapter_config.json is missing or unreadable") from None


def lora_alpha(cfg: dict[str, Any]) -> float:
    """The alpha llama.cpp needs (it scales by alpha/r); refuse what GGUF LoRA cannot express."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"export --format gguf: a {cfg.get('peft_type')} adapter is not a LoRA: merge it first"
        )
    if cfg.get("use_dora"):
        raise UserError(
            "export --format gguf: DoRA adapters have magnitude vectors GGUF LoRA cannot hold: "
            "merge it (`adaptlab merge`) and export the merged model"
        )
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError("export --format gguf: per-module ranks or alphas are not supported: merge it first")
    alpha, r = float(cfg.get("lora_alpha", 8)), int(cfg.get("r", 8))
    return alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha


def lora_tensors(adapter_dir: Path, base_config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(`<llama.cpp base name>.lora_a|b`, fp32 array) pairs as convert_lora_to_gguf.py writes them."""
    from safetensors import safe_open

    name_map = tensor_name_map(base_config)
    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        for key in keys:
            if ".lora_A." not in key and ".lora_B." not in key:
                raise UserError(
                    f"export --format gguf: {key} is not a LoRA matrix (trained embeddings or lm_head "
                    "cannot go into a GGUF LoRA): merge the adapter and export the merged model"
                )
            which = "a" if ".lora_A." in key else "b"
            base = key.removeprefix(LORA_KEY).replace(f".lora_{which.upper()}.weight", ".weight")
            if base.endswith(("embed_tokens.weight", "lm_head.weight")):
                raise UserError(
                    f"export --format gguf: the adapter trains {base} (embeddings/lm_head), which llama.cpp "
                    "LoRA does not load: merge the adapter and export the merged model"
                )
            array = f.get_tensor(key).float().numpy()
            if which == "b":
                array = permuted(base, array, base_config)
            yield f"{gguf_name(name_map, base)}.lora_{which}", array
