"""The optimizer and the learning rate over a run: AdamW, linear warmup then cosine decay, and the
peak-LR changes a resume may record (train.lr_changes in config.yaml)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from adaptlab.config import LrChange, RunConfig, TrainSpec

log = logging.getLogger("adaptlab.train")


def lr_lambda(total_steps: int, warmup: float, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_ratio, as a multiplier of the peak LR."""
    warmup_steps = round(warmup * total_steps)

    def f(step: int) -> float:  # step counts optimizer steps already taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_optimizer(params: dict[str, torch.nn.Parameter], t: TrainSpec, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (biases and norms do not decay).

    The fused kernel (one pass per tensor on CPU and CUDA; 8x faster than the per-tensor loop for
    smollm2-135m's full fine-tuning on CPU) unless FSDP2 shards the parameters (DTensors).
    """
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=not any(hasattr(p, "full_tensor") for p in params.values()),
    )


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, t: TrainSpec) -> Any:
    """Linear warmup then cosine decay, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, t.warmup, t.min_lr_ratio))


def peak_lr(config: RunConfig, step: int) -> float:
    """The peak learning rate in force at `step` (0-based): the config's, or the last change before it."""
    changes = [c for c in config.train.lr_changes if c.step <= step]
    return max(changes, key=lambda c: c.step).lr if changes else config.resolved_lr()


def apply_lr_changes(config: RunConfig, step: int, optimizer: Any, scheduler: Any) -> None:
    """At a step where config.yaml changes the peak LR, rescale the schedule to the new peak."""
    for change in config.train.lr_changes:
        if change.step == step:
            set_peak_lr(optimizer, scheduler, change.lr)


def set_peak_lr(optimizer: Any, scheduler: Any, lr: float) -> None:
    """Make `lr` the schedule's peak from now on, as if the scheduler had been built with it."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)


def _record_lr_change(config: RunConfig, step: int, lr: float) -> None:
    """Write a peak-LR change at `step` into the config (a change at step 0 is the run's own LR)."""
    t = config.train
    if step == 0:
        t.lr, t.lr_changes = lr, []
    else:
        t.lr_changes = [c for c in t.lr_changes if c.step < step] + [LrChange(step=step, lr=lr)]
    log.warning("peak learning rate %g from step %d on (recorded in config.yaml)", lr, step)
