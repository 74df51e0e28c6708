"""A Linear under autocast that keeps its uncast input and weight for backward, not their bf16 casts.

Under bf16 autocast a plain `nn.Linear` whose weight trains saves the bf16 cast of its weight (for the
input's gradient) and the bf16 cast of its input (for the weight's gradient) from forward to
backward. For full fine-tuning that is a bf16 copy of every block weight (2 bytes a parameter, 212 MB
on smollm2-135m) plus a cast of each Linear's input: q, k and v each keep their own cast of the same
norm output, gate and up theirs. `AutocastLinear` casts as autocast would, computes the same matmul,
and saves the uncast tensors, casting them again in backward: the weight is the fp32 parameter the
model holds anyway, and a norm's output is rebuilt in backward by the block (adaptlab.fused_norm).
Gradients come back in each input's own dtype, as the casts' backward would return them. The cost is
one more cast of each weight a step (6 bytes a parameter of memory traffic).

`fuse_autocast_linears` swaps the forward of every plain `nn.Linear` with a trainable weight inside the
model's decoder layers (full fine-tuning's; a LoRA's frozen base is the fused LoRA Linear's to cast); outside autocast, without autograd, or under torch.compile it is the plain
forward. Training leaves it off under FSDP2, which frees gathered weights between forward and backward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class AutocastLinear(torch.autograd.Function):
    """F.linear in `dtype` over x, weight and bias cast to it; saves them uncast."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dtype, ctx.has_bias = dtype, bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.to(ctx.dtype)).view(*x.shape[:-1], weight.shape[1]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ x.to(ctx.dtype).reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    kind = x.device.type
    if not (torch.is_autocast_enabled(kind) and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return F.linear(x, self.weight, self.bias)
    with torch.autocast(kind, enabled=False):
        return AutocastLinear.apply(x, self.weight, self.bias, torch.get_autocast_dtype(kind))


def fuse_autocast_linears(model: nn.Module) -> int:
    """Give every plain nn.Linear with a trainable weight in a decoder layer the saving forward; the number."""
    fused = 0
    for layer in model.modules():
        if not hasattr(layer, "self_attn"):  # a decoder layer: not the head, which the loss applies itself
            continue
        for name, module in layer.named_modules():
            # a LoRA's A and B are the fused LoRA Linear's (or PEFT's, for the variants it leaves alone)
            if type(module) is nn.Linear and module.weight.requires_grad and "lora_" not in name:
                module.forward = types.MethodType(_forward, module)
                fused += 1
    return fused
