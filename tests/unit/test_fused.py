"""Fused SwiGLU (adaptlab.fused): bit for bit the plain MLP's values and gradients, at fp32 and bf16,
for full fine-tuning and LoRA; it saves one (tokens x intermediate) tensor less per block; an MLP with
another activation or another forward is left alone.

    python -m pytest -q tests/unit/test_fused.py
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import step_grads
from torch import nn

from adaptlab.config import MethodSpec
from adaptlab.fused import fuse_mlps, is_standard_mlp, swiglu
from adaptlab.methods import apply_method
from adaptlab.models import load_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_equals_plain_autograd_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    gate = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    up = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    grad = torch.randn(64, 96, dtype=dtype)
    plain = F.silu(gate) * up
    plain_grads = torch.autograd.grad(plain, (gate, up), grad)
    fused = swiglu(gate, up)
    fused_grads = torch.autograd.grad(fused, (gate, up), grad)
    assert torch.equal(fused, plain)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_model_trains_like_the_plain_model(
    method: str, dtype: torch.dtype, checkpointing: bool
) -> None:
    """The same loss and every gradient bit for bit (fp32, and bf16 autocast as on an AMX CPU), also
    under activation checkpointing (where training fuses without rebuilding the product)."""
    base = load_model("tiny-random").model
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.train()
    plain = apply_method(
        copy.deepcopy(base), MethodSpec(method=method, rank=4), base_name="tiny-random", seed=0
    )
    with torch.no_grad():  # B starts at zero, which would leave every A's gradient zero
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    fused = copy.deepcopy(plain)
    assert fuse_mlps(fused, recompute_product=not checkpointing) == plain.config.num_hidden_layers
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_a, grads_a = step_grads(plain, ids, dtype)
    loss_b, grads_b = step_grads(fused, ids, dtype)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name
        assert g.abs().sum() > 0, name


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("recompute_product,fewer", [(True, 2), (False, 1)])
def test_fused_mlp_saves_fewer_intermediate_tensors(method: str, recompute_product: bool, fewer: int) -> None:
    """Two (tokens x intermediate) tensors less (the SiLU output, and the product down_proj trains on);
    one less where the product is not recomputed (activation checkpointing, --compile)."""
    base = load_model("tiny-random").model
    model = apply_method(base, MethodSpec(method=method, rank=4), base_name="tiny-random", seed=0)
    mlp = next(m for m in model.modules() if is_standard_mlp(m))
    tokens, inter = 40, mlp.up_proj.out_features
    x = torch.randn(1, tokens, mlp.up_proj.in_features, requires_grad=True)
    before = _saved_bytes(mlp, x)
    fuse_mlps(mlp, recompute_product=recompute_product)
    less = before - _saved_bytes(mlp, x)
    # the innermost saved-tensor hooks win: what down_proj saves besides the product goes through the
    # fused MLP's hook, not this counter's, and LoRA B's input (tokens x r) escapes the count
    unseen = tokens * 4 * 4 if method == "lora" and recompute_product else 0
    assert less == fewer * tokens * inter * 4 + unseen


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_graph_does_not_keep_the_product(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counting saved tensors is not enough: nothing the graph holds (hooks included) may keep the product."""
    import gc
    import weakref

    from adaptlab import fused

    products: list[weakref.ref[torch.Tensor]] = []

    def recording(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        out = swiglu(gate, up)
        products.append(weakref.ref(out))
        return out

    monkeypatch.setattr(fused, "swiglu", recording)
    base = load_model("tiny-random").model
    model = apply_method(base, MethodSpec(method=method, rank=4), base_name="tiny-random", seed=0)
    mlp = next(m for m in model.modules() if is_standard_mlp(m))
    fuse_mlps(mlp)
    x = torch.randn(1, 40, mlp.up_proj.in_features, requires_grad=True)
    out = mlp(x)
    gc.collect()
    assert out.grad_fn is not None and len(products) == 1
    assert products[0]() is None
    out.sum().backward()  # and the rebuilt product serves the backward
    assert x.grad is not None


class _GeluMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _ScaledMLP(_GeluMLP):
    def __init__(self) -> None:
        super().__init__()
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)


def test_other_mlps_are_left_alone() -> None:
    assert not is_standard_mlp(_GeluMLP())  # another activation
    assert not is_standard_mlp(_ScaledMLP())  # another forward
    assert fuse_mlps(nn.Sequential(_GeluMLP(), _ScaledMLP())) == 0
