"""Fused RMSNorm (adaptlab.fused_norm): bit for bit the plain block's values and gradients, at fp32 and
bf16, for full fine-tuning and the LoRA family, and nothing the graph holds keeps a norm's output.

    python -m pytest -q tests/unit/test_fused_norm.py
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from helpers import step_grads
from torch import nn

from adaptlab import fused_norm
from adaptlab.config import MethodSpec
from adaptlab.fused import fuse_mlps
from adaptlab.fused_lora import fuse_loras
from adaptlab.fused_norm import fuse_norms
from adaptlab.methods import apply_method
from adaptlab.models import load_model


def _model(method: str) -> nn.Module:
    """tiny-random with the method applied and the loop's other fusions, LoRA B away from zero."""
    base = load_model("tiny-random").model
    model = apply_method(base, MethodSpec(method=method, rank=4), base_name="tiny-random", seed=0)
    with torch.no_grad():  # B starts at zero, which would leave every A's gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    fuse_mlps(model)
    fuse_loras(model)
    return model.train()


@pytest.mark.parametrize("method", ["full", "lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norms_train_like_the_plain_model(method: str, dtype: torch.dtype) -> None:
    """The same loss and every gradient bit for bit (fp32, and bf16 autocast as on an AMX CPU)."""
    plain = _model(method)
    fused = copy.deepcopy(plain)
    assert fuse_norms(fused) == plain.config.num_hidden_layers
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss_a, grads_a = step_grads(plain, ids, dtype)
    loss_b, grads_b = step_grads(fused, ids, dtype)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    if method == "full":
        assert any("layernorm" in name for name in grads_a)  # the norms' own weights train
    for name, g in grads_a.items():
        assert torch.equal(g, grads_b[name]), name
        assert g.abs().sum() > 0, name


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_graph_keeps_neither_a_norms_output_nor_its_normalised_input(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting saved tensors is not enough: nothing the graph holds (hooks included) may keep them."""
    made: list[weakref.ref[torch.Tensor]] = []
    normalised = fused_norm._normalised

    def recording(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = normalised(norm, x)
        made.append(weakref.ref(out))
        return out

    model = _model(method)
    assert fuse_norms(model) == model.config.num_hidden_layers
    for layer in [m for m in model.modules() if hasattr(m, "input_layernorm")]:
        for name in fused_norm.NORMS:
            norm = getattr(layer, name)
            forward = norm.forward
            norm.forward = lambda x, forward=forward: _noted(forward(x), made)
    monkeypatch.setattr(fused_norm, "_normalised", recording)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    assert len(made) == 2 * 2 * model.config.num_hidden_layers  # each norm's normalised tensor and output
    assert all(ref() is None for ref in made)
    loss.backward()  # and the rebuilt tensors serve the backward
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _noted(t: torch.Tensor, made: list[weakref.ref[torch.Tensor]]) -> torch.Tensor:
    made.append(weakref.ref(t))
    return t


def test_other_norms_are_left_alone() -> None:
    class Scaled(nn.Module):  # an RMSNorm with another forward (Gemma's 1 + weight, say)
        def __init__(self) -> None:
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(4)), 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (
                x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)
            )

    layer = nn.Module()
    layer.input_layernorm, layer.post_attention_layernorm = Scaled(), Scaled()
    assert fuse_norms(layer) == 0


def test_without_autograd_the_norms_run_plain() -> None:
    model = _model("lora")
    plain = copy.deepcopy(model)
    fuse_norms(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
