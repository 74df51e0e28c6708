"""Under bf16 autocast, frozen Linear weights are held in bf16: the values their matmuls read anyway.

Autocast casts an fp32 weight to bf16 at every Linear call, and a frozen weight's cast is never kept
across steps: the plain loop casts each frozen base weight once a forward (and keeps the cast until
backward), adaptlab's fused Linears cast it in forward and again in backward (adaptlab.fused_lora).
Those casts are a pass over every base weight, twice a step; on smollm2-135m's 106M Linear
parameters, 0.1-0.4 s of a 3 s LoRA step on a 2-core CPU. A frozen weight never changes, so its cast
is the same tensor every time: holding it in bf16 from the start gives every matmul the same operands
(round-to-nearest-even, as autocast rounds), removes the casts and halves the base's memory (2 bytes a
parameter instead of 4; 212 MB on smollm2-135m, 2 GB on a 1B model).

On a CPU the fp32 weights of a checkpoint stored in fp32 are pages of its memory-mapped file, and the
map stays open while any tensor views it: converting the Linears alone would add their bf16 copies to
resident memory and free nothing. So once any weight is converted, the model's other frozen tensors
(the embeddings, norms, buffers) are copied into memory of their own and the map closes: on
smollm2-135m, a LoRA step's peak RSS 2045 -> 1799 MB (bench/train_step.py, docs/benchmarks.md).

LoRA at bf16 loads a checkpoint stored in bf16 as it is stored (`load_held`): the Linears keep the stored
values (what loading in fp32 and holding them would give), everything else is widened to fp32 exactly,
and PEFT creates the adapters in fp32 over the bf16 base (`adapters_in_fp32`; PEFT would otherwise cast
their initial values to the base's dtype). So the base is never whole in fp32, not even while loading:
on a 1B model the load's peak drops from 6.4 GB (fp32 model + the file's pages) to the bf16 weights.

Only weights nothing else reads at full precision are held this way: a frozen plain nn.Linear's, not
one tied to the input embeddings (the embedding lookup reads it in fp32), not DoRA's base (its
magnitude is normalised by the fp32 row norms of W + scaling * B A) and not a trained one. Biases
stay fp32 (autocast casts them with the weight). A held Linear called outside autocast (an API user
running the model without it) widens its weight to the input's dtype for that call: the bf16 values in
fp32, not a dtype error. Adapters and the run's artifacts are unchanged:
adaptlab saves only what trains, and every later use of a run (evaluate, merge, export, serve) loads
the base from its checkpoint again.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def hold_frozen_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Convert, in place, every frozen, untied plain nn.Linear weight to `dtype`; the number converted.

    Meant for models whose forwards run under autocast to `dtype` (training at --precision bf16). Each
    held Linear (converted here, or loaded in `dtype` by `load_held`) gets a forward that widens its
    weight to the input's dtype when it is called outside autocast.
    """
    shared = _embedding_weights(model) | _dora_bases(model)
    converted = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        weight = module.weight
        if weight.requires_grad or id(weight) in shared or not weight.is_floating_point():
            continue
        if weight.dtype != dtype:
            weight.data = weight.data.to(dtype)
            converted += 1
        module.forward = types.MethodType(_held_forward, module)
    if converted and next(model.parameters()).device.type == "cpu":
        _own_frozen_tensors(model, dtype)
    return converted


def _held_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's forward over a held weight: under autocast as it is (autocast reads the held values);
    outside autocast the weight widened to x's dtype, as the fp32 base with these values would compute."""
    weight = self.weight
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)
    return F.linear(x, weight, self.bias)


def load_held(spec: str, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> Any:
    """The base for LoRA at bf16 (adaptlab.models.LoadedModel): loaded in its checkpoint's own dtype, the
    untied Linear weights kept there when it is `dtype`, every other floating tensor widened to fp32.

    Equal, tensor for tensor, to loading in fp32 and then `hold_frozen_linears` (a bf16 value widens to
    fp32 and rounds back to itself); a checkpoint stored in another dtype is widened whole, as an fp32 load.
    """
    from adaptlab.models import STORED, load_model

    loaded = load_model(spec, dtype=STORED, device=device)
    model = loaded.model
    keep = {
        id(m.weight)
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.dtype == dtype and id(m.weight) not in _embedding_weights(model)
    }
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.float32 and id(p) not in keep:
            p.data = p.data.float()
    _replace_buffers(model, lambda b: b.float() if b.is_floating_point() else b)
    return loaded


@contextlib.contextmanager
def adapters_in_fp32() -> Iterator[None]:
    """Within the block PEFT creates LoRA adapters over a bf16 or fp16 base in fp32, as over an fp32 one.

    PEFT initialises an adapter in fp32, then casts it to its base layer's dtype (and, with its default
    autocast_adapter_dtype, back to fp32): the initial values would be rounded to the base's dtype.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = BaseTunerLayer._get_base_layer_device_and_dtype

    def fp32_for_half(self: Any, base_layer: nn.Module) -> tuple[Any, Any]:
        device, dtype = original(self, base_layer)
        return device, torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype

    BaseTunerLayer._get_base_layer_device_and_dtype = fp32_for_half  # type: ignore[method-assign]
    try:
        yield
    finally:
        BaseTunerLayer._get_base_layer_device_and_dtype = original  # type: ignore[method-assign]


def _own_frozen_tensors(model: nn.Module, held_dtype: torch.dtype) -> None:
    """Copy every frozen parameter and buffer not converted into memory of its own, so that no tensor
    views a memory-mapped checkpoint any more (trained ones were created or copied in memory already)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != held_dtype:
            p.data = p.data.clone()
    _replace_buffers(model, torch.Tensor.clone)


def _replace_buffers(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Every buffer of the model replaced by fn(buffer), in place (persistence unchanged)."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = fn(buffer)


def _embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def _dora_bases(model: nn.Module) -> set[int]:
    """Weights of the Linears under a DoRA adapter (PEFT's lora_magnitude_vector holds one entry each)."""
    out: set[int] = set()
    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        base = getattr(module, "base_layer", None)
        if magnitudes is not None and len(magnitudes) > 0 and isinstance(base, nn.Linear):
            out.add(id(base.weight))
    return out
