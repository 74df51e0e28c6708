"""Measurements the estimates stand on, taken once per machine and cached under cache_dir()/plan.

- `runtime_baseline_bytes`: the peak RSS of a fresh Python process that imports what training
  imports (torch, transformers, peft, adaptlab.train) and runs one tiny autocast backward. On CPU,
  `adaptlab train` reports peak RSS, so this floor is part of every CPU estimate.
- `device_throughput`: a few-second micro-benchmark on the actual device at the chosen precision:
  matmul FLOP/s of a training Linear (forward and both gradients) at the model's MLP shape (tokens x
  hidden @ hidden x intermediate) and elementwise memory bandwidth (bytes/s of an out-of-place add).
- `attention_throughput`: causal attention's training FLOP/s (`F.scaled_dot_product_attention`, forward
  and backward) at the model's heads and head size and the step's sequence length.

    python -c "from adaptlab.plan.measure import *; print(device_throughput('cpu', 'fp32', 512, 576, 1536))"
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from adaptlab.cpu_attention import CausalAttention, takes_fast_path
from adaptlab.models import cache_dir

# Assumed when no measurement is possible (a GPU that is not this process's device).
CUDA_CONTEXT_BYTES = 512 * 2**20

_BASELINE_SCRIPT = """
import json, warnings
warnings.filterwarnings("ignore")
import torch, transformers, peft
import adaptlab.train  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
x = torch.randn(64, 64, requires_grad=True)
with torch.autocast("cpu", dtype=torch.bfloat16):
    y = (x @ x).sum()
y.backward()
from adaptlab.hardware import peak_rss_bytes
print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
"""


def plan_cache() -> Path:
    return cache_dir() / "plan"


def _versions_key() -> str:
    import peft
    import transformers

    return f"py{sys.version_info[0]}.{sys.version_info[1]}-torch{torch.__version__}-tf{transformers.__version__}-peft{peft.__version__}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def _read_cache(name: str) -> dict[str, Any] | None:
    path = plan_cache() / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_cache(name: str, value: dict[str, Any]) -> None:
    path = plan_cache() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, indent=2))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)[:120]


def runtime_baseline_bytes(refresh: bool = False) -> int:
    """Peak RSS of a process that has imported the training stack (measured once, cached)."""
    name = f"runtime-v2-{_slug(_versions_key())}.json"  # v2: VmHWM, not the inherited ru_maxrss
    cached = None if refresh else _read_cache(name)
    if cached is not None:
        return int(cached["peak_rss_bytes"])
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-c", _BASELINE_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measuring the runtime baseline failed: {proc.stderr.strip()[-300:]}")
    value = json.loads(lines[-1])
    _write_cache(name, value)
    return int(value["peak_rss_bytes"])


def _cached(key: str, refresh: bool, measure: Any) -> dict[str, Any]:
    """The measurement cached under `key`, or measure() now (always when `refresh`) and cache it."""
    name = f"throughput-{_slug(key)}.json"
    cached = None if refresh else _read_cache(name)
    if cached is not None:
        return cached
    value = measure()
    _write_cache(name, value)
    return value


def _time(fn: Any, seconds: float, sync: Any) -> float:
    """Fastest of repeated calls of fn() filling about `seconds` (after one warm-up call).

    The fastest, not the median: on a shared 2-core machine the median of five back-to-back
    measurements of one matmul ranged over 73-126 GFLOP/s, the fastest over 128-158.
    """
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 200):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times)


def attention_throughput(
    device: str,
    precision: str,
    batch: int,
    seq_len: int,
    heads: int,
    head_dim: int,
    seconds: float = 1.0,
    refresh: bool = False,
) -> dict[str, Any]:
    """Measured FLOP/s of causal attention in training (forward and backward) on `device` (cached).

    `F.scaled_dot_product_attention` with is_causal on (batch, heads, seq_len, head_dim) queries, keys and
    values that need gradients, under the autocast a step uses: the kernel a step's attention takes (on a
    CPU in bf16 from `cpu_attention.MIN_SEQ` tokens, adaptlab's `CausalAttention`). Its
    FLOPs are counted as the plan counts them (QK^T and AV, causal half, backward twice the forward). On a
    2-core avx512_bf16 CPU it ran at a fraction of the Linear's bf16 rate, so a step's attention needs
    its own rate.
    """
    seq_len = max(16, min(seq_len, 4096))
    batch = max(1, min(batch, 64))
    kernel = "flash-matmul-bwd" if takes_fast_path(torch.device(device), precision, seq_len) else "sdpa"
    key = f"{device_name(device)}|{precision}|attention-train|{kernel}|{batch}x{heads}x{seq_len}x{head_dim}"
    return _cached(
        key, refresh, lambda: _attention_rate(device, precision, batch, seq_len, heads, head_dim, seconds)
    )


def _attention_rate(
    device: str, precision: str, batch: int, seq_len: int, heads: int, head_dim: int, seconds: float
) -> dict[str, Any]:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=dev, dtype=dtype) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    g = torch.randn(batch, heads, seq_len, head_dim, device=dev, dtype=dtype)

    fast = takes_fast_path(dev, precision, seq_len)

    def attention() -> None:
        if fast:
            CausalAttention.apply(q, k, v, head_dim**-0.5).backward(g)
        else:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)
        q.grad = k.grad = v.grad = None

    flops = 3 * 2.0 * batch * heads * seq_len * seq_len * head_dim  # forward 2 B H T^2 d (causal half)
    return {
        "device": device_name(device),
        "precision": precision,
        "attention_shape": [batch, heads, seq_len, head_dim],
        "attention_kernel": "flash forward, matmul backward" if fast else "sdpa",
        "attention_flops_per_s": flops / _time(attention, seconds, sync),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def dropout_throughput(device: str, refresh: bool = False) -> dict[str, Any]:
    """Measured rate of LoRA dropout's random draws on `device` (cached): mask elements per second.

    Drawn as training draws them (`bernoulli_` from torch's generator, adaptlab.fused_lora). The rate is
    the kernel's, not the memory's: on a CPU torch takes MKL's multi-threaded generator on Intel
    processors and a single-threaded one elsewhere (about 1.5e8 draws/s on a 2-core AMD EPYC, a fifth
    of a LoRA step's time at dropout 0.1 on smollm2-135m at 4 x 256).
    """
    return _cached(f"{device_name(device)}|dropout-draws", refresh, lambda: _dropout_rate(device))


def _dropout_rate(device: str, numel: int = 4 * 2**20) -> dict[str, Any]:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    mask = torch.empty(numel, device=dev, dtype=torch.bool)
    return {
        "device": device_name(device),
        "dropout_draws_per_s": numel / _time(lambda: mask.bernoulli_(0.9), 0.5, sync),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def device_throughput(
    device: str, precision: str, m: int, k: int, n: int, seconds: float = 3.0, refresh: bool = False
) -> dict[str, Any]:
    """Measured matmul FLOP/s of a Linear at (m x k) @ (k x n), and elementwise bytes/s on `device` (cached).

    The matmuls are an nn.Linear's: F.linear of an (m, k) input with an (n, k) weight under the
    autocast a step uses, so bf16 means the kernels and layouts a step takes. Three rates:
    `matmul_flops_per_s`, forward and both gradients (a trained weight, 6 m k n FLOPs);
    `frozen_matmul_flops_per_s`, forward and the input's gradient (a frozen weight under LoRA, 4 m k n);
    `forward_flops_per_s`, forward alone (sampling, 2 m k n). The layouts matter: on a CPU without
    native bf16 the forward ran at 13 GFLOP/s and a bf16 `a @ b` with a row-major (k, n) operand at 1.3.
    """
    m = max(64, min(m, 4096))
    key = f"{device_name(device)}|{precision}|linear-train|{m}x{k}x{n}"
    return _cached(key, refresh, lambda: _linear_rates(device, precision, m, k, n, seconds))


def _linear_rates(device: str, precision: str, m: int, k: int, n: int, seconds: float) -> dict[str, Any]:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a = torch.randn(m, k, device=dev, requires_grad=True)
    w = torch.randn(n, k, device=dev)
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)

    def linear(backward: bool, weight_grad: bool) -> None:
        w.requires_grad_(weight_grad)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = torch.nn.functional.linear(a, w)
        if backward:
            y.backward(g)
        a.grad = w.grad = None

    flops = 2.0 * m * k * n
    train_s = _time(lambda: linear(True, True), seconds * 0.3, sync)
    frozen_s = _time(lambda: linear(True, False), seconds * 0.2, sync)
    with torch.no_grad():
        forward_s = _time(lambda: linear(False, False), seconds * 0.1, sync)
    numel = 16 * 2**20
    x = torch.randn(numel, device=dev)
    y = torch.randn(numel, device=dev)
    add_s = _time(lambda: x + y, seconds * 0.4, sync)
    return {
        "device": device_name(device),
        "precision": precision,
        "shape": [m, k, n],
        "matmul_flops_per_s": 3 * flops / train_s,
        "frozen_matmul_flops_per_s": 2 * flops / frozen_s,
        "forward_flops_per_s": flops / forward_s,
        "mem_bytes_per_s": 3.0 * 4 * numel / add_s,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
