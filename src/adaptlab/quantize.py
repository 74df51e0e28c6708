"""The 4-bit base of QLoRA: NF4, blockwise 64, double quantization (Dettmers et al. 2023).

`quantize_base` swaps every Linear of a loaded model (not lm_head, not the embeddings) for a
bitsandbytes `Linear4bit` in place, the way transformers' bitsandbytes integration does, so peft
puts its 4-bit LoRA layers on top and the training loop is unchanged. The backend is chosen once,
here (`backend()`), and recorded in summary.json as `quantization`; quantization is deterministic,
so the same base quantized again gives the same 4-bit weights an adapter was trained on.

Merging a QLoRA adapter has two honest targets (`merge_qlora`): the original full-precision base
(what the adapter never saw) or the dequantized base it was trained on, optionally re-quantized to
NF4; `merge_cost` measures the logit and NLL difference against the unmerged model.

    python -c "from adaptlab.models import load_model; from adaptlab.quantize import *; \
m = quantize_base(load_model('tiny-random').model); print(quantization_info(m))"
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adaptlab.errors import UserError

QUANT_TYPE = "nf4"
BLOCKSIZE = 64
DOUBLE_QUANT = True
MergeTarget = Literal["full", "dequantized"]
MERGE_TARGETS = ("full", "dequantized")


@dataclass(frozen=True)
class QuantSettings:
    """What the base was quantized with: written to summary.json as `quantization`."""

    backend: str
    version: str
    quant_type: str = QUANT_TYPE
    double_quant: bool = DOUBLE_QUANT
    blocksize: int = BLOCKSIZE
    compute_dtype: str = "float32"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def backend() -> tuple[str, str]:
    """(name, version) of the 4-bit backend: bitsandbytes, whose NF4 path runs on CPU and CUDA."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
    except Exception as err:  # an import-time failure of a native library is not always ImportError
        raise UserError(
            f"--method qlora needs bitsandbytes ({type(err).__name__} on import): "
            "run `pip install 'bitsandbytes>=0.45'`, or choose --method lora"
        ) from err
    if not hasattr(bnb.nn, "Linear4bit"):
        raise UserError(
            f"bitsandbytes {bnb.__version__} has no 4-bit layers: run `pip install -U 'bitsandbytes>=0.45'`"
        )
    return "bitsandbytes", str(bnb.__version__)


def _base_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of every plain Linear to quantize: not the head, not adapter layers."""
    out = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and not full.endswith("lm_head") and "lora_" not in full:
                out.append((module, child_name, child))
    return out


def quantize_base(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace the model's Linear layers (not lm_head) by NF4 Linear4bit in place; return the model.

    compute_dtype is what each 4-bit weight is dequantized to for its matmul; under bf16 autocast the
    matmul itself runs in bf16 whatever it is, so fp32 (the master-weight dtype) is the default.
    """
    name, version = backend()
    import bitsandbytes as bnb

    linears = _base_linears(model)
    if not linears:
        raise UserError("--method qlora: the model has no Linear layers to quantize (only lm_head)")
    for parent, attr, linear in linears:
        device = linear.weight.device
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=DOUBLE_QUANT,
            quant_type=QUANT_TYPE,
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            linear.weight.data.detach().to(torch.float32).contiguous(),
            requires_grad=False,
            blocksize=BLOCKSIZE,
            compress_statistics=DOUBLE_QUANT,
            quant_type=QUANT_TYPE,
            module=q,
        ).to(device)  # Params4bit quantizes on its first move to a device
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
        q.compute_type_is_set = True  # keep the chosen compute dtype (no per-input guess and warning)
        q.train(linear.training)
        setattr(parent, attr, q)
    for p in model.parameters():
        p.requires_grad_(False)
    _own_memory(model)
    model.is_loaded_in_4bit = True  # peft reads this to wrap Linear4bit with its 4-bit LoRA layer
    model.adaptlab_quantization = QuantSettings(
        backend=name, version=version, compute_dtype=str(compute_dtype).removeprefix("torch.")
    )
    return model


def _own_memory(model: nn.Module) -> None:
    """Copy the tensors left in full precision (embeddings, norms) out of the checkpoint's memory map.

    transformers leaves a loaded model's weights as views of the memory-mapped safetensors file, and
    quantizing reads every page of it: while any tensor still views the map, those pages (the fp32
    Linear weights, now dead) stay resident and count in the process's RSS, so a 4-bit base would
    cost more memory than the fp32 one. Once nothing views the map, it is unmapped; the heap the
    quantization's temporaries fragmented is then handed back to the system where glibc allows.
    """
    import bitsandbytes as bnb

    seen: set[int] = set()  # tied weights (embeddings and head) are one tensor: copy it once
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            continue
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if tensor.device.type == "cpu" and id(tensor) not in seen:
                seen.add(id(tensor))
                tensor.data = tensor.data.clone()
    _trim_heap()


def _trim_heap() -> None:
    """Return the heap's free pages to the system (glibc malloc_trim); a no-op elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def quantization_info(model: nn.Module) -> dict[str, Any] | None:
    """The QuantSettings of a model made by quantize_base (also through a PeftModel), as a dict."""
    for m in (
        model,
        getattr(model, "base_model", None),
        getattr(getattr(model, "base_model", None), "model", None),
    ):
        settings = getattr(m, "adaptlab_quantization", None)
        if settings is not None:
            return settings.as_dict()
    return None


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight a 4-bit Linear computes with (out, in); a plain Linear's own weight."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        w = module.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)
    return module.weight.detach().to(torch.float32)


def _base_name(name: str) -> str:
    """A module path inside a PeftModel as it is in the bare base model."""
    name = name.removeprefix("base_model.model.")
    return name.removesuffix(".base_layer")


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dequantized base weight of every 4-bit Linear, by base-model module name (`...q_proj`).

    What analysis measures a QLoRA adapter's delta against: the base it was trained on.
    """
    import bitsandbytes as bnb

    return {
        _base_name(name): dequantize_weight(m)
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def quantization_error(model: nn.Module) -> dict[str, Any]:
    """NF4 round-trip error of every Linear (not lm_head): relative Frobenius error per module and overall.

    Quantizes a copy of each weight, so the model is left as it is.
    """
    import bitsandbytes.functional as bf

    per_module: dict[str, float] = {}
    err_sq = ref_sq = 0.0
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name.endswith("lm_head"):
            continue
        w = module.weight.detach().to(torch.float32).contiguous()
        q, state = bf.quantize_4bit(
            w, blocksize=BLOCKSIZE, compress_statistics=DOUBLE_QUANT, quant_type=QUANT_TYPE
        )
        diff = bf.dequantize_4bit(q, state).to(torch.float32) - w
        e, r = float(diff.pow(2).sum()), float(w.pow(2).sum())
        per_module[name] = (e / r) ** 0.5 if r > 0 else 0.0
        err_sq, ref_sq = err_sq + e, ref_sq + r
    values = sorted(per_module.values())
    return {
        "relative_error": (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else 0.0,
        "max_module_error": values[-1] if values else 0.0,
        "median_module_error": values[len(values) // 2] if values else 0.0,
        "modules": per_module,
    }


def dequantize_in_place(model: nn.Module) -> nn.Module:
    """Replace every Linear4bit by a plain fp32 Linear holding its dequantized weight."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight = nn.Parameter(dequantize_weight(child), requires_grad=False)
                if child.bias is not None:
                    plain.bias = nn.Parameter(child.bias.detach().to(torch.float32), requires_grad=False)
                setattr(module, child_name, plain)
    for attr in ("is_loaded_in_4bit", "adaptlab_quantization"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def load_qlora(base_spec: str, adapter_dir: str | Path, device: str | torch.device = "cpu") -> Any:
    """The unmerged QLoRA model as trained: the base quantized as in training, the adapter on top."""
    from adaptlab.models import load_adapter, load_model

    base = load_model(base_spec)
    quantize_base(base.model)
    base.model.to(device)
    model = load_adapter(base, Path(adapter_dir))
    model.eval()
    return model


def merge_qlora(
    base_spec: str,
    adapter_dir: str | Path,
    into: MergeTarget = "dequantized",
    requantize: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Merge a QLoRA adapter into a plain model; return it and a report saying how.

    into="full": W0 + BA on the original full-precision base (the adapter never saw W0 itself).
    into="dequantized": dequant(NF4(W0)) + BA, the base the adapter was trained on; with
    requantize=True the merged weights are quantized to NF4 again (a 4-bit model, the same one that
    loading the fp32 merged weights with BitsAndBytesConfig(nf4, double quant) would give).
    """
    from adaptlab.models import load_adapter, load_model

    if into not in MERGE_TARGETS:
        raise UserError(f"merge into {into!r}: choose one of {', '.join(MERGE_TARGETS)}")
    if requantize and into != "dequantized":
        raise UserError("re-quantizing after a merge needs --into dequantized (the base the adapter saw)")
    base = load_model(base_spec)
    if into == "dequantized":
        quantize_base(base.model)
        dequantize_in_place(base.model)
    merged = load_adapter(base, Path(adapter_dir)).merge_and_unload()
    if requantize:
        quantize_base(merged)
    merged.eval()
    report: dict[str, Any] = {
        "into": into,
        "requantized": requantize,
        "base_model": base_spec,
        "adapter": str(adapter_dir),
        "quantization": QuantSettings(*backend()).as_dict(),
        "description": {
            "full": "adapter merged into the original full-precision base (not the 4-bit base it was trained on)",
            "dequantized": "adapter merged into the dequantized 4-bit base it was trained on"
            + (", then re-quantized to NF4" if requantize else ", kept in full precision"),
        }[into],
    }
    return merged, report


@torch.inference_mode()
def merge_cost(
    unmerged: nn.Module, merged: nn.Module, batches: list[dict[str, torch.Tensor]]
) -> dict[str, Any]:
    """Logit and NLL difference between the unmerged and merged models on the same token batches.

    Each batch holds input_ids, attention_mask and labels (-100 where not scored), as `collate` makes.
    """
    if not batches:
        raise UserError("merge cost: no text to compare on")
    max_diff, abs_sum, n_logits = 0.0, 0.0, 0
    nll = {"unmerged": 0.0, "merged": 0.0}
    tokens = 0
    for batch in batches:
        labels = batch["labels"][:, 1:]  # (B, T-1)
        keep = labels != -100
        outs = {}
        for key, model in (("unmerged", unmerged), ("merged", merged)):
            logits = (
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                .logits[:, :-1]
                .float()
            )  # (B, T-1, vocab)
            outs[key] = logits
            nll[key] += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
        diff = (outs["unmerged"] - outs["merged"])[keep].abs()  # (N, vocab)
        max_diff = max(max_diff, float(diff.max())) if diff.numel() else max_diff
        abs_sum, n_logits = abs_sum + float(diff.sum()), n_logits + diff.numel()
        tokens += int(keep.sum())
    tokens = max(tokens, 1)
    return {
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": abs_sum / max(n_logits, 1),
        "nll_unmerged": nll["unmerged"] / tokens,
        "nll_merged": nll["merged"] / tokens,
        "nll_diff": (nll["merged"] - nll["unmerged"]) / tokens,
        "tokens": tokens,
    }
