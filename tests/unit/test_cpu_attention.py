"""cpu_attention: the flash forward with a matmul backward is as accurate as torch's own flash kernel
against fp64 (grouped heads too), equals transformers' SDPA call wherever it does not apply, keeps
SDPA's masks, and trains a model to the same loss and gradients within bf16 rounding.

    python -m pytest -q tests/unit/test_cpu_attention.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from adaptlab import cpu_attention
from adaptlab.cpu_attention import MIN_SEQ, CausalAttention, attention_forward, use_cpu_attention
from adaptlab.models import load_model
from tests.helpers import step_grads


def _qkv(heads: int, kv_heads: int, seq: int = MIN_SEQ, dim: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, h, seq, dim, generator=g, dtype=torch.float64) * 2 for h in (heads, kv_heads, kv_heads)
    ]


def _errors(fn, qkv: list[torch.Tensor], truth: list[torch.Tensor], grad: torch.Tensor) -> list[float]:
    """Relative errors of (output, dq, dk, dv) at bf16 against fp64."""
    x = [t.detach().to(torch.bfloat16).requires_grad_() for t in qkv]
    out = fn(*x)
    out.backward(grad.to(torch.bfloat16))
    got = [out.detach()] + [t.grad for t in x]
    return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, truth, strict=True)]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_as_accurate_as_the_flash_kernel_against_fp64(heads: int, kv_heads: int) -> None:
    qkv = _qkv(heads, kv_heads)
    scale = qkv[0].shape[-1] ** -0.5
    grad = torch.randn(qkv[0].shape, generator=torch.Generator().manual_seed(1), dtype=qkv[0].dtype)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    x = [t.detach().clone().requires_grad_() for t in qkv]
    out = sdpa(*x)
    out.backward(grad)
    truth = [out.detach()] + [t.grad for t in x]
    theirs = _errors(sdpa, qkv, truth, grad)
    ours = _errors(lambda q, k, v: CausalAttention.apply(q, k, v, scale), qkv, truth, grad)
    assert ours[0] == theirs[0]  # the same forward kernel
    for mine, kernel in zip(ours[1:], theirs[1:], strict=True):
        assert mine <= 1.15 * kernel, (ours, theirs)  # bf16 rounding: both ~1e-2


def test_uncompiled_backward_is_the_same_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn):
        def run(*args):
            raise RuntimeError("no toolchain")

        return run

    qkv = [t.to(torch.bfloat16) for t in _qkv(4, 2)]
    scale = qkv[0].shape[-1] ** -0.5
    grad = torch.randn_like(qkv[0])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*qkv, 0.0, True, scale=scale)
    compiled = cpu_attention._compiled_backward(*qkv, out, lse, grad, scale)
    monkeypatch.setattr(cpu_attention, "_compiled", None)
    monkeypatch.setattr(torch, "compile", broken)
    fallback = cpu_attention._compiled_backward(*qkv, out, lse, grad, scale)  # warns, runs uncompiled
    assert cpu_attention._compiled is cpu_attention._backward
    for a, b in zip(fallback, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)  # fused vs unfused bf16 rounding


class _Module(torch.nn.Module):
    num_key_value_groups = 2
    is_causal = True


@pytest.mark.parametrize(
    "case",
    ["fp32", "no grad", "short", "masked", "dropout"],
)
def test_elsewhere_it_is_transformers_sdpa(case: str) -> None:
    q, k, v = (t.float() for t in _qkv(4, 2, seq=MIN_SEQ // 2 if case == "short" else MIN_SEQ))
    if case != "fp32":
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    q.requires_grad_(case != "no grad")
    mask = None
    if case == "masked":  # a padding mask: the first row's last 8 keys hidden
        keep = torch.ones(2, 1, MIN_SEQ, MIN_SEQ, dtype=torch.bool).tril()
        keep[0, :, :, -8:] = False
        keep[0, :, -8:, -8:] = torch.eye(8, dtype=torch.bool)
        mask = keep
    dropout = 0.1 if case == "dropout" else 0.0
    module = _Module().train()
    torch.manual_seed(1)
    ours, _ = attention_forward(module, q, k, v, mask, dropout=dropout, scaling=0.2)
    torch.manual_seed(1)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=0.2)
    assert torch.equal(ours, theirs)
    assert ours.grad_fn is None or "CausalAttention" not in type(ours.grad_fn).__name__


def test_a_model_trains_as_under_sdpa_and_keeps_packed_masks() -> None:
    loaded = load_model("tiny-random", dtype=torch.float32, device="cpu")
    model = loaded.model
    ids = torch.randint(0, model.config.vocab_size, (2, MIN_SEQ), generator=torch.Generator().manual_seed(0))
    loss_sdpa, grads_sdpa = step_grads(model, ids, torch.bfloat16)
    model.zero_grad()
    assert use_cpu_attention(model)
    assert model.config._attn_implementation == cpu_attention.NAME
    loss, grads = step_grads(model, ids, torch.bfloat16)
    assert loss == loss_sdpa  # the same forward kernel on the same bf16 casts
    for name, g in grads_sdpa.items():
        assert float((grads[name] - g).norm() / g.norm()) < 5e-2, name  # bf16 rounding of two backwards
    # packed documents still get their mask: the second document's logits equal it alone
    half = MIN_SEQ // 2
    positions = torch.arange(half).repeat(2).unsqueeze(0)
    with torch.no_grad():
        packed = model(input_ids=ids[:1], position_ids=positions, use_cache=False).logits[0, half:]
        alone = model(input_ids=ids[:1, half:]).logits[0]
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_a_model_not_on_sdpa_is_left_alone() -> None:
    model = load_model("tiny-random", dtype=torch.float32, device="cpu").model
    model.config._attn_implementation = "eager"
    assert not use_cpu_attention(model)
    assert model.config._attn_implementation == "eager"


def test_accuracy_holds_on_the_avx2_kernels_too(tmp_path) -> None:
    """The flash kernel and the matmuls differ by CPU capability: the same check with torch forced onto
    its avx2 kernels, whatever this machine's CPU has. Its compiled kernels go to a cache of its own:
    inductor's on-disk cache does not key on ATEN_CPU_CAPABILITY, and a kernel built under one capability
    corrupts memory when a process under the other loads it."""
    import os
    import subprocess
    import sys

    test = f"{__file__}::test_as_accurate_as_the_flash_kernel_against_fp64"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    check = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    assert (
        subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env).stdout.strip()
        == "AVX2"
    )
