"""The 4-bit base of QLoRA: NF4, blockwise 64, double quantization (Dettmers et al. 2023).

`quantize_base` swaps every Linear of a loaded model (not lm_head, not the embeddings) for a
bitsandbytes `Linear4bit` in place, the way transformers' bitsandbytes integration does, so peft
puts its 4-bit LoRA layers on top and the training loop is unchanged. The backend is chosen once,
here (`backend()`), and recorded in summary.json as `quantization`; quantization is deterministic,
so the same base quantized again gives the same 4-bit weights an adapter was trained on.

bitsandbytes keeps a 4-bit weight in one of two layouts: the original one (packed nibbles in
quantization order, absmax double-quantized) and, on CPUs with avx512_bf16, a layout it repacks
into on the first inference forward for its fused kernel (`_convert_weight_packed_for_cpu`: nibbles
regrouped per 32 output rows, absmax in bf16, activations in bf16). adaptlab keeps every weight it
quantizes in the original layout (`keep_canonical_layout`), so the 4-bit matmul is dequantize then
fp32 matmul on every CPU and a result does not depend on which machine ran it; `dequantize_weight`
reads either layout, and a module already repacked is turned back (exactly: the repacked absmax is
kept, as bf16 values in fp32). `quiet_bitsandbytes` drops the line bitsandbytes logs on such CPUs
when its optional `kernels` package is missing (the fused kernel is not used here anyway).

    python -c "from adaptlab.models import load_model; from adaptlab.quantize import *; \
m = quantize_base(load_model('tiny-random').model); print(quantization_info(m))"
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from adaptlab.errors import UserError

QUANT_TYPE = "nf4"
BLOCKSIZE = 64
DOUBLE_QUANT = True
# bitsandbytes logs this on avx512_bf16 CPUs without its optional `kernels` package, once per process
# (logger, start of the line) that bitsandbytes' import leaves when it cannot fetch its CPU kernel
_KERNELS_LINES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    # `kernels` (a transformers dependency) offline, on the same fetch
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/"),
)


class _DropKernelsLine(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_bitsandbytes() -> None:
    """Drop the warnings bitsandbytes' import leaves when it cannot fetch its CPU 4-bit kernel from the Hub
    ('Failed to load CPU gemm_4bit_forward', and offline the `kernels` package's 'Skipping publisher trust
    check'); idempotent, before or after import.

    They name a fused kernel adaptlab does not use (see keep_canonical_layout), and would otherwise land in
    every QLoRA command's output, one-line errors included.
    """
    for name, start in _KERNELS_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKernelsLine) for f in logger.filters):
            logger.addFilter(_DropKernelsLine(start))


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
    quiet_bitsandbytes()
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

    The model may be loaded in its checkpoint's dtype (`load_model(..., dtype=STORED)`): each Linear is
    quantized from its weight's exact fp32 value, one at a time, and every other tensor ends in fp32, so
    the result is the same as from an fp32 load while a bf16 checkpoint never exists in fp32 whole.

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
    keep_canonical_layout(model)
    _own_memory(model)
    model.is_loaded_in_4bit = True  # peft reads this to wrap Linear4bit with its 4-bit LoRA layer
    model.adaptlab_quantization = QuantSettings(
        backend=name, version=version, compute_dtype=str(compute_dtype).removeprefix("torch.")
    )
    return model


def _own_memory(model: nn.Module) -> None:
    """Copy the tensors left in full precision (embeddings, norms) out of the checkpoint's memory map,
    in fp32 (the master dtype) whatever dtype the checkpoint was loaded in.

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
                dtype = torch.float32 if tensor.is_floating_point() else tensor.dtype
                tensor.data = tensor.data.to(dtype, copy=True)
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


def is_cpu_packed(module: nn.Module) -> bool:
    """Whether a Linear4bit's weight is in bitsandbytes' avx512 CPU-kernel layout."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _unpack_cpu_layout(data: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """(4-bit data, QuantState) in the original layout for a weight in the CPU-kernel layout; inputs untouched.

    The nibble order is undone by bitsandbytes' own inverse, run on a copy of the state with its
    re-quantization of absmax turned off: absmax stays the bf16 values the repacked weight holds (the
    originals are gone), now as fp32 and not double-quantized, so the result dequantizes to exactly
    the weight the repacked module holds.
    """
    from bitsandbytes.functional import QuantState, _convert_weight_packed_for_cpu_inverse

    scratch = copy.copy(state)
    scratch.original_nested = False
    qweight, scratch = _convert_weight_packed_for_cpu_inverse(data, scratch)
    absmax = state.absmax.T.reshape(-1).to(torch.float32)  # stored (in / blocksize, out) in bf16
    canonical = QuantState(
        absmax=absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.original_dtype,
    )
    return qweight, canonical


def _canonical(module: nn.Module) -> tuple[torch.Tensor, Any]:
    w = module.weight
    if is_cpu_packed(module):
        return _unpack_cpu_layout(w.data, w.quant_state)
    return w.data, w.quant_state


def keep_canonical_layout(model: nn.Module) -> int:
    """Put every Linear4bit in the original 4-bit layout and keep it there; return how many were repacked.

    bitsandbytes repacks a weight for its avx512_bf16 kernel on the first inference forward on such a
    CPU; that kernel runs in bf16 (logits ~4e-3 off dequantize-then-matmul on tiny-random) and
    anything reading the weight afterwards must know the second layout. Turning the repacking off
    makes every CPU compute the same numbers.
    """
    import bitsandbytes as bnb

    repacked = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        if is_cpu_packed(module):
            module.weight.data, state = _canonical(module)
            module.weight.quant_state = state
            module.quant_state = state
            repacked += 1
    return repacked


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight a 4-bit Linear computes with (out, in), from either layout; a plain Linear's own weight."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        data, state = _canonical(module)
        return bnb.functional.dequantize_4bit(data, state).to(torch.float32)
    return module.weight.detach().to(torch.float32)


def _base_name(name: str) -> str:
    """A module path inside a PeftModel as it is in the bare base model."""
    name = name.removeprefix("base_model.model.")
    return name.removesuffix(".base_layer")


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Dequantized base weight of every 4-bit Linear, by base-model module name (`...q_proj`).

    The base a QLoRA adapter was trained on, weight by weight (either layout).
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
