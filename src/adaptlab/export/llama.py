"""What adaptlab can write as GGUF, and how llama.cpp names and lays out a llama model's tensors.

The model's config.json, the architecture check (llama without rope scaling), the head counts, the
llama.cpp tensor names and the rotary row permutation of attn_q/attn_k (convert_hf_to_gguf.py's
LlamaModel.permute).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from adaptlab.errors import UserError

ARCHITECTURES = {"llama": "LlamaForCausalLM"}
"""model_type -> the HF architecture adaptlab writes as GGUF (llama.cpp's `llama`)."""


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(
            f"{model_dir}/config.json is missing or unreadable: not a Hugging Face model"
        ) from None


def check_architecture(config: dict[str, Any]) -> None:
    """Raise UserError naming the architecture when adaptlab cannot write it as GGUF."""
    model_type = config.get("model_type")
    arch = (config.get("architectures") or ["?"])[0]
    if model_type not in ARCHITECTURES or arch != ARCHITECTURES[model_type]:
        raise UserError(
            f"export --format gguf: architecture {arch} (model_type {model_type}) is not supported: adaptlab "
            "writes llama-architecture models; use llama.cpp's convert_hf_to_gguf.py for this one"
        )
    scaling = config.get("rope_scaling") or {}
    rope_type = (
        scaling.get("rope_type") or scaling.get("type") or rope_params(config).get("rope_type", "default")
    )
    if rope_type not in (None, "default"):
        raise UserError(
            f"export --format gguf: rope scaling {rope_type!r} of this {arch} is not supported: "
            "use llama.cpp's convert_hf_to_gguf.py for this model"
        )


def rope_params(config: dict[str, Any]) -> dict[str, Any]:
    params = config.get("rope_parameters")
    return params if isinstance(params, dict) else {}


def head_counts(config: dict[str, Any]) -> tuple[int, int]:
    n_head = int(config["num_attention_heads"])
    return n_head, int(config.get("num_key_value_heads") or n_head)


def permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout -> llama.cpp's, on the output rows (convert_hf_to_gguf.py LlamaModel.permute)."""
    out = rows.shape[0]
    return rows.reshape(n_head, 2, out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def tensor_name_map(config: dict[str, Any]) -> Any:
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config["num_hidden_layers"]))


def gguf_name(name_map: Any, hf_name: str) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise UserError(f"export --format gguf: tensor {hf_name} has no llama.cpp name")
    return found


def permuted(hf_name: str, rows: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    n_head, n_kv = head_counts(config)
    if hf_name.endswith("q_proj.weight"):
        return permute(rows, n_head)
    if hf_name.endswith("k_proj.weight"):
        return permute(rows, n_kv)
    return rows
