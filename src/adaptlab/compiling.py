"""`--compile`: torch.compile each decoder layer of the model being trained, in place.

Compiling layer by layer (as torchtune does) rather than the whole model keeps parameter names and
state_dict keys as they were, so checkpoints, adapters and FSDP2's per-layer sharding are unchanged,
and every layer reuses one compiled graph. The first steps pay for compilation; whether the rest
are faster depends on the device and the model, so it is off by default (README: the measured figures).
On a CPU, inductor writes C++ and needs a compiler on PATH.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from adaptlab.distributed import decoder_layers
from adaptlab.errors import UserError


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
