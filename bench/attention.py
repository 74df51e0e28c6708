"""Benchmark causal attention forward + backward at a model's shape in bf16 on a CPU: adaptlab's
(cpu_attention.py: torch's flash forward, a backward of batched matmuls) vs torch's SDPA.

Both run in one process, alternating in rounds, so the machine's drift hits both alike; the speed ratio
is the median over rounds of SDPA's time over adaptlab's, with a 95% bootstrap interval. Accuracy: the
relative errors of the output and of dq, dk and dv against the same attention in fp64.

Prints a table and writes bench/results/attention.json.

    python bench/attention.py [--model smollm2-135m] [--batch 4] [--seq-len 256] [--rounds 40]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from train_step import paired_ratio_ci

from adaptlab.cpu_attention import CausalAttention
from adaptlab.hardware import cpu_has_native_bf16

RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"


def _shape(model: str) -> tuple[int, int, int]:
    """(heads, key/value heads, head dim) of an embedded model or a local directory's config."""
    from transformers import AutoConfig

    from adaptlab.models import local_dir

    path = local_dir(model) or Path(model)
    config = AutoConfig.from_pretrained(str(path))
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, dim


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def _ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5)


def _errors(fn: Any, qkv: list[torch.Tensor], grad: torch.Tensor) -> list[float]:
    """Relative errors of (output, dq, dk, dv) at bf16 against the fp64 attention."""
    exact = [t.detach().double().requires_grad_() for t in qkv]
    out = _sdpa(*exact)
    out.backward(grad.double())
    truth = [out.detach()] + [t.grad for t in exact]
    x = [t.detach().requires_grad_() for t in qkv]
    out = fn(*x)
    out.backward(grad)
    got = [out.detach()] + [t.grad for t in x]
    return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, truth, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=40, help="rounds of 3 forward + backward passes each")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    heads, kv, dim = _shape(args.model)
    g = torch.Generator().manual_seed(0)
    qkv = [
        torch.randn(args.batch, h, args.seq_len, dim, generator=g).to(torch.bfloat16) for h in (heads, kv, kv)
    ]
    grad = torch.randn(args.batch, heads, args.seq_len, dim, generator=g).to(torch.bfloat16)
    loops = {"sdpa": _sdpa, "adaptlab": _ours}
    errors = {name: _errors(fn, qkv, grad) for name, fn in loops.items()}
    x = [t.detach().requires_grad_() for t in qkv]
    times: dict[str, list[float]] = {name: [] for name in loops}
    for fn in loops.values():  # warm-up: the backward's compilation
        for _ in range(3):
            fn(*x).backward(grad)
    for _ in range(args.rounds):
        for name, fn in loops.items():
            start = time.perf_counter()
            for _ in range(3):
                fn(*x).backward(grad)
            times[name].append((time.perf_counter() - start) / 3)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    ratio = statistics.median(a / b for a, b in zip(times["sdpa"], times["adaptlab"], strict=True))
    ci = paired_ratio_ci(times["sdpa"], times["adaptlab"])
    print(
        f"{args.model}: {heads} heads ({kv} key/value), head dim {dim}, batch {args.batch} x {args.seq_len}, "
        f"bf16, forward + backward, {args.rounds} rounds"
    )
    print(f"{'attention':<10} {'ms':>7}  {'err out':>8} {'err dq':>8} {'err dk':>8} {'err dv':>8}")
    for name in loops:
        e = errors[name]
        print(f"{name:<10} {ms[name]:>7.2f}  {e[0]:>8.2e} {e[1]:>8.2e} {e[2]:>8.2e} {e[3]:>8.2e}")
    print(f"speed: adaptlab {ratio:.2f}x SDPA's [{ci[0]:.2f}, {ci[1]:.2f}]")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": args.model,
        "heads": heads,
        "kv_heads": kv,
        "head_dim": dim,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "rounds": args.rounds,
        "ms": ms,
        "speed_ratio": ratio,
        "speed_ratio_ci95": ci,
        "errors_vs_fp64": {
            name: dict(zip(("out", "dq", "dk", "dv"), e, strict=True)) for name, e in errors.items()
        },
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "command": "python bench/attention.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
