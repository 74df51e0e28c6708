"""The loop over a run's steps (`_loop`): each step, then its log row, the evaluation and the checkpoint
when they are due; a diverged run stops with its good checkpoints kept; at the end, the last evaluation,
the artifact and the summary."""

from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from adaptlab import distributed as dist
from adaptlab.checkpoint import LogFn, RankWriter, RunWriter, restore
from adaptlab.errors import UserError
from adaptlab.hardware import mem_bytes, reset_peak
from adaptlab.health import Health, advice
from adaptlab.optim_backward import BackwardUpdates
from adaptlab.run_setup import Setup
from adaptlab.train.saving import _last_train_loss, build_summary, save_artifact
from adaptlab.train.schedule import (
    _record_lr_change,
    apply_lr_changes,
    build_optimizer,
    build_scheduler,
    peak_lr,
    set_peak_lr,
)
from adaptlab.train.step import Progress, StepResult, train_step


def _loop(
    setup: Setup, resume: bool, on_log: LogFn | None = None, new_lr: float | None = None
) -> dict[str, Any]:
    """Train from the start (or the newest valid checkpoint) to the end of the budget; return the summary."""
    t = setup.config.train
    setup.objective.prepare(setup)
    optimizer = build_optimizer(setup.params, t, setup.config.resolved_lr())
    scheduler = build_scheduler(optimizer, setup.total_steps, t)
    updates = BackwardUpdates(optimizer, setup.params.values()) if t.optimizer_in_backward else None
    writer = (
        RankWriter(setup.run, on_log, t.keep_checkpoints, setup.world, setup.model)
        if setup.world.distributed
        else RunWriter(setup.run, on_log, keep=t.keep_checkpoints)
    )
    progress = _resume(setup, optimizer, scheduler, writer) if resume else Progress()
    if new_lr is not None:
        _record_lr_change(setup.config, progress.step, new_lr)
        writer.write_config(setup.config)
        if progress.step == 0:
            set_peak_lr(optimizer, scheduler, new_lr)  # no change entry: it is the run's own LR
    if progress.checkpoint is None:
        seed_everything(t.seed)  # dropout and any other sampling start from the run's seed
    reset_peak(setup.device)
    health = Health(vocab_size=dist.unwrap(setup.model).config.vocab_size)
    progress.start_clock()
    result = None
    for step in range(progress.step, setup.total_steps):
        apply_lr_changes(setup.config, step, optimizer, scheduler)
        start = time.perf_counter()
        batches = setup.objective.micro_batches(setup, step)  # GRPO samples and scores its rollouts here
        result = train_step(setup, batches, optimizer, scheduler, updates)
        result.seconds = time.perf_counter() - start  # a step's time includes making its data
        # an objective whose steps may carry no signal (grpo: every group agrees) is watched for divergence only
        labels = 0 if getattr(setup.objective, "zero_gradient_ok", False) else result.labels
        if (problem := health.check(step + 1, result.loss, result.grad_norm, labels)) is not None:
            _stop(setup, writer, health, problem, peak_lr(setup.config, step))
        progress.advance(result)
        _log_step(setup, writer, progress, result)
        _evaluate_if_due(setup, writer, progress)
        _checkpoint_if_due(setup, writer, progress, optimizer, scheduler, health.bad_from())
    val = _evaluate(setup, writer, progress)
    artifact = save_artifact(setup)
    final_loss = result.loss if result is not None else _last_train_loss(setup.run)
    summary = build_summary(setup, progress, artifact, final_loss, val)
    writer.finish(summary)
    return summary


def _resume(setup: Setup, optimizer: Any, scheduler: Any, writer: RunWriter) -> Progress:
    """Progress of the run being resumed: its newest checkpoint that verifies, or the start if none does."""
    found = restore(setup, optimizer, scheduler, writer)
    return Progress() if found is None else Progress.resumed(*found)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _stop(setup: Setup, writer: RunWriter, health: Health, problem: UserError, lr: float) -> None:
    """End a diverged or collapsed run: drop the checkpoints with bad weights, say what is kept and what to do."""
    bad_from = health.bad_from()
    removed = writer.discard_checkpoints(bad_from if bad_from is not None else 0)
    kept = setup.run.latest_checkpoint()
    where = f"kept checkpoint {kept.name}" if kept else "no good checkpoint is left"
    if removed:
        where += f" (removed {', '.join(p.name for p in removed)}, written after the trouble began)"
    raise type(problem)(f"{problem}: stopped; {where}. {advice(str(setup.run.root), lr, setup.precision)}")


def _log_step(setup: Setup, writer: RunWriter, progress: Progress, result: StepResult) -> None:
    done = progress.step
    if done % setup.config.train.log_every and done != setup.total_steps:
        return
    writer.log(
        {
            "step": done,
            "tokens": progress.tokens_seen,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": result.tokens / result.seconds,
            "mem_bytes": mem_bytes(setup.device),
            "elapsed_s": progress.train_time,
            "total_steps": setup.total_steps,
            **result.metrics,
        }
    )


def _evaluate_if_due(setup: Setup, writer: RunWriter, progress: Progress) -> None:
    every = setup.config.train.eval_every
    if every and progress.step % every == 0 and progress.step < setup.total_steps:
        _evaluate(setup, writer, progress)


def _evaluate(setup: Setup, writer: RunWriter, progress: Progress) -> dict[str, float]:
    """The objective's validation metrics now (sft: val_loss), logged as an eval row."""
    metrics = setup.objective.validation(setup)
    if metrics:
        writer.log({"step": progress.step, "tokens": progress.tokens_seen, "split": "val", **metrics})
    return metrics


def _checkpoint_if_due(
    setup: Setup, writer: RunWriter, progress: Progress, optimizer: Any, scheduler: Any, bad_from: int | None
) -> None:
    every = setup.config.train.save_every
    if every and progress.step % every == 0 and progress.step < setup.total_steps:
        state = progress.state()
        if objective_state := setup.objective.state_dict():
            state["objective"] = objective_state
        progress.checkpoint = writer.checkpoint(
            progress.step, setup.params, optimizer, scheduler, state, bad_from
        )
