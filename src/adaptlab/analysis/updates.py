"""dW of every adapted Linear layer of a tuned artifact, through one code path for adapters and full models.

LoRA family (LoRA, rsLoRA, DoRA, QLoRA): scaling * B @ A from the PEFT adapter files (DoRA: the merged
weight minus W0); full fine-tuning: W_tuned - W_base matched by module name. Matrices are in nn.Linear
orientation (out, in). Also the names of layers: module type (q/k/v/o/gate/up/down) and depth.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptlab.analysis.weights import (
    PEFT_PREFIX,
    SafetensorsWeights,
    Weights,
    base_weights,
    hf_linear_modules,
)
from adaptlab.artifacts import resolve
from adaptlab.errors import UserError
from adaptlab.models import EMBEDDED_MODELS, LoadedModel, local_dir

MODULE_TYPES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LayerUpdate:
    """One adapted Linear layer: its base weight and the update, both (out, in) fp32."""

    name: str  # full module path, e.g. model.layers.0.self_attn.q_proj
    w0: torch.Tensor  # (out, in)
    dw: torch.Tensor  # (out, in)


@dataclass
class UpdateSet:
    """Every layer update of one tuned artifact, with where it came from."""

    layers: list[LayerUpdate]
    kind: str  # "adapter" | "model"
    method: str  # lora | rslora | dora | qlora | full (or what the run recorded)
    base: str  # what W0 was read from
    tuned: str  # the adapter or model directory
    base_note: str
    skipped: list[dict[str, str]] = field(default_factory=list)


def module_type(name: str) -> str:
    """q/k/v/o/gate/up/down for Llama-style names; otherwise the module's own last name."""
    last = name.rsplit(".", 1)[-1]
    return MODULE_TYPES.get(last, last)


def layer_index(name: str) -> int | None:
    """Depth of a module from the first integer in its path (model.layers.7.mlp.up_proj -> 7)."""
    match = re.search(r"\.(\d+)(\.|$)", name)
    return int(match.group(1)) if match else None


def type_key(t: str) -> tuple[int, str]:
    """Sort key of a module type: Llama's order (TYPE_ORDER) first, then any other type by name."""
    return (TYPE_ORDER.index(t) if t in TYPE_ORDER else len(TYPE_ORDER), t)


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: a key matches a module path suffix (regex allowed)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _adapter_updates(weights: Weights, adapter_dir: Path) -> tuple[list[LayerUpdate], list[dict]]:
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"{adapter_dir} is a {cfg.get('peft_type')} adapter: only the LoRA family "
            "(LoRA, rsLoRA, DoRA, QLoRA) can be analysed"
        )
    file = adapter_dir / "adapter_model.safetensors"
    if not file.exists():
        raise UserError(f"{adapter_dir} has no adapter_model.safetensors (adaptlab reads safetensors only)")
    tensors = load_file(str(file))
    alpha = float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    skipped = [
        {"name": k.removeprefix(PEFT_PREFIX).split(".lora_embedding")[0], "reason": "embedding LoRA"}
        for k in tensors
        if ".lora_embedding_A" in k
    ]
    names = sorted(
        k.removeprefix(PEFT_PREFIX)[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")
    )
    if not names:
        raise UserError(f"{adapter_dir} holds no LoRA Linear weights (lora_A/lora_B)")
    updates = []
    for name in names:
        key = PEFT_PREFIX + name
        a = tensors[key + ".lora_A.weight"].float()  # (r, in)
        b = tensors[key + ".lora_B.weight"].float()  # (out, r)
        if name not in weights.shapes:
            near = ", ".join(n for n in list(weights.shapes)[:4])
            raise UserError(
                f"adapter {adapter_dir} does not fit base {weights.label!r}: the base has no module {name} "
                f"(it has e.g. {near})"
            )
        shape = weights.shapes[name]
        want = (b.shape[0], a.shape[1])
        if shape != (want[::-1] if fan_in_fan_out else want):
            raise UserError(
                f"adapter {adapter_dir} does not fit base {weights.label!r}: {name} is {list(want)} "
                f"(out, in) in the adapter but {list(shape)} in the base"
            )
        w0 = weights.get(name)
        w0 = w0.T.contiguous() if fan_in_fan_out else w0  # (out, in)
        r = a.shape[0]
        lora_alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, name, alpha))
        scaling = lora_alpha / math.sqrt(r) if rslora else lora_alpha / r
        dw = scaling * (b @ a)  # (out, in)
        magnitude = tensors.get(
            key + ".lora_magnitude_vector", tensors.get(key + ".lora_magnitude_vector.weight")
        )
        if magnitude is not None:
            # DoRA (peft): W' = m * (W0 + s BA) / ||W0 + s BA||, the norm taken per output row.
            merged = w0 + dw
            merged = (magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
            dw = merged - w0
        updates.append(LayerUpdate(name, w0, dw))
    return updates, skipped


def _model_updates(weights: Weights, model_dir: Path) -> tuple[list[LayerUpdate], list[dict]]:
    tuned = SafetensorsWeights(model_dir, str(model_dir))
    linear = hf_linear_modules(model_dir)
    if linear is None:  # unknown architecture: every 2-D weight except embeddings and the head
        skip = ("embed", "wte", "wpe", "lm_head")
        linear = {n: False for n, s in tuned.shapes.items() if len(s) == 2 and not any(x in n for x in skip)}
    names = [n for n in linear if n in tuned.shapes]
    missing = [n for n in names if n not in weights.shapes]
    if missing or not names:
        raise UserError(
            f"{model_dir} does not fit base {weights.label!r}: "
            + (
                f"the base has no module {missing[0]} ({len(missing)} missing)"
                if missing
                else "no Linear weights"
            )
        )
    updates = []
    for name in names:
        if tuned.shapes[name] != weights.shapes[name]:
            raise UserError(
                f"{model_dir} does not fit base {weights.label!r}: {name} is {list(tuned.shapes[name])} "
                f"in the tuned model but {list(weights.shapes[name])} in the base"
            )
        w0, w1 = weights.get(name), tuned.get(name)
        if linear[name]:
            w0, w1 = w0.T.contiguous(), w1.T.contiguous()
        updates.append(LayerUpdate(name, w0, w1 - w0))
    return updates, []


def layer_updates(base: str | LoadedModel | Any | None, tuned_path: str | Path) -> UpdateSet:
    """W0 and dW of every adapted Linear layer, through one code path for adapters and full models.

    base: a model spec (embedded name, HF dir, hub id), a LoadedModel or a model; None means the base
    recorded by the run or adapter. A QLoRA adapter is measured against this base (dequantized when it
    is a 4-bit model).
    """
    ref = resolve(tuned_path)
    if base is None:
        base = ref.base_model
        if not base:
            raise UserError(f"{ref.path} does not record its base model: pass it with --base")
    weights = base_weights(base)
    if ref.kind == "adapter":
        layers, skipped = _adapter_updates(weights, ref.path)
    else:
        layers, skipped = _model_updates(weights, ref.path)
    method = ref.method or ref.kind
    notes = [f"W0 read from {weights.label}"]
    if weights.dequantized:
        notes.append("dequantized from its 4-bit/8-bit layers")
    if weights.label == "smollm2-135m":
        notes.append("SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF, not the original bf16 weights")
    if method == "qlora":
        notes.append(
            "QLoRA: dW is the adapter's update alone; the 4-bit base it trained on differs from this W0 "
            "by quantization error, which is not counted in dW"
        )
    recorded = ref.base_model
    if isinstance(base, str) and recorded and recorded != base and _same_base(recorded, base) is False:
        notes.append(f"the tuned artifact records base {recorded!r}")
    return UpdateSet(layers, ref.kind, method, weights.label, str(ref.path), "; ".join(notes), skipped)


def _same_base(a: str, b: str) -> bool | None:
    """Whether two base specs name the same local model; None when that cannot be told offline."""
    try:
        pa = local_dir(a) if a in EMBEDDED_MODELS or Path(a).expanduser().is_dir() else None
        pb = local_dir(b) if b in EMBEDDED_MODELS or Path(b).expanduser().is_dir() else None
    except UserError:
        return None
    if pa is None or pb is None:
        return None
    return pa.resolve() == pb.resolve()
