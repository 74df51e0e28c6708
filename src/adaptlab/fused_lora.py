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

With LoRA dropout, A reads dropout(x) while the base reads x. The mask is drawn as torch's own dropout
draws it (on a CPU a bernoulli noise tensor, on CUDA the fused kernel) on x cast to A's dtype, as PEFT
casts it, so a run takes the same random numbers, the same mask and the same dropped values as PEFT's.
The function keeps the mask as bool (1 byte an element) and rebuilds dropout(x) from x in backward,
where PEFT's modules keep dropout(x) itself.

QLoRA's base is a bitsandbytes 4-bit Linear: its weight is dequantized for the forward matmul and again
in backward, as bitsandbytes' own matmul does, straight to the matmul dtype (bitsandbytes computes in
fp32 and rounds once, so the values are the same as dequantizing to fp32 and casting). PEFT's QLoRA
module dequantizes to fp32 and lets autocast cast the result, then runs the adapter as separate passes.

DoRA (`DoRALinear`) is the same fused Linear with its output rescaled per output feature by
magnitude / row norm of W + scaling * B A, the norm a constant to autograd as in PEFT. PEFT's DoRA
module rebuilds that (out x in) sum twice a forward (once through an identity matmul), runs the base
and the adapter as separate passes and keeps several (tokens x out) tensors for backward; the fused
one forms the sum once, in fp32, and keeps one.

`fuse_loras` swaps the forward of each PEFT LoRA Linear over a plain nn.Linear or a bitsandbytes
Linear4bit; at each call the fused path runs only for vanilla LoRA (any rank, rsLoRA's scaling
included, with or without dropout) or DoRA without dropout over a plain Linear, with one active adapter,
no bias on B, adapters enabled and unmerged, and no per-call adapter names. Anything else (DoRA's
dropout, which PEFT applies to the base's input too, a disabled adapter as in
DPO's reference pass, mixed-adapter batches) takes PEFT's own forward. Parameter names, adapter files
and every PEFT API are unchanged.
"""

from __future__ import annotations

import copy
import sys
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
    back in each input's own dtype, as the casts' backward would return them. With `quant_state` W is a
    bitsandbytes 4-bit weight, dequantized to `dtype` (required then) in forward and in backward.
    With `dropout` p > 0, A reads dropout(x) (`_dropout`), the base x.
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
        quant_state: Any = None,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        # PEFT casts A's input to A's dtype before its dropout (an fp32 draw for a bf16 x under autocast)
        dropped, mask = _dropout(x.to(lora_a.dtype), dropout) if dropout > 0 else (None, None)
        y, down = _fused_matmuls(x, weight, bias, lora_a, lora_b, scaling, dtype, quant_state, dropped)
        del dropped  # rebuilt from x and the mask in backward
        ctx.save_for_backward(x, weight, lora_a, lora_b, down, mask)
        ctx.scaling, ctx.dtype, ctx.quant_state, ctx.dropout = scaling, dtype, quant_state, dropout
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        *saved, down, mask = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x, grad_a, grad_b = _input_and_adapter_grads(ctx, g, saved, down, ctx.quant_state, mask)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None


class DoRALinear(torch.autograd.Function):
    """DoRA: y = b + g * (x W^T + scaling * (x A^T) B^T), g = m / ||W + scaling * B A|| (row norms).

    The norm is a constant to autograd, as in DoRA's section 4.3 and PEFT: m gets the gradient
    sum_tokens(dy * z) / norm and the adapter gets LoRA's with dy scaled by g. One (tokens x out) tensor
    is saved, z = x W^T + scaling * (x A^T) B^T in the matmul dtype; PEFT's DoRA module keeps its base
    output, the adapter's output and fp32 products of both. The norm is computed in fp32 from the fp32
    weights (PEFT: from the adapter's product in the matmul dtype). Casts and saving follow LoRALinear.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        magnitude: torch.Tensor,
        scaling: float,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        full = torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scaling)  # (out, in)
        norm = torch.linalg.vector_norm(full, dim=1)
        del full
        gain = magnitude.float() / norm
        z, down = _fused_matmuls(x, weight, None, lora_a, lora_b, scaling, dtype)
        y = z * gain  # fp32, as PEFT sums its DoRA terms, then back to the matmul dtype as PEFT returns
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, weight, lora_a, lora_b, down, z, gain, norm)
        ctx.scaling, ctx.dtype, ctx.m_dtype = scaling, dtype, magnitude.dtype
        return y.to(z.dtype).view(*x.shape[:-1], z.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        *saved, down, z, gain, norm = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1]).float()
        grad_m = (dy * z).sum(0).div_(norm).to(ctx.m_dtype) if ctx.needs_input_grad[5] else None
        g = (dy * gain).to(z.dtype)  # the gradient of z
        del dy
        grad_x, grad_a, grad_b = _input_and_adapter_grads(ctx, g, saved, down)
        return grad_x, None, None, grad_a, grad_b, grad_m, None, None


def _fused_matmuls(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dtype: torch.dtype | None,
    quant_state: Any = None,
    dropped: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x W^T + b + scaling * (x' A^T) B^T, x' A^T) over the flattened tokens, in the matmul dtype;
    x' is `dropped` (dropout(x)) when given, else x."""
    xc, bc, ac, bbc = _cast((x, bias, lora_a, lora_b), dtype)
    wc = _dense(weight, quant_state, dtype)
    flat = xc.reshape(-1, xc.shape[-1])
    adapter_in = flat if dropped is None else _cast((dropped,), dtype)[0].reshape(flat.shape)
    down = adapter_in @ ac.t()  # (N, r)
    y = F.linear(flat, wc, bc)
    del wc  # a dequantized weight lives one matmul, not until backward
    y.addmm_(down, bbc.t(), alpha=scaling)
    return y, down


def _input_and_adapter_grads(
    ctx: Any,
    g: torch.Tensor,
    saved: list[torch.Tensor],
    down: torch.Tensor,
    quant_state: Any = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of x, A and B from g, the (N, out) gradient of the fused matmuls' output; x, W, A, B
    saved uncast (inputs 0, 1, 3 and 4 of the function) and cast again here; `mask` the dropout's
    kept elements when A read dropout(x) (rate ctx.dropout)."""
    x0, w0, a0, b0 = saved
    x, lora_a, lora_b = _cast((x0, a0, b0), ctx.dtype)
    weight = _dense(w0, quant_state, ctx.dtype)
    flat = x.reshape(-1, x.shape[-1])
    grad_down = (g @ lora_b).mul_(ctx.scaling)  # (N, r): the scaling lands on the small tensor
    grad_x = grad_a = grad_b = None
    keep = None if mask is None else _keep_scale(mask, a0.dtype, ctx.dropout)
    if ctx.needs_input_grad[0]:
        if keep is None:
            grad_x = (g @ weight).addmm_(grad_down, lora_a).view_as(x).to(x0.dtype)
        else:  # dropout's backward on A's input gradient, in A's dtype, then x's, as autograd runs it
            grad_x = (g @ weight).view_as(x).to(x0.dtype)
            grad_x += ((grad_down @ lora_a).view_as(x).to(a0.dtype) * keep).to(x0.dtype)
    if ctx.needs_input_grad[3]:
        dropped = None if keep is None else x0.to(a0.dtype) * keep  # forward's dropout(x), bit for bit
        adapter_in = flat if dropped is None else _cast((dropped,), ctx.dtype)[0].reshape(flat.shape)
        grad_a = (grad_down.t() @ adapter_in).to(a0.dtype)
    if ctx.needs_input_grad[4]:
        grad_b = (g.t() @ down).mul_(ctx.scaling).to(b0.dtype)
    return grad_x, grad_a, grad_b


def _dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x), kept mask as bool), drawn as F.dropout(x, p, training=True) draws them: the same
    random numbers from the same generator, so the mask is the one PEFT's nn.Dropout would take."""
    if x.device.type in ("cuda", "xpu"):  # where torch's dropout runs its fused kernel
        return torch.native_dropout(x, p, True)
    noise = torch.empty_like(x).bernoulli_(1 - p)  # at::dropout off CUDA: the same tensor, the same draw
    mask = noise.bool()
    return x * noise.div_(1 - p), mask


def _keep_scale(mask: torch.Tensor, dtype: torch.dtype, p: float) -> torch.Tensor:
    """The dropout's multiplier from its mask: 1 / (1 - p) where kept, 0 elsewhere (as `_dropout` made it)."""
    return mask.to(dtype).div_(1 - p)


def _dense(weight: torch.Tensor, quant_state: Any, dtype: torch.dtype | None) -> torch.Tensor:
    """The weight for the matmul: cast to dtype, or a 4-bit one dequantized straight to dtype."""
    if quant_state is None:
        return weight if dtype is None else weight.to(dtype)
    import bitsandbytes.functional as bnb_functional

    state = copy.copy(quant_state)  # the same codes and scales; only the output dtype differs
    state.dtype = dtype
    return bnb_functional.dequantize_4bit(weight, state)


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
    quant_state = getattr(base.weight, "quant_state", None)
    kind = x.device.type
    dropout = _dropout_rate(self.lora_dropout[adapter])
    if adapter in self.lora_variant:  # DoRA (_vanilla_adapter lets no other variant through)
        magnitude = self.lora_magnitude_vector[adapter].weight
        if not torch.is_autocast_enabled(kind):
            return DoRALinear.apply(*tensors, magnitude, self.scaling[adapter])
        with torch.autocast(kind, enabled=False):
            dtype = torch.get_autocast_dtype(kind)
            return DoRALinear.apply(*tensors, magnitude, self.scaling[adapter], dtype)
    if torch.is_autocast_enabled(kind):  # the casts autocast would make, then the fused ops in that dtype
        with torch.autocast(kind, enabled=False):
            dtype = torch.get_autocast_dtype(kind)
            return LoRALinear.apply(*tensors, self.scaling[adapter], dtype, quant_state, dropout)
    if x.dtype != tensors[3].dtype:  # PEFT would cast x, and its output back: its forward does that
        return type(self).forward(self, x)
    # a 4-bit base is dequantized to x's dtype, a base held in bf16 (frozen_base) widened to it
    same = quant_state is None and base.weight.dtype == x.dtype
    return LoRALinear.apply(*tensors, self.scaling[adapter], None if same else x.dtype, quant_state, dropout)


def _dropout_rate(module: nn.Module) -> float:
    """The rate PEFT's lora_dropout module applies now: nn.Dropout's p in training, else 0."""
    return float(module.p) if isinstance(module, nn.Dropout) and module.training else 0.0


def _vanilla_adapter(module: Any) -> str | None:
    """The one active adapter's name when the fused path computes what PEFT would, else None."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    adapter = module.active_adapters[0]
    if adapter not in module.lora_A or not _plain_or_dora(module, adapter):
        return None
    drop = module.lora_dropout[adapter]
    if type(drop) not in (nn.Identity, nn.Dropout) or module.lora_B[adapter].bias is not None:
        return None
    if not getattr(module, "cast_input_dtype_enabled", True):
        return None  # PEFT's disable_input_dtype_casting: A reads x in its own dtype
    if adapter in getattr(module, "lora_variant", {}) and _dropout_rate(drop) > 0:
        return None  # DoRA with dropout: PEFT computes its base output from dropout(x) too
    base = module.base_layer
    a, b, w = module.lora_A[adapter].weight, module.lora_B[adapter].weight, base.weight
    if w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if getattr(w, "quant_state", None) is not None:  # 4-bit: the dtype its matmul computes in
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            return None  # bitsandbytes' avx512 inference layout: its own kernel reads it
        compute = base.compute_dtype or w.quant_state.dtype
        return adapter if a.dtype == b.dtype == compute else None
    if a.dtype != b.dtype:
        return None
    autocast = _autocast_dtype(w)
    if w.dtype in (a.dtype, autocast):  # a base held in autocast's dtype (frozen_base): what it would cast
        return adapter
    # outside autocast a base held in half precision (never DoRA's) is widened to x's dtype (_fused_forward)
    held = autocast is None and w.dtype in (torch.bfloat16, torch.float16)
    return adapter if held and adapter not in getattr(module, "lora_variant", {}) else None


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast casts matmul operands to on t's device now, or None when it is off."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def _plain_or_dora(module: Any, adapter: str) -> bool:
    """Vanilla LoRA, or DoRA over a plain Linear (no transposed Conv1D weight)."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is None:
        return True
    from peft.tuners.lora.variants import DoraLinearVariant

    return (
        isinstance(variant, DoraLinearVariant)
        and type(module.base_layer) is nn.Linear
        and not module.fan_in_fan_out
        and adapter in module.lora_magnitude_vector
    )


def is_fusable(module: nn.Module) -> bool:
    """A PEFT LoRA Linear over a plain nn.Linear or a bitsandbytes 4-bit Linear (not a Conv or Embedding
    adapter, not 8-bit)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinearModule
    except ImportError:
        return False
    if isinstance(module, LoraLinearModule) and type(module.base_layer) is nn.Linear:
        return True
    bnb = sys.modules.get("bitsandbytes")  # not imported: no 4-bit module can exist
    if bnb is None:
        return False
    lora_4bit = getattr(sys.modules.get("peft.tuners.lora.bnb"), "Linear4bit", None)
    return (
        lora_4bit is not None
        and isinstance(module, lora_4bit)
        and type(module.base_layer) is bnb.nn.Linear4bit
    )


def fuse_loras(model: nn.Module) -> int:
    """Give every PEFT LoRA Linear over a plain nn.Linear the fused forward, in place; the number fused."""
    fused = 0
    for module in model.modules():
        if is_fusable(module):
            module.forward = types.MethodType(_fused_forward, module)
            fused += 1
    return fused
