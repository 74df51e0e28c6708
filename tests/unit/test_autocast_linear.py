"""AutocastLinear (adaptlab.autocast_linear): under bf16 autocast, full fine-tuning's Linears give the
plain model's loss and gradients bit for bit while keeping fp32 tensors, not bf16 casts, for backward.

    python -m pytest -q tests/unit/test_autocast_linear.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import step_grads
from torch import nn

from adaptlab.autocast_linear import AutocastLinear, fuse_autocast_linears
from adaptlab.config import MethodSpec
from adaptlab.fused import fuse_mlps
from adaptlab.fused_norm import fuse_norms
from adaptlab.methods import apply_method
from adaptlab.models import load_model


@pytest.mark.parametrize(
    ("dtype", "norms", "checkpointing"),
    [
        (torch.float32, False, False),
        (torch.float32, True, False),
        (torch.bfloat16, False, False),
        (torch.bfloat16, True, False),
        (torch.bfloat16, False, True),  # as training runs it under activation checkpointing
    ],
)
def test_full_fine_tuning_trains_like_the_plain_model(
    dtype: torch.dtype, norms: bool, checkpointing: bool
) -> None:
    base = load_model("tiny-random").model
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain = apply_method(base, MethodSpec(method="full"), base_name="tiny-random", seed=0).train()
    fuse_mlps(plain, recompute_product=not checkpointing)
    if norms:
        fuse_norms(plain)
    fused = copy.deepcopy(plain)
    assert fuse_autocast_linears(fused) == 7 * plain.config.num_hidden_layers  # not the head
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_a, grads_a = step_grads(plain, ids, dtype)
    loss_b, grads_b = step_grads(fused, ids, dtype)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert grads_b[name].dtype == torch.float32, name
        assert torch.equal(g, grads_b[name]), name


def test_it_keeps_the_fp32_weight_and_input() -> None:
    layer = nn.Linear(16, 8)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(3, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = AutocastLinear.apply(x, layer.weight, layer.bias, torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert len(saved) == 2 and saved[0] is x and saved[1] is layer.weight
    y.float().sum().backward()
    assert x.grad.dtype == layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32


def test_lora_bases_and_the_head_are_left_alone() -> None:
    base = load_model("tiny-random").model
    lora = apply_method(base, MethodSpec(method="lora", rank=4), base_name="tiny-random", seed=0)
    assert fuse_autocast_linears(lora) == 0  # frozen bases: the fused LoRA Linear keeps them uncast
