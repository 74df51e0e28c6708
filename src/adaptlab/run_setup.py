"""What a run is made of before its first step: the base with its method applied, the data, the device
and precision, the objective and how the processes share the model. train.prepare builds it the same
way for a fresh run and a resume; the loop and checkpoint.restore read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adaptlab import distributed as dist
from adaptlab.config import RunConfig
from adaptlab.methods import ParamReport
from adaptlab.objectives import Objective
from adaptlab.rundir import RunDir
from adaptlab.transforms import Transforms


@dataclass
class Setup:
    """Everything a run needs, built the same way for a fresh run and a resume."""

    config: RunConfig
    run: RunDir
    model: Any
    tokenizer: Any
    params: dict[str, torch.nn.Parameter]
    report: ParamReport
    train_examples: list[Any]
    """The objective's training rows (sft: Example, dpo: PreferencePair, ...)."""
    val_examples: list[Any]
    device: torch.device
    precision: str
    total_steps: int
    objective: Objective
    """What each step minimises (config.objective.task): its data, micro-batches, loss and metrics."""
    world: dist.World = dist.SINGLE
    parallel: str | None = None
    """ddp | fsdp when several processes train this run, else None."""
    compiled: bool = False
    """Whether its decoder layers run under torch.compile (train.compile, compiling.resolve)."""
    transforms: Transforms | None = None
    """What its model got before the first step (adaptlab.transforms; train.prepare sets it)."""
