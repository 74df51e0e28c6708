"""`--compile`: torch.compile each decoder layer of the model being trained, in place.

Compiling layer by layer (as torchtune does) rather than the whole model keeps parameter names and
state_dict keys as they were, so checkpoints, adapters and FSDP2's per-layer sharding are unchanged,
and every layer reuses one compiled graph. The first steps pay for compilation; whether the rest
are faster depends on the device and the model. On a CPU, inductor writes C++ and needs a compiler on
PATH.

`train.compile` is true, false or `auto` (the default). `auto` compiles only where it was measured to
pay back (docs/benchmarks.md, `--compile`): a single-process full or LoRA SFT run in bf16 on a CPU with native bf16,
long enough to earn back the compilation (`AUTO_MIN_WORK`). Everywhere else (CUDA, fp32, DoRA and QLoRA,
DPO and GRPO, several processes, activation checkpointing, short runs) it stays eager until measured.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from adaptlab.errors import UserError
from adaptlab.hardware import cpu_has_native_bf16
from adaptlab.models import decoder_layers

AUTO_MIN_WORK = 3.5e13
"""`auto` compiles a run of at least this many parameter-tokens (the model's parameters x the tokens it
trains on), about 256 steps of 4 x 256 on smollm2-135m. There, with an empty inductor cache, compiling
cost 26-35 s over the eager loop's first step, and compiled bf16 steps ran 1.14-1.2x faster (0.4-0.6 s
of ~3.4 s), so it paid back after 60-150 steps; in the slowest measured pair a 256-step run broke even
(docs/benchmarks.md, `--compile`)."""

AUTO_METHODS = ("full", "lora")
"""The methods `auto` compiles (rsLoRA is a LoRA). On the same CPU a compiled DoRA step was no faster
than its eager one and a compiled QLoRA step was slower (bench/results/
train_step_interleaved_compile_dora_qlora_avx512bf16.json)."""


def cpp_compiler_available() -> bool:
    """Whether inductor can compile on a CPU here: a C++ compiler on PATH."""
    return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def compile_layers(model: nn.Module, device: torch.device) -> int:
    """torch.compile every decoder layer of `model` in place; the number of layers compiled."""
    if device.type == "cpu" and not cpp_compiler_available():
        raise UserError(
            "--compile on a CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile"
        )
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"--compile: no decoder layers found in {type(model).__name__}; drop --compile")
    for layer in layers:
        layer.compile()
    return len(layers)


def auto_blockers(
    *,
    method: str,
    device: torch.device,
    precision: str,
    world_size: int,
    task: str,
    grad_checkpointing: bool,
    optimizer_in_backward: bool,
    work: float,
) -> list[str]:
    """Why `compile: auto` leaves this run eager (empty: it compiles). `work` is parameters x tokens."""
    why = workload_blockers(method, work)
    if device.type != "cpu":
        why.append(f"not measured on {device.type}")
    elif precision != "bf16" or not cpu_has_native_bf16():
        why.append("measured to pay only in bf16 on a CPU with native bf16")
    elif not cpp_compiler_available():
        why.append("no C++ compiler on PATH")
    if world_size > 1:
        why.append("not measured with several processes")
    if task != "sft":
        why.append(f"not measured for {task}")
    if grad_checkpointing or optimizer_in_backward:
        why.append("not measured with activation checkpointing or optimizer-in-backward")
    return why


def workload_blockers(method: str, work: float) -> list[str]:
    """The part of `auto_blockers` that is the run's own, not the machine's: its method and length."""
    why = []
    if method not in AUTO_METHODS:
        why.append(f"{method} was measured no faster compiled")
    if work < AUTO_MIN_WORK:
        why.append(
            f"too short to pay back the compilation ({work:.1e} < {AUTO_MIN_WORK:.1e} parameter-tokens)"
        )
    return why


def resolve(setting: bool | str, blockers: list[str]) -> tuple[bool, str]:
    """`train.compile` (true | false | auto) for this run, and a line saying why."""
    if setting != "auto":
        return bool(setting), f"compile: {'on' if setting else 'off'} (set)"
    if blockers:
        return False, f"compile: off (auto: {'; '.join(blockers)})"
    return True, "compile: on (auto: a long bf16 run on a CPU with native bf16; --no-compile to stay eager)"
