"""The one training loop, for every method: AdamW, warmup + cosine, accumulation, clipping, checkpoints.

Methods differ only in which parameters train (methods.py) and what is saved at the end (an adapter
or a model); everything else here is shared, so a comparison compares methods, not loops. What a
step minimises is the run's objective (adaptlab/objectives: sft, dpo, grpo): it builds the data, cuts
each step's micro-batches and computes their loss; the loop is the same for all of them.

The unit of a step is the global batch (batch x grad_accum rows). Row order is a pure function of
(seed, step) (objectives.batch_indices), so a resumed run sees exactly the data an uninterrupted one
would. The loss of a step is the sum of the micro-batches' summed losses divided by the objective's
normaliser for the whole global batch (sft: its label tokens), so batch 4 x accum 1 and batch 1 x
accum 4 take the same step. Under torchrun (distributed.py) each of N ranks takes its contiguous 1/N
of the same global batch and the normaliser is summed over ranks, so N processes take the same steps
as one.

The loop is a sequence of named parts: build_optimizer / build_scheduler, the objective's
micro_batches (the data of a step), train_step (forward, backward, clip, update), the periodic
evaluation and checkpoint, and build_summary. Every file written while training goes through a
RunWriter, and a resume starts from checkpoint.restore (checkpoint.py).

    adaptlab train --model tiny-random --method lora --data python-stdlib --steps 20 --out runs/demo
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adaptlab import compiling, outputs
from adaptlab import distributed as dist
from adaptlab.autocast_linear import fuse_autocast_linears
from adaptlab.checkpoint import LogFn, RankWriter, RunWriter, restore
from adaptlab.config import LrChange, RunConfig, TrainSpec, build_config, load_config
from adaptlab.cpu_attention import use_cpu_attention
from adaptlab.errors import UserError, writing
from adaptlab.frozen_base import adapters_in_fp32, hold_frozen_linears, load_held
from adaptlab.fused import fuse_mlps
from adaptlab.fused_lora import fuse_loras
from adaptlab.fused_norm import fuse_norms
from adaptlab.hardware import (
    autocast,
    choose_precision,
    mem_bytes,
    peak_mem_bytes,
    pick_device,
    reset_peak,
    step_time_spread,
)
from adaptlab.health import Health, advice
from adaptlab.methods import (
    apply_method,
    check_against_model,
    param_report,
    trainable_parameters,
)
from adaptlab.models import STORED, load_model
from adaptlab.objectives import objective_for, to_device
from adaptlab.optim_backward import BackwardUpdates, check_one_process
from adaptlab.run_setup import Setup
from adaptlab.rundir import RunDir, dir_bytes, versions, write_dir
from adaptlab.transforms import Transforms, loads_held, transforms_for

log = logging.getLogger(__name__)


def lr_lambda(total_steps: int, warmup: float, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_ratio, as a multiplier of the peak LR."""
    warmup_steps = round(warmup * total_steps)

    def f(step: int) -> float:  # step counts optimizer steps already taken
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


FitsOneDevice = Callable[[RunConfig, torch.device], "bool | None"]
"""Whether a whole replica of the run fits one device (None when it cannot be told): what `--parallel auto`
asks; the caller supplies it (the command line asks the planner's memory model)."""


def prepare(
    config: RunConfig,
    world: dist.World = dist.SINGLE,
    parallel: str | None = None,
    fits_one_device: FitsOneDevice | None = None,
) -> Setup:
    """Load the base, apply the method, build the data: the same for fresh runs and resumes.

    Under a process group the model is wrapped (DDP or FSDP2) and `params` are the wrapped model's.
    """
    if config.out is None:
        raise UserError("no run directory: pass --out RUN")
    device = dist.device_for(world) if world.distributed else pick_device()
    precision = choose_precision(config.train.precision, device)
    objective = objective_for(config)
    fits = fits_one_device(config, device) if fits_one_device and world.distributed else None
    strategy = dist.resolve_parallel(parallel, config.method.method, world, fits)
    loaded = load_base(config, device, precision, strategy)
    check_against_model(config, loaded.model)
    transforms = transforms_for(
        config, device, precision, strategy, sum(p.numel() for p in loaded.model.parameters())
    )
    # auto turning it on is said: the first step then takes tens of seconds longer while it compiles
    (log.warning if transforms.compile and config.train.compile == "auto" else log.debug)(
        transforms.why["compile"]
    )
    tokenizer = loaded.tokenizer
    train_examples, val_examples = objective.build_data(config, tokenizer)
    model = build_model(loaded.model, config, transforms, device, strategy)
    model.train()
    report = param_report(model)
    model = dist.wrap(model, strategy, device, precision)
    return Setup(
        config=config,
        run=RunDir(config.out),
        model=model,
        tokenizer=tokenizer,
        params=trainable_parameters(dist.unwrap(model)),
        report=report,
        train_examples=train_examples,
        val_examples=val_examples,
        device=device,
        precision=precision,
        total_steps=config.train.total_steps(),
        world=world,
        parallel=strategy,
        compiled=transforms.compile,
        objective=objective,
        transforms=transforms,
    )


def load_base(config: RunConfig, device: torch.device, precision: str, strategy: str | None) -> Any:
    """The run's base (models.LoadedModel), loaded as its transforms need it.

    FSDP2 loads on the CPU and moves only each rank's shards to its device. QLoRA quantizes from the
    checkpoint's own dtype, and LoRA at bf16 keeps a bf16 checkpoint's Linears as stored (frozen_base.py):
    neither holds the base whole in fp32.
    """
    if loads_held(config.method.method, precision, strategy):
        return load_held(config.model.name, device)
    dtype = STORED if config.method.method == "qlora" else torch.float32
    return load_model(config.model.name, dtype=dtype, device="cpu" if strategy == "fsdp" else device)


def build_model(
    base: Any, config: RunConfig, transforms: Transforms, device: torch.device, strategy: str | None
) -> Any:
    """The method applied to `base`, then each of `transforms` (adaptlab.transforms), on `device` unless
    FSDP2 shards it there (distributed.wrap)."""
    with adapters_in_fp32() if transforms.load_held else nullcontext():
        model = apply_method(base, config.method, base_name=config.model.name, seed=config.train.seed)
    if config.model.init_from:  # another run's weights (init_from.py)
        from adaptlab import init_from

        model = init_from.load_into(model, config)
    # bit-identical to the plain MLP, two (tokens x intermediate) tensors less per block
    fuse_mlps(model, recompute_product=transforms.recompute_mlp_product)
    if transforms.fuse_lora:  # LoRA's adapter passes folded into accumulating matmuls
        fuse_loras(model)
    if transforms.fuse_linears:
        fuse_autocast_linears(model)  # under autocast, trained Linears keep fp32 tensors, not bf16 casts
    if transforms.fuse_norms:
        fuse_norms(model)  # a block's norms keep their input only; their outputs are rebuilt in backward
    if config.train.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if transforms.cpu_attention:
        use_cpu_attention(model)  # torch's flash forward, a faster backward of fused matmuls
    if transforms.hold_base_bf16:
        hold_frozen_linears(model)  # the bf16 values autocast would cast them to at every call
    if strategy != "fsdp":
        model.to(device)
    if transforms.compile:
        compiling.compile_layers(model, device)
    return model


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


def _stop(setup: Setup, writer: RunWriter, health: Health, problem: UserError, lr: float) -> None:
    """End a diverged or collapsed run: drop the checkpoints with bad weights, say what is kept and what to do."""
    bad_from = health.bad_from()
    removed = writer.discard_checkpoints(bad_from if bad_from is not None else 0)
    kept = setup.run.latest_checkpoint()
    where = f"kept checkpoint {kept.name}" if kept else "no good checkpoint is left"
    if removed:
        where += f" (removed {', '.join(p.name for p in removed)}, written after the trouble began)"
    raise type(problem)(f"{problem}: stopped; {where}. {advice(str(setup.run.root), lr, setup.precision)}")


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


def build_summary(
    setup: Setup, progress: Progress, artifact: Path, final_loss: float | None, val: dict[str, float]
) -> dict[str, Any]:
    """summary.json: what trained, what it cost, where the artifact is, and the software that ran it."""
    cfg = setup.config
    summary = {
        "method": cfg.method.method,
        "base_model": cfg.model.name,
        "trainable_params": setup.report.trainable,
        "total_params": setup.report.total,
        "peak_mem_bytes": peak_mem_bytes(setup.device),
        "wall_s": progress.wall_s(),
        "train_s": progress.train_time,
        "tokens_per_s": progress.tokens_seen / progress.train_time if progress.train_time > 0 else 0.0,
        "tokens_seen": progress.tokens_seen,
        "steps": setup.total_steps,
        "final_train_loss": final_loss,
        "final_val_loss": val.get("val_loss"),
        "artifact": artifact.name,
        "artifact_bytes": dir_bytes(artifact),
        "precision": setup.precision,
        "device": str(setup.device),
        "lr": cfg.resolved_lr(),
        "train_examples": len(setup.train_examples),
        "versions": versions(),
        "world_size": setup.world.world_size,
        "parallel": setup.parallel,
        "compiled": setup.compiled,
        "step_time": step_time_spread(
            [r["tokens_per_s"] for r in setup.run.read_metrics() if "tokens_per_s" in r]
        ),
    }
    if cfg.objective.task != "sft":
        summary["task"] = cfg.objective.task
        summary["final_val"] = val
    if cfg.model.init_from:
        from adaptlab.init_from import chain

        summary["init_from"] = chain(cfg)
    if cfg.train.lr_changes:
        summary["lr_changes"] = [c.model_dump() for c in cfg.train.lr_changes]
    if cfg.method.method == "qlora":
        from adaptlab.quantize import quantization_info

        summary["quantization"] = quantization_info(setup.model)
    return summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _last_train_loss(run: RunDir) -> float | None:
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    return losses[-1] if losses else None


def save_artifact(setup: Setup) -> Path:
    """Write RUN/adapter (PEFT format) for the LoRA family or RUN/model (HF format) for full.

    Under FSDP2 the shards are gathered first (every rank takes part); rank 0 writes the same
    directory one process would.
    """
    run = setup.run
    is_lora = setup.config.method.is_lora
    target = run.adapter if is_lora else run.model
    state = dist.full_state(setup.model, trainable_only=is_lora) if setup.parallel == "fsdp" else None
    if setup.world.is_main:
        model = dist.unwrap(setup.model)

        def write(tmp: Path) -> None:
            if is_lora:
                model.save_pretrained(str(tmp), save_embedding_layers=False, state_dict=state)
            else:
                model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state)
                setup.tokenizer.save_pretrained(str(tmp))

        write_dir(target, write)
    dist.barrier()
    return target
