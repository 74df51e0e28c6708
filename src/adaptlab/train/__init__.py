"""The one training loop, for every method: AdamW, warmup + cosine, accumulation, clipping, checkpoints.

Methods differ only in which parameters train (methods.py) and what is saved at the end (an adapter
or a model); everything else here is shared, so a comparison compares methods, not loops. What a
step minimises is the run's objective (adaptlab/objectives: sft, dpo, grpo): it builds the data, cuts
each step's micro-batches and computes their loss; the loop is the same for all of them.

The unit of a step is the global batch (batch x grad_accum rows). Row order is a pure function of
(seed, step) (objectives.batch_indices), so a resumed run sees exactly the data an uninterrupted one
would. The loss of a step is the sum of the micro-batches' summed losses divided by the objective's
normaliser for the whole global batch (sft: its label tokens), so batch 4 x accum 1 and batch 1 x
accum 4 take the same step. Under torchrun (adaptlab.distributed) each of N ranks takes its contiguous 1/N
of the same global batch and the normaliser is summed over ranks, so N processes take the same steps
as one.

The loop is a sequence of named parts, one module each: build.prepare (the base, the method and
its transforms, the data), schedule (build_optimizer / build_scheduler and the peak-LR changes), the
objective's micro_batches (the data of a step), step.train_step (forward, backward, clip, update),
loop (the steps, the periodic evaluation and checkpoint) and saving (the artifact and build_summary).
This module holds the entry points, `train` and `resume_run`. Every file written while training goes
through a RunWriter, and a resume starts from checkpoint.restore (checkpoint.py).

    adaptlab train --model tiny-random --method lora --data python-stdlib --steps 20 --out runs/demo
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from adaptlab import distributed as dist
from adaptlab import outputs
from adaptlab.checkpoint import LogFn
from adaptlab.config import RunConfig, build_config, load_config
from adaptlab.errors import UserError, writing
from adaptlab.optim_backward import check_one_process
from adaptlab.run_setup import Setup
from adaptlab.rundir import RunDir
from adaptlab.train.build import FitsOneDevice, build_model, load_base, prepare
from adaptlab.train.loop import _loop, seed_everything
from adaptlab.train.saving import build_summary, save_artifact
from adaptlab.train.schedule import (
    apply_lr_changes,
    build_optimizer,
    build_scheduler,
    lr_lambda,
    peak_lr,
    set_peak_lr,
)
from adaptlab.train.step import Progress, StepResult, grad_norm, train_step

__all__ = [
    "FitsOneDevice",
    "Progress",
    "StepResult",
    "apply_lr_changes",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_summary",
    "grad_norm",
    "load_base",
    "lr_lambda",
    "peak_lr",
    "prepare",
    "resume_run",
    "save_artifact",
    "seed_everything",
    "set_peak_lr",
    "train",
    "train_step",
]


def _check_out(run: RunDir, overwrite: bool) -> None:
    foreign = [p for p in run.checkpoints.glob("*") if not p.name.startswith(("step-", ".step-"))]
    if foreign:  # a finished run removes checkpoints/: it must hold only adaptlab's checkpoints
        raise UserError(
            f"{run.checkpoints} holds files adaptlab did not write ({foreign[0].name}): move them"
        )
    if overwrite:
        return
    if run.is_finished():
        raise UserError(f"{run.root} holds a finished run: choose another --out, or pass --overwrite")
    if run.latest_checkpoint() is not None:
        raise UserError(
            f"{run.root} holds an unfinished run: continue it with `adaptlab train --resume {run.root}`"
        )


def train(
    config: RunConfig,
    on_start: Callable[[Setup], None] | None = None,
    on_log: LogFn | None = None,
    resume: bool = False,
    new_lr: float | None = None,
    overwrite: bool = False,
    parallel: str | None = None,
    fits_one_device: FitsOneDevice | None = None,
) -> dict[str, Any]:
    """Run (or resume) training to the end of its budget; write the run directory; return summary.

    The run directory is claimed and locked first (adaptlab.outputs): a directory holding files
    adaptlab did not write is refused unless `overwrite`, and a second writer is refused while this one runs.
    Under torchrun every rank calls this: rank 0 owns and writes the run directory, every rank trains
    its slice. `parallel` (ddp | fsdp | auto) picks how several processes share the model; `auto` asks
    `fits_one_device`.
    """
    if config.out is None:
        raise UserError("no run directory: pass --out RUN")
    run = RunDir(config.out)
    world = dist.world_from_env()
    dist.check_parallel(parallel, config.method.method, world)
    dist.check_global_batch(config.train.batch * config.train.grad_accum, world)
    check_one_process(config.train.optimizer_in_backward, world.world_size)
    owner = outputs.owned(run.root, "run", overwrite=overwrite or resume) if world.is_main else nullcontext()
    with owner:
        if not resume and world.is_main:
            _check_out(run, overwrite)
        world = dist.init_world()
        try:
            setup = prepare(config, world, parallel, fits_one_device)
            if world.is_main and not resume:
                outputs.clear(run.root)  # adaptlab's own outputs only; other files stay
                with writing(run.config):
                    run.config.write_text(config.to_yaml())
                with writing(run.metrics):
                    run.metrics.write_text("")
            dist.barrier()
            if on_start and world.is_main:
                on_start(setup)
            return _loop(setup, resume, on_log, new_lr)
        except RuntimeError as err:
            if not dist.peer_failure(err, world):
                raise
            raise dist.RankLost(
                f"rank {world.rank}: another process of this run stopped ({dist.first_line(err)}); "
                f"the last good checkpoint is kept: continue with `adaptlab train --resume {run.root}`"
            ) from None
        finally:
            dist.close_world()


def resume_run(
    run_dir: str | Path,
    on_start: Callable[[Setup], None] | None = None,
    on_log: LogFn | None = None,
    lr: float | None = None,
    parallel: str | None = None,
    fits_one_device: FitsOneDevice | None = None,
) -> dict[str, Any]:
    """Continue an interrupted run from its newest valid checkpoint (or from the start if it has none).

    `lr` replaces the peak learning rate from the step the run resumes at; config.yaml records the
    change (train.lr_changes), so re-running it reproduces the run.
    """
    run = RunDir(run_dir)
    if not run.config.exists():
        raise UserError(f"{run.root} is not a run directory (no config.yaml)")
    if run.is_finished():
        raise UserError(f"{run.root} has already finished (summary.json exists)")
    config = build_config(load_config(run.config))
    config.out = str(run.root)
    return train(
        config,
        on_start=on_start,
        on_log=on_log,
        resume=True,
        new_lr=lr,
        parallel=parallel,
        fits_one_device=fits_one_device,
    )
