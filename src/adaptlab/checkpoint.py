"""Checkpoints while a run trains: every file written during training, and the resume from a checkpoint.

RunWriter writes what the loop produces (metrics rows, checkpoints, config changes, then the summary)
through the run-directory contract (rundir.py: atomic checkpoints with a manifest); RankWriter is its
counterpart for one rank of several, where every rank writes its shards of a sharded checkpoint
(torch.distributed.checkpoint) and rank 0 writes the rest. restore() puts a run back where its newest
checkpoint that verifies left it, whatever the world size that wrote it.

    adaptlab train --model tiny-random --method lora --data python-stdlib --steps 20 --save-every 5 --out runs/r
    adaptlab train --resume runs/r
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adaptlab import distributed as dist
from adaptlab.config import RunConfig
from adaptlab.run_setup import Setup
from adaptlab.rundir import Checkpoint, RunDir, newest_valid_checkpoint, restore_checkpoint, save_checkpoint

LogFn = Callable[[dict[str, Any]], None]
log = logging.getLogger(__name__)


class RunWriter:
    """Every file a run writes while it trains: metrics rows, checkpoints, then the summary.

    The loop writes nothing else, so a run of several processes gives all but one of them a writer
    that writes nothing.
    """

    def __init__(self, run: RunDir, on_log: LogFn | None = None, keep: int = 2) -> None:
        self.run = run
        self.on_log = on_log
        self.keep = keep

    def log(self, row: dict[str, Any]) -> None:
        self.run.append_metrics(row)
        if self.on_log:
            self.on_log(row)

    def rewind(self, step: int) -> None:
        """Drop the metrics rows logged after `step` (a resume repeats those steps)."""
        self.run.truncate_metrics(step)

    def write_config(self, config: RunConfig) -> None:
        self.run.write_config(config.to_yaml())

    def checkpoint(
        self,
        step: int,
        params: dict[str, torch.nn.Parameter],
        optimizer: Any,
        scheduler: Any,
        state: dict[str, Any],
        bad_from: int | None = None,
    ) -> Path:
        """Write checkpoint `step`; while weights are suspect since `bad_from`, the newest older one stays."""
        good = [p for p in self.run.checkpoint_dirs() if bad_from is not None and _step_of(p) < bad_from]
        protect = good[0] if good else None
        return save_checkpoint(self.run, step, params, optimizer, scheduler, state, self.keep, protect)

    def discard_checkpoints(self, from_step: int) -> list[Path]:
        """Remove the checkpoints of `from_step` and later; return them."""
        bad = [p for p in self.run.checkpoint_dirs() if _step_of(p) >= from_step]
        for p in bad:
            shutil.rmtree(p)
        return bad

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json; the finished artifact supersedes the resumable state."""
        self.run.write_summary(summary)
        for p in self.run.checkpoint_dirs():
            shutil.rmtree(p)
        self.run.clean_temp_checkpoints()
        with contextlib.suppress(OSError):  # only when nothing else is in it
            self.run.checkpoints.rmdir()


class RankWriter(RunWriter):
    """The writer of one rank of several: rank 0 writes metrics and the summary, and every rank writes
    its shards of a checkpoint (torch.distributed.checkpoint), which rank 0 then renames into place."""

    def __init__(self, run: RunDir, on_log: LogFn | None, keep: int, world: dist.World, model: Any) -> None:
        super().__init__(run, on_log if world.is_main else None, keep)
        self.world = world
        self.model = model

    def log(self, row: dict[str, Any]) -> None:
        if self.world.is_main:
            super().log(row)

    def rewind(self, step: int) -> None:
        if self.world.is_main:
            super().rewind(step)
        dist.barrier()

    def write_config(self, config: RunConfig) -> None:
        if self.world.is_main:
            super().write_config(config)
        dist.barrier()

    def checkpoint(
        self,
        step: int,
        params: dict[str, torch.nn.Parameter],
        optimizer: Any,
        scheduler: Any,
        state: dict[str, Any],
        bad_from: int | None = None,
    ) -> Path:
        # while the weights are suspect, one more checkpoint stays so the last good one survives rotation
        keep = self.keep + (1 if bad_from is not None else 0)
        return dist.save_sharded(
            self.run.checkpoints, step, self.model, optimizer, scheduler, state, keep, self.world
        )

    def discard_checkpoints(self, from_step: int) -> list[Path]:
        removed = super().discard_checkpoints(from_step) if self.world.is_main else []
        dist.barrier()
        return removed

    def finish(self, summary: dict[str, Any]) -> None:
        if self.world.is_main:
            super().finish(summary)
        dist.barrier()


def _load_any(setup: Setup, ckpt: Checkpoint, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """A checkpoint written at any world size: DCP (several processes) or the single-process format."""
    if ckpt.format == "dcp":
        return dist.load_sharded(ckpt.path, setup.model, optimizer, scheduler)
    if setup.world.distributed:
        return dist.load_single(ckpt.path, setup.model, optimizer, scheduler)
    return restore_checkpoint(ckpt, setup.params, optimizer, scheduler)


def restore(
    setup: Setup, optimizer: Any, scheduler: Any, writer: RunWriter
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint of the run that verifies into the model, optimizer, scheduler and
    objective, and drop the metrics rows logged after it; return it and its state.json (None: resume
    from the start, every row dropped).

    Temp folders of unfinished writes are removed, and checkpoints that do not verify are skipped
    with a warning that names them.
    """
    stale = setup.run.clean_temp_checkpoints()
    if stale:
        log.warning(
            "removed %d unfinished checkpoint write(s): %s", len(stale), ", ".join(p.name for p in stale)
        )
    ckpt, skipped = newest_valid_checkpoint(setup.run)
    if skipped:
        log.warning(
            "skipped checkpoint(s) that do not verify: %s; resuming from %s",
            "; ".join(f"{p.name}: {why}" for p, why in skipped),
            ckpt.path.name if ckpt else "the start",
        )
    elif setup.world.is_main:  # the one line that says where a resumed run picks up
        log.warning(
            "resuming %s from %s", setup.run.root, ckpt.path.name if ckpt else "the start (no checkpoint)"
        )
    if ckpt is None:
        writer.rewind(0)
        return None
    state = _load_any(setup, ckpt, optimizer, scheduler)
    setup.objective.load_state_dict(state.get("objective", {}))
    writer.rewind(state["step"])
    return ckpt.path, state


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])
