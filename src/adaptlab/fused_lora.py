"""Fused LoRA Linear: the frozen base matmul and the adapter in one autograd function, fewer passes.

PEFT's LoRA Linear computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate ops: B's
output (tokens x out) is written, scaled into a new tensor and added into a third; in backward the
gradient is scaled into a new tensor and A's input gradient (tokens x in) is written and then added to
the base's. At rank 16 the adapter's matmuls are small and these passes over (tokens x out) and
(tokens x in) tensors are most of its cost: about 2 s of a smollm2-135m LoRA step at 4 x 256 tokens on
a 2-core CPU, where the whole step is 8.8 s.

`LoRALinear` does the same arithmetic with accumulating matmuls: forward `y = x W^T + b`, then
`y += scaling * (x A^T) B^T` in place (addmm); backward scales the (tokens x rank) gradient of A's
output instead of the (tokens x out) one, and adds A's input gradient into the base's with addmm. In
fp32 it saves what PEFT's modules save (x, A's output; the weights are parameters). Under autocast it
saves the uncast x and weights and casts them again in backward, where PEFT's modules keep their bf16
casts: the frozen base's bf16 copy (2 bytes a parameter) is not held between forward and backward.
Results equal PEFT's up to the rounding of the fused accumulation (fp32: within 1e-6 relative, tested).

`fuse_loras` swaps the forward of each PEFT `lora.Linear` over a plain nn.Linear; at each call the
fused path runs only for vanilla LoRA (any rank, rsLoRA's scaling included) with one active adapter,
no dropout, no bias on B, adapters enabled and unmerged, and no per-call adapter names. Anything else
(DoRA, dropout, a 4-bit base, a disabled adapter as in DPO's reference pass, mixed-adapter batches) takes
PEFT's own forward. Parameter names, adapter files and every PEFT API are unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(torch.autograd.Function):
    """y = x W^T + b + scaling * (x A^T) B^T with W and b frozen; gradients for x, A and B.

    With `dtype` (autocast's), x, W, b, A and B are cast to it for the matmuls, as autocast would cast
    them, but the uncast tensors are what is saved: backward casts them again. A frozen weight's cast
    is then not held from forward to backward (2 bytes a base parameter under bf16), and an input the
    block rebuilds in backward (a norm's output, adaptlab.fused_norm) is not held at all. Gradients come
    back in each input's own dtype, as the casts' backward would return them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        xc, wc, bc, ac, bbc = _cast((x, weight, bias, lora_a, lora_b), dtype)
        flat = xc.reshape(-1, xc.shape[-1])
        down = flat @ ac.t()  # (N, r)
        y = F.linear(flat, wc, bc)
        y.addmm_(down, bbc.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, down)
        ctx.scaling, ctx.dtype = scaling, dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        *saved, down = ctx.saved_tensors
        x, weight, lora_a, lora_b = _cast(tuple(saved), ctx.dtype)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_down = (g @ lora_b).mul_(ctx.scaling)  # (N, r): the scaling lands on the small tensor
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(grad_down, lora_a).view_as(x).to(saved[0].dtype)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_down.t() @ flat).to(saved[2].dtype)
        if ctx.needs_input_grad[4]:
            grad_b = (g.t() @ down).mul_(ctx.scaling).to(saved[3].dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def _cast(tensors: tuple[torch.Tensor | None, ...], dtype: torch.dtype | None) -> tuple[Any, ...]:
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT lora.Linear's forward through `LoRALinear` when it is vanilla LoRA; PEFT's own otherwise."""
    adapter = _vanilla_adapter(self) if not args and not kwargs else None
    if adapter is None:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    tensors = (x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight)
    kind = x.device.type
    if torch.is_autocast_enabled(kind):  # the casts autocast would make, then the fused ops in that dtype
        with torch.autocast(kind, enabled=False):
            return LoRALinear.apply(*tensors, self.scaling[adapter], torch.get_autocast_dtype(kind))
    return LoRALinear.apply(*tensors, self.scaling[adapter])


def _vanilla_adapter(module: Any) -> str | None:
    """The one active adapter's name when the fused path computes what PEFT would, else None."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    adapter = module.active_adapters[0]
    if adapter not in module.lora_A or adapter in getattr(module, "lora_variant", {}):
        return None
    if not isinstance(module.lora_dropout[adapter], nn.Identity) or module.lora_B[adapter].bias is not None:
        return None
    a, b, w = module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.base_layer.weight
    if w.requires_grad or (module.base_layer.bias is not None and module.base_layer.bias.requires_grad):
        return None
    return adapter if a.dtype == b.dtype == w.dtype else None


def is_fusable(module: nn.Module) -> bool:
    """A PEFT LoRA Linear over a plain nn.Linear (not 4-bit, not a Conv or Embedding adapter)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinearModule
    except ImportError:
        return False
    return isinstance(module, LoraLinearModule) and type(module.base_layer) is nn.Linear


def fuse_loras(model: nn.Module) -> int:
    """Give every PEFT LoRA Linear over a plain nn.Linear the fused forward, in place; the number fused."""
    fused = 0
    for module in model.modules():
        if is_fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
