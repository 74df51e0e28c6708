"""One optimizer step (`train_step`: forward and backward per micro-batch, clip, update), what it
measured (`StepResult`) and where the run stands (`Progress`, what a checkpoint saves)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptlab import distributed as dist
from adaptlab.hardware import autocast
from adaptlab.objectives import to_device
from adaptlab.optim_backward import BackwardUpdates
from adaptlab.run_setup import Setup


@dataclass
class Progress:
    """Where a run stands: the counters a checkpoint saves and a resume restores, and the run's clock."""

    step: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0
    wall_before: float = 0.0
    """Wall time spent before this process started (by the runs this one resumes)."""
    checkpoint: Path | None = None
    """The newest checkpoint written or resumed from."""
    wall_start: float = 0.0

    @classmethod
    def resumed(cls, checkpoint: Path, state: dict[str, Any]) -> Progress:
        """Where a run stood at `checkpoint`, from its state.json (what state() wrote)."""
        return cls(
            step=state["step"],
            tokens_seen=state["tokens_seen"],
            train_time=state["train_time_s"],
            wall_before=state["wall_s"],
            checkpoint=checkpoint,
        )

    def start_clock(self) -> None:
        self.wall_start = time.perf_counter()

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.wall_start

    def advance(self, result: StepResult) -> None:
        self.step += 1
        self.tokens_seen += result.tokens
        self.train_time += result.seconds

    def state(self) -> dict[str, Any]:
        """What state.json records next to the tensors of a checkpoint."""
        return {"tokens_seen": self.tokens_seen, "train_time_s": self.train_time, "wall_s": self.wall_s()}


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float
    """Mean per-token loss over the global batch."""
    grad_norm: float
    lr: float
    """The learning rate the step used."""
    tokens: int
    """Tokens (attention-mask ones) in the global batch."""
    labels: int
    """Loss units in the global batch (the loss is their mean): label tokens for sft, pairs for dpo."""
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    """The objective's own per-step metrics, global-batch means (dpo: rewards/accuracy, ...)."""


def train_step(
    setup: Setup,
    micro: list[dict[str, torch.Tensor]],
    optimizer: Any,
    scheduler: Any,
    updates: BackwardUpdates | None = None,
) -> StepResult:
    """One optimizer step over the global batch `micro`: forward and backward per micro-batch, clip, update.

    Each micro-batch's summed loss is divided by the objective's normaliser of the whole global batch
    (summed over ranks; sft: its label tokens), so the accumulated gradient is that of the global
    batch's mean loss however it is cut, over micro-batches or over ranks. With `updates`
    (optimizer_in_backward) the last micro-batch's backward applies the update itself, a parameter at
    a time.
    """
    start = time.perf_counter()
    device = setup.device
    units = setup.objective.normaliser(setup, micro)
    n_units = max(units, 1)
    scale = dist.loss_scale(setup.world) / n_units
    total_loss = 0.0
    sums: dict[str, float] = {}
    for m, b in enumerate(micro):
        if updates is not None:
            updates.armed = m == len(micro) - 1
        with dist.gradient_sync(setup.model, m == len(micro) - 1):
            with autocast(device, setup.precision):
                loss_sum, metric_sums = setup.objective.loss(setup, to_device(b, device))
            (loss_sum * scale).backward()
        total_loss += float(loss_sum.detach())
        for k, v in metric_sums.items():
            sums[k] = sums.get(k, 0.0) + v
    lr = optimizer.param_groups[0]["lr"]
    if updates is None:
        norm = grad_norm(list(setup.params.values()), setup.config.train.max_grad_norm)
        optimizer.step()
    else:
        updates.armed = False
        norm = updates.finish()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        loss=dist.all_reduce_sum(total_loss, device) / n_units,
        grad_norm=norm,
        lr=lr,
        tokens=int(dist.all_reduce_sum(sum(int(b["attention_mask"].sum()) for b in micro), device)),
        labels=int(units),
        seconds=time.perf_counter() - start,
        metrics={k: dist.all_reduce_sum(v, device) / n_units for k, v in sorted(sums.items())},
    )


def grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The global gradient norm, clipping the gradients to max_norm when it is set."""
    if max_norm is not None:
        return dist.as_float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return dist.as_float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
