"""Next-token losses that never hold the full (batch x seq x vocab) fp32 logits.

The output head runs inside the model's own forward call (so DDP's and FSDP2's forward hooks, PEFT's
wrappers and a LoRA on lm_head all see an ordinary call), but its forward is swapped for the duration
of the call: instead of (B, T, V) logits it returns the loss (or per-token NLL) computed over chunks
of tokens. Each chunk's logits live only while that chunk is processed.

- A plain nn.Linear head (tied to the embeddings or not) goes through `LinearCrossEntropy`, a custom
  autograd function that computes each chunk's logits, its fp32 log-sum-exp and loss, and, when a
  gradient is wanted, that chunk's gradient with respect to the hidden states and the head weight right
  away (softmax - one-hot, two matmuls), so nothing is recomputed in backward and the logits are freed
  chunk by chunk. Accumulation is fp32. Positions without a label are skipped entirely.
- Any other head (LoRA or DoRA on lm_head, a quantized head) is applied per chunk under
  torch.utils.checkpoint: the chunk's logits are recomputed in backward, never stored.
- On CUDA with liger-kernel installed, Liger's fused linear cross-entropy replaces the first path.

    python -c "from adaptlab.losses import *; help(token_loss_sum)"
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 23
"""Logit elements per chunk (32 MiB in fp32): 170 tokens of a 49,152-token vocabulary."""

HeadFn = Callable[[torch.Tensor], torch.Tensor]


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk for a vocabulary of `vocab`: CHUNK_ELEMENTS logits, at least 16 tokens."""
    return max(16, CHUNK_ELEMENTS // max(vocab, 1))


# ---------------------------------------------------------------------------------------- the head


def base_module(model: nn.Module) -> nn.Module:
    """The module under DDP (`.module`); FSDP2 and PEFT models are themselves."""
    return getattr(model, "module", model) if model.__class__.__name__ == "DistributedDataParallel" else model


def output_head(model: nn.Module) -> nn.Module:
    """The model's output projection (lm_head), through DDP and PEFT wrappers; a LoRA on it included."""
    head = base_module(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head


@contextlib.contextmanager
def head_replaced(model: nn.Module, fn: Callable[[torch.Tensor, HeadFn], torch.Tensor]) -> Iterator[None]:
    """Within the block, the model's lm_head returns fn(hidden, original_head) instead of logits.

    The swap is on the module instance, so the model is still called through its outermost wrapper
    (DDP's reducer, FSDP2's all-gathers and PEFT all run as usual) and the head's parameters are the
    ones that forward is using.
    """
    head = output_head(model)
    patched = head.__dict__.get("forward")  # a hook library may have set one on the instance
    original = head.forward
    head.forward = lambda hidden: fn(hidden, original)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if patched is None:
            del head.forward  # the class's forward again
        else:
            head.forward = patched


def _is_plain_linear(head_fn: HeadFn) -> nn.Linear | None:
    owner = getattr(head_fn, "__self__", None)
    return owner if type(owner) is nn.Linear else None


# ------------------------------------------------------------------------------------- the losses


def _mm_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives a matmul on t's device (t's own dtype without autocast)."""
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


def exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place, logits (n, V) become exp(logits - row max); returns (row log-sum-exp, row sums).

    torch.logsumexp would hold two more (n, V) temporaries (the shifted logits and their exp): three
    chunks of logits at the loss's peak instead of one. Dividing the result by the sums gives the softmax.
    """
    top = logits.amax(dim=-1, keepdim=True)
    sums = logits.sub_(top).exp_().sum(dim=-1)
    return top.squeeze(-1) + sums.log(), sums


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T + bias) against labels, chunked over tokens.

    hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) all valid (no ignore index).
    Gradients are computed in forward chunk by chunk (fp32 accumulation) and scaled in backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        chunk: int,
        want_grads: tuple[bool, bool, bool],
    ) -> torch.Tensor:
        dtype = _mm_dtype(hidden)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        need_h, need_w, need_b = want_grads
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for lo in range(0, hidden.shape[0], chunk):
                h = hidden[lo : lo + chunk].to(dtype)  # (n, H)
                y = labels[lo : lo + chunk]
                logits = F.linear(h, w, b).float()  # (n, V) fp32
                rows = torch.arange(h.shape[0], device=h.device)
                target = logits[rows, y]
                lse, sums = exp_shifted_(logits)
                loss += (lse - target).sum()
                if need_h or need_w or need_b:
                    d = logits.div_(sums[:, None])  # softmax, in place of the logits
                    d[rows, y] -= 1.0  # d loss / d logits
                    if need_h:
                        grad_h[lo : lo + chunk] = (d.to(dtype) @ w).to(hidden.dtype)
                    if need_w:
                        if dtype == torch.float32 or not h.is_cuda:
                            # on a CPU one fp32 matmul accumulating in place beats a bf16 (V, H) product
                            # per chunk: a fresh 57 MB block (smollm2's head) and a mixed-dtype add,
                            # 4x slower on avx512_bf16; fp32 is also the exact sum of the chunks
                            grad_w.addmm_(d.t(), h.float())
                        else:  # (V, H) in the matmul dtype, summed in fp32
                            grad_w.add_(d.to(dtype).t() @ h)
                    if need_b:
                        grad_b.add_(d.sum(0))
                    del d
                del logits  # freed before the next chunk's logits exist: one chunk alive, not two
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_h, grad_w, grad_b)))
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.want = want_grads
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.want
        w_dtype, b_dtype = ctx.dtypes
        return (
            grad_h * grad_out.to(grad_h.dtype) if need_h else None,
            (grad_w * grad_out).to(w_dtype) if need_w else None,
            (grad_b * grad_out).to(b_dtype) if need_b else None,
            None,
            None,
            None,
        )


def _liger() -> Callable[..., Any] | None:
    """liger-kernel's fused linear cross-entropy (its functional API), or None when not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def linear_cross_entropy_sum(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Summed CE of head(hidden) against labels; hidden (N, H) and labels (N,) hold valid labels only."""
    chunk = chunk or chunk_tokens(head.out_features)
    weight, bias = head.weight, head.bias
    if hidden.is_cuda and (liger := _liger()) is not None:
        out = liger(hidden, weight, labels, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum")
        return out[0] if isinstance(out, tuple) else out  # some versions also return the z-loss
    grad = torch.is_grad_enabled()
    want = (
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
    )
    return LinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, want)


def _chunk_ce(head_fn: HeadFn, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head_fn(h).float(), y, reduction="sum")


def head_cross_entropy_sum(
    hidden: torch.Tensor, head_fn: HeadFn, labels: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Summed CE for any head callable (LoRA on lm_head, ...): per chunk, recomputed in backward."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    recompute = torch.is_grad_enabled()
    for lo in range(0, hidden.shape[0], chunk):
        h, y = hidden[lo : lo + chunk], labels[lo : lo + chunk]
        part = (
            checkpoint(_chunk_ce, head_fn, h, y, use_reentrant=False)
            if recompute
            else _chunk_ce(head_fn, h, y)
        )
        total = total + part
    return total


def cross_entropy_sum(hidden: torch.Tensor, head_fn: HeadFn, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token CE over the valid positions of hidden (..., H) / labels (...), chunked, fp32."""
    flat_labels = labels.reshape(-1)
    valid = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid)  # (N, H), labelled positions only
    y = flat_labels.index_select(0, valid)
    linear = _is_plain_linear(head_fn)
    if linear is not None:
        return linear_cross_entropy_sum(h, linear, y)
    vocab = getattr(output_vocab(head_fn), "out_features", 65536)
    return head_cross_entropy_sum(h, head_fn, y, chunk_tokens(vocab))


def output_vocab(head_fn: HeadFn) -> Any:
    """The module a head callable belongs to (a bound forward's owner), for its out_features."""
    return getattr(head_fn, "__self__", head_fn)


def token_nll(hidden: torch.Tensor, head_fn: HeadFn, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL (..., ) in fp32 of targets (...) under head(hidden); IGNORE_INDEX positions are 0.

    For evaluation (no gradient): logits exist one chunk at a time.
    """
    flat = targets.reshape(-1)
    out = torch.zeros(flat.shape, dtype=torch.float32, device=hidden.device)
    valid = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, valid)
    y = flat.index_select(0, valid)
    chunk = chunk_tokens(getattr(output_vocab(head_fn), "out_features", 65536))
    for lo in range(0, h.shape[0], chunk):
        logits = head_fn(h[lo : lo + chunk]).float()  # (n, V)
        target = logits.gather(1, y[lo : lo + chunk, None]).squeeze(1)
        nll = exp_shifted_(logits)[0] - target
        out.index_copy_(0, valid[lo : lo + chunk], nll)
        del logits  # one chunk alive, not two
    return out.view(targets.shape)


# ---------------------------------------------------------------------------------- model-level calls


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword arguments of a model call: ids and either position ids (packed rows) or the mask."""
    if "position_ids" in batch:  # packed: attention stays inside each document (see data/packing.py)
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over label tokens, and their count, without full logits.

    batch holds input_ids, labels and attention_mask (B, T), plus position_ids for packed rows.
    The labels are shifted here: position t is scored on labels[t + 1].
    """
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    with head_replaced(model, lambda hidden, head: cross_entropy_sum(hidden, head, labels)):
        loss = model(**model_inputs(batch), use_cache=False).logits  # the head returned the loss
    return loss, int((labels != IGNORE_INDEX).sum())


def next_token_nll(model: Any, batch: dict[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """(B, T) fp32 NLL of targets[b, t] at position t (IGNORE_INDEX positions 0), without full logits."""
    with head_replaced(model, lambda hidden, head: token_nll(hidden, head, targets)):
        return model(**model_inputs(batch), use_cache=False).logits


@contextlib.contextmanager
def hidden_states(model: Any) -> Iterator[HeadFn]:
    """Within the block, model(...).logits are the final hidden states (B, T, H); yields the head.

    For figures that need whole distributions at a few positions at a time (drift's KL): apply the
    yielded head to slices of the hidden states.
    """
    head = output_head(model)
    original = head.forward
    with head_replaced(model, lambda hidden, _: hidden):
        yield original
