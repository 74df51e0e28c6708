"""Fused LoRA Linear (adaptlab.fused_lora): PEFT's values and gradients within fp32 rounding (bf16 autocast
within its own), with the fused MLP on top; every case it does not cover takes PEFT's own forward.

Tolerances: fp32 loss within 1e-6 relative, each gradient within 1e-5 of its largest entry; bf16 autocast
loss within 1e-2 relative and gradients at cosine > 0.999.

    python -m pytest -q tests/unit/test_fused_lora.py
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adaptlab.config import MethodSpec
from adaptlab.fused import fuse_mlps
from adaptlab.fused_lora import DoRALinear, LoRALinear, fuse_loras
from adaptlab.methods import apply_method
from adaptlab.models import load_model


def _lora(spec: MethodSpec) -> nn.Module:
    model = apply_method(
        copy.deepcopy(load_model("tiny-random").model), spec, base_name="tiny-random", seed=0
    )
    with torch.no_grad():  # B starts at zero, which would leave every A's gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(2))
    return model


def _step(model: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)  # dropout's draws, the same for both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _trains_like_peft_fp32(plain: nn.Module, fused: nn.Module, tensors_per_module: int) -> None:
    """fp32: loss within 1e-6 relative, every adapter gradient (nonzero) within 1e-5 of its largest entry."""
    loss_a, grads_a = _step(plain, torch.float32)
    loss_b, grads_b = _step(fused, torch.float32)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert len(grads_a) == tensors_per_module * 7 * plain.config.num_hidden_layers
    for name, g in grads_a.items():
        assert g.abs().max() > 0, name
        assert (grads_b[name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def _trains_like_peft_bf16(plain: nn.Module, fused: nn.Module) -> None:
    """bf16 autocast: loss within 1e-2 relative, fp32 gradients at cosine > 0.999."""
    loss_a, grads_a = _step(plain, torch.bfloat16)
    loss_b, grads_b = _step(fused, torch.bfloat16)
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-2)
    for name, g in grads_a.items():
        assert grads_b[name].dtype == torch.float32, name  # fp32 master weights get fp32 gradients
        cos = torch.nn.functional.cosine_similarity(grads_b[name].flatten(), g.flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("with_fused_mlp", [False, True])
def test_fused_lora_trains_like_peft_fp32(rslora: bool, with_fused_mlp: bool) -> None:
    plain = _lora(MethodSpec(method="lora", rank=4, rslora=rslora, targets="all-linear"))
    fused = copy.deepcopy(plain)
    assert fuse_loras(fused) == 7 * plain.config.num_hidden_layers
    if with_fused_mlp:
        fuse_mlps(fused)
    _trains_like_peft_fp32(plain, fused, tensors_per_module=2)


def test_fused_lora_under_bf16_autocast() -> None:
    plain = _lora(MethodSpec(method="lora", rank=4, targets="all-linear"))
    fused = copy.deepcopy(plain)
    fuse_loras(fused)
    fuse_mlps(fused)
    _trains_like_peft_bf16(plain, fused)


def test_under_autocast_it_keeps_the_uncast_weight_and_input() -> None:
    """A frozen weight's bf16 cast is not held from forward to backward: the fp32 parameter is saved."""
    model = _lora(MethodSpec(method="lora", rank=4, targets="all-linear"))
    fuse_loras(model)
    layer = next(m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(2, 8, layer.in_features, requires_grad=True)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    weight = [t for t in saved if t.shape == layer.base_layer.weight.shape]
    assert len(weight) == 1 and weight[0].untyped_storage().data_ptr() in params  # the parameter itself
    assert any(t is x for t in saved)  # the fp32 input, not its bf16 cast
    assert not any(t.dtype == torch.bfloat16 and t.numel() >= x.numel() for t in saved)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


def _float64_linear() -> tuple[
    torch.Generator, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(generator, x, W, b, A, B) in float64, seeded: a 3-D input to a 6 -> 4 Linear with a rank-3 adapter."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    a = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    return g, x, w, b, a, bb


def _equal_with_gradients(
    plain: torch.Tensor,
    fused: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    grad: torch.Tensor,
    tol: float = 1e-12,
) -> None:
    """The values and every input's gradient within tol (float64: 1e-12)."""
    assert torch.allclose(fused, plain, rtol=tol, atol=tol)
    for p, q in zip(
        torch.autograd.grad(plain, inputs, grad), torch.autograd.grad(fused, inputs, grad), strict=True
    ):
        assert torch.allclose(p, q, rtol=tol, atol=tol)


def test_function_gradients_against_plain_ops() -> None:
    """LoRALinear alone, 3-D input with a bias, float64: every gradient equal to autograd's of the expression."""
    g, x, w, b, a, bb = _float64_linear()
    grad = torch.randn(2, 5, 4, dtype=torch.float64, generator=g)
    plain = x @ w.t() + b + (x @ a.t() @ bb.t()) * 0.7
    fused = LoRALinear.apply(x, w, b, a, bb, 0.7)
    _equal_with_gradients(plain, fused, (x, a, bb), grad)


def _with_dropout(method: str) -> tuple[nn.Module, nn.Module]:
    """(PEFT's, fused) copies of one model with LoRA dropout 0.3, in training mode."""
    plain = _lora(MethodSpec(method=method, rank=4, dropout=0.3, targets="all-linear"))
    fused = copy.deepcopy(plain)
    assert fuse_loras(fused) == 7 * plain.config.num_hidden_layers
    return plain.train(), fused.train()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fused_lora_with_dropout_trains_like_peft_fp32(method: str) -> None:
    """The same seed gives the same masks as PEFT's nn.Dropout: PEFT's loss and gradients, and a loss
    that differs from the one without dropout (the masks did act)."""
    plain, fused = _with_dropout(method)
    _trains_like_peft_fp32(plain, fused, tensors_per_module=2)
    dropped = _step(copy.deepcopy(fused), torch.float32)[0]
    undropped = _step(copy.deepcopy(fused).eval(), torch.float32)[0]
    assert abs(float(dropped) - float(undropped)) > 1e-4


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fused_lora_with_dropout_under_bf16_autocast(method: str) -> None:
    plain, fused = _with_dropout(method)
    fuse_mlps(fused)
    _trains_like_peft_bf16(plain, fused)


def test_with_dropout_it_keeps_a_bool_mask_not_the_dropped_input() -> None:
    """PEFT's modules keep dropout(x) (4 bytes an element) for A's gradient; the fused one keeps the
    mask (1 byte) and rebuilds dropout(x) from x in backward."""
    plain, fused = _with_dropout("lora")
    saved: dict[str, list[torch.Tensor]] = {"plain": [], "fused": []}
    x = torch.randn(2, 8, plain.config.hidden_size, requires_grad=True)
    for name, model in (("plain", plain), ("fused", fused)):
        layer = next(m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
        torch.manual_seed(0)
        with torch.autograd.graph.saved_tensors_hooks(lambda t, k=name: saved[k].append(t) or t, lambda t: t):
            y = layer(x)
        y.sum().backward()
    big = {k: [t for t in v if t.shape == x.shape] for k, v in saved.items()}
    assert any(t.dtype == torch.float32 and t is not x for t in big["plain"])  # PEFT's dropout(x)
    assert [t.dtype for t in big["fused"]] == [torch.float32, torch.bool]
    assert big["fused"][0] is x


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_with_dropout_a_reads_pefts_dropped_input(x_dtype: torch.dtype) -> None:
    """The same seed gives PEFT's mask and A's output bit for bit, also for a bf16 input under autocast
    (an attention output reaching o_proj), where PEFT casts x to A's dtype (fp32) before its dropout."""
    plain, fused = _with_dropout("lora")
    masks, downs = {}, {}
    x = torch.randn(2, 8, plain.config.hidden_size).to(x_dtype).requires_grad_(True)
    for name, model in (("plain", plain), ("fused", fused)):
        layer = next(m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
        saved: list[torch.Tensor] = []
        torch.manual_seed(0)
        with (
            torch.autograd.graph.saved_tensors_hooks(lambda t, s=saved: s.append(t) or t, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            layer(x)
        kept = [t for t in saved if t.shape == x.shape and (t.dtype == torch.bool or t.unique().numel() == 2)]
        masks[name] = kept[0] != 0
        downs[name] = next(t for t in saved if t.shape[-1] == 4 and t.numel() == 16 * 4).reshape(16, 4)
    assert torch.equal(masks["plain"], masks["fused"])
    assert 0 < int((~masks["fused"]).sum()) < x.numel()
    assert torch.equal(downs["plain"], downs["fused"])


def test_function_with_dropout_against_plain_ops() -> None:
    """LoRALinear with dropout, float64: autograd's gradients of x W^T + b + s (dropout(x) A^T) B^T with
    the mask F.dropout draws from the same seed."""
    g, x, w, b, a, bb = _float64_linear()
    grad = torch.randn(2, 5, 4, dtype=torch.float64, generator=g)
    torch.manual_seed(3)
    plain = x @ w.t() + b + (torch.nn.functional.dropout(x, 0.4, True) @ a.t() @ bb.t()) * 0.7
    torch.manual_seed(3)
    fused = LoRALinear.apply(x, w, b, a, bb, 0.7, None, None, 0.4)
    _equal_with_gradients(plain, fused, (x, a, bb), grad)


def test_dora_with_dropout_takes_pefts_forward() -> None:
    """PEFT's DoRA applies dropout to the base's input too: that stays PEFT's forward, bit for bit."""
    plain, fused = _with_dropout("dora")
    ids = torch.randint(0, plain.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.manual_seed(1)
        expected = plain(input_ids=ids).logits
        torch.manual_seed(1)
        assert torch.equal(expected, fused(input_ids=ids).logits)
        torch.manual_seed(2)
        assert not torch.equal(expected, fused(input_ids=ids).logits)  # dropout acted


def test_a_disabled_adapter_gives_the_base() -> None:
    """DPO's reference pass: adapters disabled, the fused modules compute the base model's output."""
    plain = _lora(MethodSpec(method="lora", rank=4, targets="all-linear"))
    fused = copy.deepcopy(plain)
    fuse_loras(fused)
    ids = torch.randint(0, plain.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tuned = fused(input_ids=ids).logits
        with fused.disable_adapter(), plain.disable_adapter():
            base_fused, base_plain = fused(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(base_fused, base_plain)
    assert not torch.allclose(tuned, base_fused)


def test_a_bias_on_b_takes_pefts_forward() -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_bias=True)
    plain = get_peft_model(copy.deepcopy(load_model("tiny-random").model), config)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(5))
    fused = copy.deepcopy(plain)
    fuse_loras(fused)
    ids = torch.randint(0, plain.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, fused(input_ids=ids).logits)


def _qlora() -> nn.Module:
    return _lora(MethodSpec(method="qlora", rank=4, targets="all-linear"))


def test_fused_qlora_trains_like_peft_fp32() -> None:
    plain = _qlora()
    fused = copy.deepcopy(plain)
    assert fuse_loras(fused) == 7 * plain.config.num_hidden_layers  # the 4-bit Linears' LoRA modules
    _trains_like_peft_fp32(plain, fused, tensors_per_module=2)


def test_fused_qlora_under_bf16_autocast() -> None:
    plain = _qlora()
    fused = copy.deepcopy(plain)
    fuse_loras(fused)
    _trains_like_peft_bf16(plain, fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_weight_dequantizes_straight_to_the_matmul_dtype_exactly(dtype: torch.dtype) -> None:
    """bitsandbytes' fp32 dequantization cast to bf16 (what autocast made of it) == dequantizing to bf16."""
    import bitsandbytes.functional as bnb_functional

    from adaptlab.fused_lora import _dense

    layer = next(m for m in _qlora().modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
    weight = layer.base_layer.weight
    reference = bnb_functional.dequantize_4bit(weight, weight.quant_state)
    assert reference.dtype == torch.float32
    assert torch.equal(_dense(weight, weight.quant_state, dtype), reference.to(dtype))


def test_fused_qlora_saves_the_4bit_weight_not_a_dequantized_copy() -> None:
    layer = next(m for m in _qlora().modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A"))
    fuse_loras(layer)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(2, 8, layer.in_features, requires_grad=True)
    for autocast in (False, True):
        saved.clear()
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
        ):
            y = layer(x)
        assert any(t is layer.base_layer.weight for t in saved)
        assert not any(
            t.is_floating_point() and t.numel() >= layer.in_features * layer.out_features for t in saved
        )
        y.float().sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.float32


def _dora() -> nn.Module:
    model = _lora(MethodSpec(method="dora", rank=4, targets="all-linear"))
    with torch.no_grad():  # magnitudes start at the weight norms, which would make every gain 1
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.rand(p.shape, generator=torch.Generator().manual_seed(5)))
    return model


def test_fused_dora_trains_like_peft_fp32() -> None:
    plain = _dora()
    fused = copy.deepcopy(plain)
    assert fuse_loras(fused) == 7 * plain.config.num_hidden_layers
    _trains_like_peft_fp32(plain, fused, tensors_per_module=3)  # A, B and the magnitude


def test_fused_dora_under_bf16_autocast() -> None:
    plain = _dora()
    fused = copy.deepcopy(plain)
    fuse_loras(fused)
    _trains_like_peft_bf16(plain, fused)


def test_dora_function_gradients_against_plain_ops() -> None:
    """DoRALinear alone, float64: the DoRA expression with the row norm detached, every gradient equal."""
    g, x, w, b, a, bb = _float64_linear()
    m = torch.rand(4, dtype=torch.float64, generator=g).add_(0.5).requires_grad_(True)
    grad = torch.randn(2, 5, 4, dtype=torch.float64, generator=g)
    norm = (w + 0.7 * bb @ a).norm(dim=1).detach()
    plain = b + (m / norm) * (x @ w.t() + (x @ a.t() @ bb.t()) * 0.7)
    fused = DoRALinear.apply(x, w, b, a, bb, m, 0.7)
    _equal_with_gradients(plain, fused, (x, a, bb, m), grad, tol=1e-6)  # the norm is taken in fp32
