"""Causal attention for bf16 training on a CPU: torch's flash forward, a backward of batched matmuls.

Under bf16 autocast on a CPU, torch's fused SDPA kernel (`_scaled_dot_product_flash_attention_for_cpu`)
is quick forward but slow backward: on smollm2-135m at 4 x 256 tokens its backward takes 2-3x its
forward and runs at about a third of the CPU's bf16 matmul rate (docs/benchmarks.md). Here the forward is that
kernel, which keeps only its output and the rows' log-sum-exp, and the backward recomputes the
probabilities from them with five batched matmuls and one elementwise pass compiled by torch.compile
(so the passes over the (heads x seq x seq) blocks are fused):

    P = exp(scale * Q K^T - lse)          (Q K^T in fp32)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)) * scale
    dQ = dS K,    dK = dS^T Q             (P and dS rounded to bf16 for the matmuls)

Against fp64 its gradients' errors are about the flash kernel's own: dq's a little larger, dk's and
dv's smaller (bench/attention.py; tested within 1.15x). Grouped-query attention stays grouped: the
query heads that share a key/value head are stacked as rows of one block, so K and V are never expanded
and their gradients come out summed per group.

`attention_forward` is registered with transformers' attention interface as "adaptlab_cpu" (with SDPA's
mask function, so padding and packing masks are built as for SDPA) and takes the fast path only where it
applies: a CPU, bf16 query, key and value (or bf16 autocast, whose cast it makes), autograd recording,
no mask (plain causal), no dropout, no softcap or position bias, equal query and key lengths of at least
`MIN_SEQ` tokens. Everything else (masks from packing or padding, decoding, fp32, CUDA, short rows) is
transformers' own SDPA call. `use_cpu_attention` switches a model to it when a C++ compiler is on PATH
(inductor needs one on a CPU); without one the model keeps SDPA. Under `--compile` the backward is traced
into each layer's graph instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from adaptlab.compiling import cpp_compiler_available

NAME = "adaptlab_cpu"
MIN_SEQ = 128  # shorter rows gain little from it (their attention is a small part of a step)
_compiled: Any = None
log = logging.getLogger(__name__)


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, n, d = q.shape
    h_kv = k.shape[1]
    rows = h // h_kv * n  # the query heads that share a key/value head, stacked: (b, h_kv, rows, d)
    q, out, grad_out = (t.reshape(b, h_kv, rows, d) for t in (q, out, grad_out))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril().repeat(h // h_kv, 1)
    p = torch.exp(scores - lse.reshape(b, h_kv, rows, 1)).masked_fill(~causal, 0.0)
    grad_v = torch.matmul(p.to(q.dtype).transpose(-1, -2), grad_out)
    grad_p = torch.matmul(grad_out, v.transpose(-1, -2)).float()
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    grad_s = (p * (grad_p - delta) * scale).to(q.dtype)
    grad_q = torch.matmul(grad_s, k).reshape(b, h, n, d)
    grad_k = torch.matmul(grad_s.transpose(-1, -2), q)
    return grad_q, grad_k, grad_v


def _compiled_backward(*args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_backward` compiled on first use; if inductor fails (a broken toolchain), `_backward` as it is,
    the same arithmetic unfused, for the rest of the process."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_backward)
    try:
        return _compiled(*args)
    except Exception as err:  # inductor's errors have no common base; the eager function is exact
        if _compiled is _backward:
            raise
        log.warning(
            "attention backward: compiling failed (%s); running it uncompiled", str(err).splitlines()[0]
        )
        _compiled = _backward
        return _backward(*args)


class CausalAttention(torch.autograd.Function):
    """softmax(scale * Q K^T + causal mask) V with Q (b, h, s, d) and K, V (b, h_kv, s, d), h_kv | h."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        # inside a compiled layer (--compile) the backward is traced into the layer's own graph
        backward = _backward if torch.compiler.is_compiling() else _compiled_backward
        with torch.autocast("cpu", enabled=False):
            grads = backward(q, k, v, out, lse, grad_out.contiguous(), ctx.scale)
        return (*grads, None)


def _bf16_dtype(query: torch.Tensor, key: torch.Tensor) -> bool:
    """bf16 query and key, or bf16 autocast (which casts SDPA's inputs to bf16 on a CPU)."""
    if query.dtype == key.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def fast_path(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool,
    kwargs: dict[str, Any],
) -> bool:
    """Whether `CausalAttention` computes what transformers' SDPA call would here (the same kernel
    forward, its backward within the kernel's own rounding)."""
    q_len = query.shape[2]
    return (
        query.device.type == "cpu"
        and _bf16_dtype(query, key)
        and torch.is_grad_enabled()
        and attention_mask is None
        and is_causal
        and dropout == 0.0
        and q_len == key.shape[2] >= MIN_SEQ
        and query.shape[1] % key.shape[1] == 0
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and not kwargs.get("output_attentions", False)
    )


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: (batch, seq, heads, head_dim) output, no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not fast_path(query, key, attention_mask, dropout, causal, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    bf16 = torch.bfloat16  # autocast's casts of SDPA's inputs (rotary embeddings leave q and k in fp32)
    out = CausalAttention.apply(query.to(bf16), key.to(bf16), value.to(bf16), scale)
    return out.transpose(1, 2).contiguous(), None


def takes_fast_path(device: torch.device, precision: str, seq_len: int) -> bool:
    """Whether a training step's attention at this device, precision and row length runs `CausalAttention`
    (for the planner's measurement; a model must also be on SDPA and unmasked)."""
    return device.type == "cpu" and precision == "bf16" and seq_len >= MIN_SEQ and cpp_compiler_available()


def use_cpu_attention(model: nn.Module) -> bool:
    """Switch `model` from SDPA to `attention_forward`; False (model unchanged) where it does not apply."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if not cpp_compiler_available():
        return False
    AttentionInterface.register(NAME, attention_forward)
    # the masks SDPA gets (padding, packed documents); an unregistered name would get none at all
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    for module in model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and getattr(sub, "_attn_implementation", None) == "sdpa":
            sub._attn_implementation = NAME
    return True
