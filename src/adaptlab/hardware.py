"""The device, its precision and the memory meter.

Precision `auto` is bf16 autocast (fp32 master weights) on CUDA with bf16 support and on CPUs with
native bf16 (avx512_bf16 or AMX), where a LoRA step on smollm2-135m ran 1.6x faster than fp32;
fp32 elsewhere. Peak memory on CPU is the process peak RSS (what the OS had to give); on CUDA it
is torch's peak allocated memory.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np
import torch

from adaptlab.errors import UserError


def pick_device(requested: str | None = None) -> torch.device:
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device: use --device cpu")
    return torch.device(requested)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16"))


def choose_precision(requested: str, device: torch.device) -> str:
    """Resolve auto|fp32|bf16 to fp32 or bf16 for this device."""
    if requested == "fp32":
        return "fp32"
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
        return "bf16"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is VmHWM, the high-water mark of the process's own memory. getrusage's ru_maxrss
    is not: a process started by another (vfork + exec, as subprocess does) inherits its parent's
    peak there, so every child of a 2 GB parent would report at least 2 GB.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def mem_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return current_rss_bytes()


NOISY_CV = 0.3
"""Step times varying more than this (std / mean) mean the machine, not the method, set the pace:
on a quiet machine a run's steps take the same time to within a few percent."""


def step_time_spread(tokens_per_s: list[float], warmup: int = 1) -> dict[str, float | int | bool | None]:
    """How much a run's step times vary: {"steps", "cv", "slowest_over_median", "noisy"}.

    Steps process equal token counts, so a step's time is proportional to 1 / its tokens per second.
    The first `warmup` logged steps (allocation, compilation) are left out.
    """
    seconds = np.array([1.0 / x for x in tokens_per_s[warmup:] if x and x > 0], dtype=np.float64)
    if len(seconds) < 3:
        return {"steps": len(seconds), "cv": None, "slowest_over_median": None, "noisy": False}
    cv = float(seconds.std() / seconds.mean())
    return {
        "steps": len(seconds),
        "cv": cv,
        "slowest_over_median": float(seconds.max() / np.median(seconds)),
        "noisy": cv > NOISY_CV,
    }
